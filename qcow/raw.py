"""A raw image as a layer (a raw base under a qcow2 chain).

Every byte is "data at the same offset"; holes in the file read as zeros, and
`extents(..., want_zero=True)` reports them the way qemu-img map does (SEEK_HOLE).
"""

import errno
import os

from .l2_table import DATA, ZERO
from .lockdep import make_lock
from .rawio import RawIO


class RawImage:
    format = "raw"
    backing_name = None
    backing_format = None
    cluster_size = 65536   # granularity for commit/mapping only; raw has no clusters
    encrypted = False

    def __init__(self, path, writable=False, rawio_factory=RawIO, **_):
        self.path = path
        self.read_only = not writable
        self.io = rawio_factory(path, writable)
        self.virtual_size = self.io.size()
        self.lock = make_lock("layer")
        self.flush_lock = make_lock("flush")    # a flush never races a close

    def extents(self, off, n, want_zero=False):
        if not want_zero:
            return [(off, n, DATA, off)]
        return [(s, ln, DATA if data else ZERO, s)
                for s, ln, data in host_data_runs(self.io.fd, off, n)]

    def is_allocated(self, off, n):
        return [(off, n, True)]

    def write(self, off, data, below=None):
        self._check_writable()
        self.io.pwrite(data, off)

    def write_zeroes(self, off, n, below=None):
        self._check_writable()
        step = 1 << 20
        for pos in range(off, off + n, step):
            self.io.pwrite(bytes(min(step, off + n - pos)), pos)

    def resize(self, new_size):
        self._check_writable()
        self.io.truncate(new_size)
        self.io.sync()
        self.virtual_size = new_size

    def _check_writable(self):
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path}: image is opened read-only")

    def flush(self):
        with self.flush_lock:
            if self.io.fd >= 0:
                self.io.sync()

    def writeback_if_full(self):
        """Nothing cached: raw writes go straight to the file."""

    def close(self):
        with self.flush_lock:
            self.io.close()


def host_data_runs(fd, off, n):
    """[(start, length, is_data)] of a file region, from SEEK_DATA/SEEK_HOLE."""
    out = []
    end = off + n
    pos = off
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = end            # only a hole up to EOF (and past it)
        if data > pos:
            stop = min(data, end)
            out.append((pos, stop - pos, False))
            pos = stop
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        stop = min(hole, end)
        out.append((pos, stop - pos, True))
        pos = stop
    return out
