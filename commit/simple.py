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
from .copy import allocated_runs, copy_view
from .steps import Copied, SetLen, chunks


def simple_commit(target):
    chain = target.chain
    base = target.base
    top_i = target.top_index
    top_size = target.top.virtual_size
    if base.virtual_size < top_size:
        chain.grow(base, top_size)
    runs = list(allocated_runs(chain, top_i, target.base_index, top_size))
    yield SetLen(sum(r[1] for r in runs if r[3] != ZERO))
    for start, length, _depth, _kind in runs:
        for off, n in chunks(start, length, base.cluster_size):
            yield Copied(copy_view(chain, top_i, base, off, n))
    return (yield from drop_range(target))
