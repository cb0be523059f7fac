"""Copying a range of the chain's view into base: the one data path of every mode."""

from qcow.l2_table import UNALLOCATED, ZERO

from .steps import READING, WRITING

SCAN_SLICE = 64 << 20  # bytes of allocation scanned per hold of the chain's lock


def allocated_runs(chain, top_i, base_i, size):
    """The runs of [0, size) that layers[top_i] down to (not into) base answer for,
    scanned a slice at a time so guest I/O never waits for a whole-disk scan."""
    with READING:
        for off in range(0, size, SCAN_SLICE):
            for run in chain.range_status(top_i, base_i, off, min(SCAN_SLICE, size - off)):
                if run[3] != UNALLOCATED:
                    yield run


def copy_view(chain, top_i, base, off, n, only_depth=None):
    """Make base hold what layers[top_i] sees over [off, off+n), for every part that the
    layers above base answer for (the rest base already answers itself). Zeros, real or
    past a short layer's end, become zero writes. With only_depth, only the parts that
    layer answers for. Returns the data bytes copied (zeros excluded)."""
    below = chain.below_fn(base)
    base_i = chain.index_of(base)
    copied = 0
    for s, ln, depth, kind in chain.range_status(top_i, base_i, off, n):
        if kind == UNALLOCATED or (only_depth is not None and depth != only_depth):
            continue
        if kind == ZERO:
            with WRITING:
                base.write_zeroes(s, ln, below)
        else:
            with READING:
                data = chain.read_from(top_i, s, ln)
            with WRITING:
                base.write(s, data, below)
            copied += ln
    with WRITING:
        base.writeback_if_full()
    return copied
