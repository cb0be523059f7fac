"""Raw positional I/O on one image file: the only place that touches the file descriptor.

Tests of crash consistency wrap this class (recording every write and flush); nothing
else in the format layer calls os.pread/os.pwrite/os.fdatasync on an image directly.
"""

import errno
import functools
import os
import threading

from .errors import CorruptImage

IOV_MAX = 1024
SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range():
    """libc's sync_file_range, or None (not Linux, or no glibc symbol)."""
    import ctypes  # only the commands that copy load it

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


class RawIO:
    def __init__(self, path, writable):
        self.path = path
        self.writable = writable
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        # written since the last barrier: a barrier with nothing to make durable (a
        # flush of an image nothing changed) costs no fdatasync
        self.unsynced = writable
        # clear while a header write made durable by itself is in flight: see
        # pwrite_header
        self.header_idle = threading.Event()
        self.header_idle.set()

    def size(self):
        return os.fstat(self.fd).st_size

    def pread(self, length, offset):
        return os.pread(self.fd, length, offset)

    def pread_exact(self, length, offset):
        """Metadata read: anything short is a corrupt image."""
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise CorruptImage(
                self.path, f"metadata at offset {offset} lies beyond the end of the file"
            )
        return data

    def preadinto(self, buf, offset):
        """Read into a writable buffer; bytes past EOF read as zeros."""
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def pwrite(self, data, offset):
        assert self.writable, "write to an image opened read-only"
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        self.unsynced = True

    def pwrite_header(self, data, offset):
        """A write into the header, made under the layer's lock. It waits for a
        `pwrite_header_durable` in flight: that one holds a header taken before this
        write's and must not land after it (over a table move's, say)."""
        self.header_idle.wait()
        self.pwrite(data, offset)

    def pwrite_header_durable(self, data):
        """Write cluster 0 and make it alone durable (RWF_DSYNC: its pages, then the
        disk's write cache), not the file's other writes as fdatasync would; called
        without the layer's lock, after clearing `header_idle` under it with `data`
        taken. `unsynced` is left as it was: the other writes still need a barrier."""
        assert self.writable, "write to an image opened read-only"
        view, offset = memoryview(data), 0
        try:
            while view:
                n = os.pwritev(self.fd, [view], offset, os.RWF_DSYNC)
                view = view[n:]
                offset += n
        finally:
            self.header_idle.set()

    def pwritev(self, buffers, offset):
        """Several buffers written contiguously from offset, in one request when it can."""
        assert self.writable, "write to an image opened read-only"
        for i in range(0, len(buffers), IOV_MAX):
            group = buffers[i : i + IOV_MAX]
            total = sum(len(b) for b in group)
            n = os.pwritev(self.fd, group, offset)
            if n < total:
                self.pwrite(b"".join(bytes(b) for b in group)[n:], offset + n)
            offset += total
        self.unsynced = True

    def data_runs(self, off, n):
        """[(start, length, is_data)] of a region of the file, from SEEK_DATA/SEEK_HOLE."""
        out = []
        end = off + n
        pos = off
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end  # only a hole up to EOF (and past it)
            if data > pos:
                stop = min(data, end)
                out.append((pos, stop - pos, False))
                pos = stop
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            stop = min(hole, end)
            out.append((pos, stop - pos, True))
            pos = stop
        return out

    def reserve(self, offset, length):
        """Give [offset, offset+length) disk space now (the file grows to cover it): a
        later write there cannot fail with ENOSPC; this one does, if space lacks."""
        assert self.writable, "reserve in an image opened read-only"
        os.posix_fallocate(self.fd, offset, length)
        self.unsynced = True

    def truncate(self, size):
        os.ftruncate(self.fd, size)
        self.unsynced = True

    def sync(self):
        """The flush barrier: everything written before is durable after."""
        if self.writable and self.unsynced:
            # cleared first: a write that lands during the fdatasync counts for the next
            self.unsynced = False
            try:
                os.fdatasync(self.fd)
            except BaseException:
                self.unsynced = True
                raise

    def start_writeback(self):
        """Start writing the file's dirty pages out and return at once
        (sync_file_range WRITE): a long copy into the file then leaves its next barrier
        little to wait for. It makes nothing durable; barriers still `sync`."""
        fn = _sync_file_range()
        if fn is not None and self.writable and self.fd >= 0:
            fn(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
