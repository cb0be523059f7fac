"""Simple mode (QEMU's way): copy the topmost version of every cluster allocated
anywhere in (base, top] into base, then drop (base, top] from the chain.

The four allocation cases of a cluster, with mid below top:
 1. in neither: base already answers; nothing to do;
 2. mid only: mid's copy goes into base; everyone still sees the same bytes;
 3. both: top's copy goes into base (the topmost version: it is the one anybody above
    top sees);
 4. top only: top's copy goes into base, which *invalidates mid* for anyone else still
    reading through it to base. Our chain never sees it (top shadows it, and mid leaves
    the chain at the end); other chains through mid are the stranding guard's business.
The intermediates are thus invalid from the first copy; a cancelled or crashed commit
leaves a chain that still reads right (top shadows everything copied), and a new run
starts over.
"""

from qcow.l2_table import ZERO

from .completion import drop_range
from .copy import copy_buffer, copy_runs, scan_allocated, windows
from .steps import CHUNK, Copied, SetLen


def simple_commit(target, chunk=CHUNK):
    chain = target.chain
    base = target.base
    top_i = target.top_index
    top_size = target.top.virtual_size
    if base.virtual_size < top_size:
        chain.grow(base, top_size)
    # (base, top] does not change while the job runs: one scan serves it all
    scans = scan_allocated(chain, top_i, target.base_index, top_size)
    yield SetLen(sum(r[1] for scan in scans for r in scan.runs if r[3] != ZERO))
    window = max(chunk, base.cluster_size)
    buf = copy_buffer(base)  # one for the job: no fresh pages per window
    for scan, runs in windows(scans, window):
        yield Copied(copy_runs(chain, top_i, base, scan, runs, buf=buf))
    return (yield from drop_range(target))
