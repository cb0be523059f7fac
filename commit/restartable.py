"""Restartable mode: the depth-first algorithm of the 2012 design discussion.

Intermediates are drained one at a time from the one just above base upwards. For each
allocated cluster of the layer being drained that no higher layer of the range shadows,
its content is copied into base; once base is flushed the cluster is marked unallocated
in that layer, so the layer reads through to base and sees the same bytes. When nothing
visible is left, the layer leaves the chain at once (its overlay is rewritten to name
base) before the next layer is touched: a cluster above it may only become unallocated
onto base once no shorter layer sits in between and could shadow base with zeros.

Restart (after cancel or kill -9) resumes where the durable state says: clusters
already unallocated are not copied again; only chunks that were in flight are.
"""

from qcow.l2_table import ZERO

from .completion import drop_layers_down_to, mark_leftover, zero_past_short
from .copy import SCAN_SLICE, copy_buffer, copy_view, scan_allocated
from .steps import CHUNK, READING, WRITING, Copied, SetLen


def restartable_commit(target, chunk=CHUNK):
    chain = target.chain
    base = target.base
    top_size = target.top.virtual_size
    for layer in target.range_layers:
        chain.reopen(layer, True)
    if base.virtual_size < top_size:
        chain.grow(base, top_size)
    scans = scan_allocated(chain, target.top_index, target.base_index, top_size)
    yield SetLen(sum(r[1] for scan in scans for r in scan.runs if r[3] != ZERO))
    dropped = []
    # bottom-up: the layer just above base first
    for layer in reversed(target.range_layers):
        yield from _drain(target, layer, chunk)
        with WRITING:
            zero_past_short(chain, layer, base)
            mark_leftover(chain, layer, base)  # before it leaves: the guard skips it then
            overlay = chain.layers[chain.index_of(layer) - 1]
            name = target.backing_file if layer.path == target.top_path else None
            dropped += drop_layers_down_to(chain, overlay, base, name)
    return dropped


def _drain(target, layer, chunk):
    chain, base = target.chain, target.base
    cs = layer.cluster_size
    visible_end = min(layer.virtual_size, target.top.virtual_size)
    step = max(cs, chunk // cs * cs)
    buf = copy_buffer(base)  # one for the layer's copies
    pos = 0
    for start, length, allocated in _allocated(layer, visible_end):
        if not allocated:
            continue
        # whole clusters of `layer`, each visited once even when runs share one
        pos = max(pos, start // cs * cs)
        end = min(-(-(start + length) // cs) * cs, visible_end)
        while pos < end:
            n = min(step, end - pos)
            copied = copy_view(chain, target.top_index, base, pos, n, chain.index_of(layer), buf)
            _forget_copied(base, layer, pos, n)
            pos += n
            # reported only once durable: a restart never copies what was reported
            yield Copied(copied)


def _allocated(layer, end):
    """layer.is_allocated over [0, end), a slice at a time: a guest read through the
    layer never waits for a whole-disk scan of it."""
    for off in range(0, end, SCAN_SLICE):
        with READING:
            runs = layer.is_allocated(off, min(SCAN_SLICE, end - off))
        yield from runs


def _forget_copied(base, layer, off, n):
    """Ordering rule: base durable first, then the layer forgets the clusters (and
    that is durable too before the copy counts as done)."""
    with WRITING:
        base.flush()
        layer.mark_unallocated(off, n)
        layer.flush()
