"""A RawIO that records every write and flush barrier, for crash-consistency tests
in the style of CrashMonkey / dm-log-writes.

`Journal` collects, in program order, ("write", offset, bytes), ("write", offset, bytes,
"durable") (RWF_DSYNC: that write alone survives a crash once it returned), ("sync",),
("truncate", size) and ("reserve", offset, length) (fallocate: the file grows) events of
one image file,
plus markers the test adds itself
(e.g. ("flushed", n) once `Qcow2Image.flush()` has returned). `crash_state` builds the
file as a crash after the first `k` events could leave it: the file as it was at the
start, every write before the last completed sync, then a random subset of the writes
after it (applied in order; a write is atomic, the file grows as writes extend it).
"""

from __future__ import annotations

import random

from qcow.rawio import RawIO


class Journal:
    def __init__(self, initial: bytes):
        self.initial = bytes(initial)
        self.events: list[tuple] = []

    def mark(self, *marker):
        self.events.append(marker)

    def writes(self):
        return [e for e in self.events if e[0] == "write"]

    def replay(self, upto=None, keep=None) -> bytearray:
        """The file after events[:upto]; `keep(i)` says whether write event i is kept."""
        buf = bytearray(self.initial)
        for i, e in enumerate(self.events[:upto]):
            if e[0] == "write":
                if keep is not None and not keep(i):
                    continue
                off, data = e[1], e[2]
                if off > len(buf):
                    buf.extend(bytes(off - len(buf)))
                buf[off : off + len(data)] = data
            elif e[0] == "reserve":
                if keep is not None and not keep(i):
                    continue
                end = e[1] + e[2]
                if end > len(buf):
                    buf.extend(bytes(end - len(buf)))
            elif e[0] == "truncate":
                if keep is not None and not keep(i):
                    continue
                size = e[1]
                if size < len(buf):
                    del buf[size:]
                else:
                    buf.extend(bytes(size - len(buf)))
        return buf

    def last_sync(self, upto):
        """Index of the last ("sync",) event among events[:upto], or -1."""
        for i in range(min(upto, len(self.events)) - 1, -1, -1):
            if self.events[i][0] == "sync":
                return i
        return -1

    def last_marker(self, kind, upto):
        for i in range(min(upto, len(self.events)) - 1, -1, -1):
            if self.events[i][0] == kind:
                return i, self.events[i]
        return -1, None

    def crash_state(self, upto, rng: random.Random, keep_prob=0.5) -> bytearray:
        """A possible file after a crash once events[:upto] were issued."""
        s = self.last_sync(upto)
        chosen = {
            i
            for i in range(s + 1, upto)
            if self.events[i][0] in ("write", "truncate", "reserve") and rng.random() < keep_prob
        }
        return self.replay(upto, keep=lambda i: i < s or i in chosen or self.events[i][3:])


class RecordingIO(RawIO):
    """RawIO that appends every write and barrier to a Journal (and still does them)."""

    def __init__(self, path, writable, journal: Journal):
        super().__init__(path, writable)
        self.journal = journal
        self._vectored = False

    def pwrite(self, data, offset):
        if not self._vectored:
            self.journal.events.append(("write", offset, bytes(data)))
        super().pwrite(data, offset)

    def pwritev(self, buffers, offset):
        self.journal.events.append(("write", offset, b"".join(bytes(b) for b in buffers)))
        self._vectored = True
        try:
            super().pwritev(buffers, offset)
        finally:
            self._vectored = False

    def pwrite_header_durable(self, data):
        super().pwrite_header_durable(data)
        self.journal.events.append(("write", 0, bytes(data), "durable"))

    def reserve(self, offset, length):
        self.journal.events.append(("reserve", offset, length))
        super().reserve(offset, length)

    def truncate(self, size):
        self.journal.events.append(("truncate", size))
        super().truncate(size)

    def sync(self):
        super().sync()
        if self.writable:
            self.journal.events.append(("sync",))


def recording_factory(journal: Journal):
    """A `rawio_factory` for Qcow2Image that records into `journal`."""
    return lambda path, writable: RecordingIO(path, writable, journal)
