"""Chain reduction: the end of a commit, and the rules that keep the flat view right
across it.

Order (each step durable before the next):
1. base holds everything (data flushed);
2. where the dropped layer was shorter than its overlay, the overlay saw zeros past its
   end: base is zeroed there first (QEMU's live commit of a short top-node misses this);
3. the overlay's header names base (backing file name and format, one header write,
   flushed) — the point of no return on disk;
4. the in-memory chain switches in one assignment; dropped images close once the reads
   in flight are done.
"""

import os

from qcow.header import EXT_QCOWFS_DRAINED
from qcow.leftover import leftover_of
from qcow.paths import relative_name

from .steps import WRITING


def backing_name_for(overlay, base):
    """Relative (to the overlay's directory) when the old name was relative."""
    old = overlay.backing_name
    if old and not os.path.isabs(old):
        return relative_name(base.path, os.path.dirname(overlay.path))
    return base.path


def zero_past_short(chain, layer, base):
    """Before `layer` leaves the chain: its overlay read zeros past `layer`'s end, so
    base must read zeros over [len(layer), min(len(overlay), len(base)))."""
    i = chain.index_of(layer)
    if i == 0:
        return
    overlay = chain.layers[i - 1]
    end = min(overlay.virtual_size, base.virtual_size)
    if end > layer.virtual_size:
        base.write_zeroes(layer.virtual_size, end - layer.virtual_size, chain.below_fn(base))


def drop_layers_down_to(chain, overlay, base, name=None):
    """Steps 3-4: rewrite `overlay`'s backing to `base` (by `name`, else by the name
    backing_name_for works out) and drop what lay between. Returns the dropped layers
    (closed, or closing once reads in flight finish)."""
    base.flush()
    was_read_only = overlay.read_only
    if was_read_only:
        overlay = chain.reopen(overlay, True)
    try:
        # the new backing file relies on base alone: the overlay's own writes (the
        # guest's, on the active image) are not waited for
        dropped = chain.drop_layers(
            overlay, base, name or backing_name_for(overlay, base), flush_overlay=False
        )
    finally:
        if was_read_only:
            chain.reopen(overlay, False)
    return dropped


def mark_leftover(chain, layer, base):
    """Record in `layer`'s header that a commit into `base` dropped it (or drained it)
    from the chain: from then on it is a leftover, which the stranding guard does not
    count as an image depending on base. Best effort for a file we may not write."""
    if layer.format != "qcow2":
        return
    if layer.read_only:
        if not os.access(layer.path, os.W_OK) or not os.stat(layer.path).st_mode & 0o222:
            return
        layer = chain.reopen(layer, True)
    layer.mark_drained(base.path)


def mark_intermediates(chain, base):
    """Before an active commit's pivot, without the chain's lock (each mark is a header
    write and its syncs, which guest requests must not wait for): the layers between
    the active image and base are marked leftovers. Still in the chain, below an
    unmarked active image, they are an unfinished drop and mount as they are
    (qcow/leftover.py): a crash before the pivot loses nothing."""
    for layer in chain.layers[1 : chain.index_of(base)]:
        mark_leftover(chain, layer, base)


def unmark_intermediates(chain, base):
    """Undo mark_intermediates for an active commit that ends without its pivot: left
    marked, the stranding guard and a later commit would take images still in use for
    leftovers of a commit that never happened."""
    for layer in chain.layers[1 : chain.index_of(base)]:
        if leftover_of(layer) == base.path:
            layer.set_extension(EXT_QCOWFS_DRAINED, None)


def pivot(chain, base):
    """End of an active commit (chain lock held, base in sync and durable, the
    intermediates marked already): the old active image is marked a leftover, so it is
    not mounted later as if it still held the disk; then the chain serves base.

    The mark is written but not synced here, where a fdatasync would stall every guest
    request. Until it is durable a crash leaves the old chain, which reads as the disk
    did at the pivot; only writes acknowledged since, none of them flushed, are lost.
    A flush of the chain syncs the layers that left it before it returns (Chain.flush),
    and the job's `release_dropped` syncs it at once."""
    old = chain.layers[0]
    if old.format == "qcow2":
        old.mark_drained(base.path, durable=False)
    return chain.pivot_to(base)


def drop_range(target):
    """End of a (non-active) commit: zero past a short top, then drop (base, top]."""
    chain, base = target.chain, target.base
    with WRITING:
        zero_past_short(chain, target.top, base)
        for layer in target.range_layers:
            mark_leftover(chain, layer, base)
        overlay = chain.layers[target.top_index - 1]
        dropped = drop_layers_down_to(chain, overlay, base, target.backing_file)
    yield from ()
    return dropped


def delete_files(layers):
    for layer in layers:
        try:
            os.unlink(layer.path)
        except FileNotFoundError:
            pass
