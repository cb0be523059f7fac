"""A raw image as a layer (a raw base under a qcow2 chain).

Every byte is "data at the same offset"; holes in the file read as zeros, and
`extents(..., want_zero=True)` reports them the way qemu-img map does (SEEK_HOLE).
"""

import errno

from .l2_table import DATA, ZERO
from .lockdep import make_lock
from .rawio import RawIO
from .read_map import MapStamp


class RawImage:
    format = "raw"
    backing_name = None
    backing_format = None
    cluster_size = 65536  # granularity for commit/mapping only; raw has no clusters
    encrypted = False

    has_cache = False

    def __init__(
        self, path, writable=False, rawio_factory=RawIO, filename=None, map_stamp=None, **_
    ):
        self.path = path
        self.filename = filename or path
        self.read_only = not writable
        self.io = rawio_factory(path, writable)
        self.virtual_size = self.io.size()
        self.map_stamp = map_stamp or MapStamp()  # bumped when the size changes
        self.lock = make_lock("layer")
        self.flush_lock = make_lock("flush")  # a flush never races a close

    def extents(self, off, n, want_zero=False):
        if not want_zero:
            return [(off, n, DATA, off)]
        return [(s, ln, DATA if data else ZERO, s) for s, ln, data in self.io.data_runs(off, n)]

    def data_runs(self, start, length, host, want_zero):
        return [(start, length, False, host)]  # holes came as ZERO from extents

    def fast_host(self, off, n, for_write=False):
        return off  # a raw file maps itself

    def share_cache(self, nbytes):
        """No tables to cache."""

    def repair_if_dirty(self):
        """No metadata to repair."""

    def mark_clean(self):
        """No dirty flag."""

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

    def why_not_resizable(self):
        return None

    def resize(self, new_size):
        self._check_writable()
        self.io.truncate(new_size)
        self.io.sync()
        self.virtual_size = new_size
        self.map_stamp.bump()

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
