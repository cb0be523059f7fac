"""QEMU-compatible image locking with OFD byte-range locks (file-posix.c's scheme).

Byte 100+i is read-locked by every holder of permission i; byte 200+i by every holder
that does not share permission i with others. Permissions: 0 CONSISTENT_READ,
1 WRITE, 2 WRITE_UNCHANGED, 3 RESIZE. So QEMU, qemu-img and qemu-storage-daemon see
our locks and we see theirs: `qemu-img info` of an image we write fails, `-U` works.
"""

import errno
import fcntl
import struct
import time

from .errors import ImageLockConflict

PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 0, 1, 2, 3
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
ALL_PERMS = (0, 1, 2, 3)

# what we hold, and what we refuse to share, as QEMU does for the same roles
WRITER = ({PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE}, {PERM_WRITE, PERM_RESIZE})
READER = ({PERM_CONSISTENT_READ}, {PERM_WRITE, PERM_RESIZE})

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _flock(fd, cmd, ltype, start):
    arg = struct.pack("hhqqi4x", ltype, 0, start, 1, 0)
    return struct.unpack("hhqqi4x", fcntl.fcntl(fd, cmd, arg))


def _held_by_other(fd, byte):
    ltype = _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte)[0]
    return ltype != fcntl.F_UNLCK


def take_image_locks(fd, path, role, patience=0.0):
    """Take the locks of `role` (WRITER or READER) on an open image; ImageLockConflict if
    another process holds a conflicting one. Locks live as long as the descriptor.

    With `patience`, a conflict is retried for that many seconds: a job reopening a
    layer read-write waits out a short-lived reader, such as a `qemu-img info` without
    -U that holds its locks for a few milliseconds; a holder that stays (another QEMU)
    still gives the conflict, only later."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return _take(fd, path, role)
        except ImageLockConflict:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _take(fd, path, role):
    perms, unshared = role
    try:
        for i in perms:
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + i)
        for i in unshared:
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + i)
        for i in perms:
            if _held_by_other(fd, LOCK_SHARED_BASE + i):
                raise ImageLockConflict(
                    path,
                    f'failed to get "{PERM_NAMES[i]}" lock: another process is using the image',
                )
        for i in unshared:
            if _held_by_other(fd, LOCK_PERM_BASE + i):
                raise ImageLockConflict(
                    path,
                    f'failed to get shared "{PERM_NAMES[i]}" lock: '
                    f"another process is using the image",
                )
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockConflict(path, "image is locked by another process") from None
        raise
    except ImageLockConflict:
        drop_image_locks(fd)
        raise


def drop_image_locks(fd):
    for base in (LOCK_PERM_BASE, LOCK_SHARED_BASE):
        for i in ALL_PERMS:
            _flock(fd, F_OFD_SETLK, fcntl.F_UNLCK, base + i)
