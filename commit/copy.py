"""Copying a range of the chain's view into base: the one data path of every mode.

A copy works from a scan of the range (qcow.chain.Chain.scan: which layer answers for
each run, and where its bytes lie), so the layers are walked once, not once to decide
and again to read. The layers of a non-active commit do not change while it runs (the
guest writes above them; one job runs at a time), so one scan, made a slice at a time,
serves the whole job; an active commit scans each chunk just before copying it.
Adjacent runs to copy are read together and written into base in one request, so that
consecutive host clusters of base go out as one pwritev.
"""

from qcow.chain import clip_run
from qcow.l2_table import UNALLOCATED, ZERO

from .steps import READING, WRITING

SCAN_SLICE = 8 << 20  # bytes scanned per call: how long one layer's lock is held at most
# Bytes read and written per request of a copy: a buffer that stays in the CPU's cache
# between the read into it and the write out of it (one of 16 MiB made the copy ~1.5x
# slower, its reads from the page cache ~4x), but never less than one cluster of base.
COPY_BUFFER = 256 << 10


def copy_buffer(base):
    """The buffer a job's copies into base pass through, cut in pieces of its length:
    a multiple of base's cluster size (cluster sizes are powers of two), so that no
    piece ends inside a cluster of base (a fresh cluster written in two parts would be
    copied-on-write by the first)."""
    return bytearray(max(COPY_BUFFER, base.cluster_size))


def scan_allocated(chain, top_i, base_i, size):
    """Scans of [0, size) holding only the runs that layers[top_i] down to (not into)
    base answer for; a slice at a time, so guest I/O never waits for a whole-disk scan."""
    scans = []
    with READING:
        for off in range(0, size, SCAN_SLICE):
            scan = chain.scan(top_i, base_i, off, min(SCAN_SLICE, size - off))
            scans.append(scan._replace(runs=[r for r in scan.runs if r[3] != UNALLOCATED]))
    return scans


def windows(scans, size):
    """(scan, runs): the runs of each scan cut into windows of `size` bytes (aligned to
    multiples of it, and never spanning two scans), clipped to their window; windows
    without runs are left out."""
    for scan in scans:
        cur, w = [], None
        for run in scan.runs:
            pos, end = run[0], run[0] + run[1]
            while pos < end:
                ws = pos // size * size
                if ws != w:
                    if cur:
                        yield scan, cur
                    cur, w = [], ws
                cur.append(clip_run(run, pos, min(end, ws + size)))
                pos = min(end, ws + size)
        if cur:
            yield scan, cur


def copy_view(chain, top_i, base, off, n, only_depth=None, buf=None):
    """Make base hold what layers[top_i] sees over [off, off+n), for every part that the
    layers above base answer for (the rest base already answers itself); one scan of
    the range. Returns the data bytes copied (see copy_runs)."""
    with READING:
        scan = chain.scan(top_i, chain.index_of(base), off, n)
    return copy_runs(chain, top_i, base, scan, scan.runs, only_depth, buf)


def copy_runs(chain, top_i, base, scan, runs, only_depth=None, buf=None):
    """Make base hold what the scan of layers[top_i] saw over `runs` (some of its runs,
    in order). Zeros, real or past a short layer's end, become zero writes. With
    only_depth, only the runs that layer answers for. The data passes through `buf`
    (`copy_buffer`; one is made without it), a piece of its length at a time.
    Returns the data bytes copied (zeros excluded)."""
    below = chain.below_fn(base)
    if buf is None:
        buf = copy_buffer(base)
    copied = 0
    for kind, start, length, group in _stretches(runs, only_depth):
        if kind == ZERO:
            with WRITING:
                base.write_zeroes(start, length, below)
            continue
        for pos, n, part in _pieces(group, start + length, len(buf)):
            data = memoryview(buf)[:n]
            with READING:
                if not chain.read_scanned(scan, part, data):
                    data = chain.read_from(top_i, pos, n)  # the layers changed: read now
            with WRITING:
                base.write(pos, data, below)
            copied += n
    with WRITING:
        base.writeback_if_full()
    return copied


def _pieces(runs, end, size):
    """(start, length, runs clipped to it): adjacent `runs` ending at `end`, cut at the
    multiples of `size`."""
    pos = runs[0][0]
    i = 0
    while pos < end:
        stop = min(end, (pos // size + 1) * size)
        part = []
        while i < len(runs) and runs[i][0] < stop:
            part.append(clip_run(runs[i], pos, stop))
            if runs[i][0] + runs[i][1] > stop:
                break  # the rest of this run starts the next piece
            i += 1
        yield pos, stop - pos, part
        pos = stop


def _stretches(runs, only_depth):
    """(ZERO or None for data, start, length, runs): the runs to copy, adjacent ones of
    the same sort (data, compressed or not, or zeros) taken together."""
    cur = None
    for run in runs:
        s, ln, depth, kind, _aux = run
        if kind == UNALLOCATED or (only_depth is not None and depth != only_depth):
            continue
        sort = ZERO if kind == ZERO else None
        if cur is not None and cur[0] == sort and cur[1] + cur[2] == s:
            cur[2] += ln
            cur[3].append(run)
            continue
        if cur is not None:
            yield tuple(cur)
        cur = [sort, s, ln, [run]]
    if cur is not None:
        yield tuple(cur)
