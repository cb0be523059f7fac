"""Errors a user can cause. Each one prints as a single line naming the file.

The CLI catches `QcowError` and prints `qcowfs: <message>`; anything else escaping
is a bug. A fault found only while reading a cluster (a bad L2 entry, a bad compressed
descriptor) is an `OSError(EIO)` for that request instead, so a mount keeps serving the
rest of the disk.
"""

import errno


class QcowError(Exception):
    """Base class: a clear, one-line, user-facing fault."""

    def __init__(self, path, message):
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CorruptImage(QcowError):
    """The image's metadata is inconsistent (bad magic, tables beyond EOF, ...)."""


class UnsupportedImage(QcowError):
    """Valid qcow2 we refuse: encryption, external data file, unknown incompatible bits."""


class ChainError(QcowError):
    """The backing chain cannot be followed: missing file, loop, raw active image."""


class ImageLockConflict(QcowError):
    """Another process (QEMU or qcowfs) holds a conflicting lock on the image."""


class JobError(QcowError):
    """A commit job cannot start or continue (conflict, bad top/base, read-only range)."""


def eio(path, message):
    """An `OSError(EIO)` for one request, carrying a readable message for the log."""
    return OSError(errno.EIO, f"{path}: {message}")
