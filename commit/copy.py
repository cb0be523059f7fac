"""Copying a range of the chain's view into base: the one data path of every mode."""

from qcow.l2_table import UNALLOCATED, ZERO


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
            base.write_zeroes(s, ln, below)
        else:
            base.write(s, chain.read_from(top_i, s, ln), below)
            copied += ln
    return copied
