"""The step protocol between a commit algorithm and whoever drives it.

An algorithm is a generator that does its I/O in bounded chunks and yields between
them, so a driver can rate-limit, pause, report progress or cancel (close the
generator) at every yield. It yields `SetLen(n)` (bytes this run has to copy, possibly
several times as it learns more) and `Copied(n)` (bytes just copied). The offline
driver (engine.run_offline) loops in the calling thread; the live driver runs each step
in a worker thread under the mount's job.

An OSError ends the job; the algorithm says which side of the copy failed by raising
it inside `with READING:` (the layers copied from) or `with WRITING:` (the image copied
into), which becomes BLOCK_JOB_ERROR's operation, as in QEMU.
"""

from typing import NamedTuple

CHUNK = 1 << 20  # bytes copied per step: bounded, so guests never wait long


class SetLen(NamedTuple):
    length: int


class Copied(NamedTuple):
    nbytes: int


def chunks(start, length, align, size=CHUNK):
    """Split [start, start+length) into pieces of at most `size`, cut at multiples of
    `align` (base's cluster size) so that whole clusters are written where possible."""
    size = max(align, size - size % align)
    end = start + length
    pos = start
    while pos < end:
        nxt = min(end, (pos // size + 1) * size)
        yield pos, nxt - pos
        pos = nxt


class Ready(NamedTuple):
    """An active commit is in sync. The driver sends back 'complete' (pivot) or
    'cancel' (stop mirroring, leave the chain as it is)."""


def io_error(operation, exc):
    """Tag an OSError with the QMP `operation` ("read" or "write") for BLOCK_JOB_ERROR.
    A tag it has already, put nearer the failure, stays."""
    if not hasattr(exc, "operation"):
        exc.operation = operation
    return exc


class _Tag:
    """A block whose escaping OSError is tagged with `operation` (see io_error)."""

    def __init__(self, operation):
        self.operation = operation

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, OSError):
            io_error(self.operation, exc)
        return False


READING = _Tag("read")
WRITING = _Tag("write")
