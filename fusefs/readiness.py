"""The readiness pipe between `qcowfs mount` and the daemon it forks.

The daemon writes ``NOTE <line>`` for each line the user should see (a resumed commit),
then ``READY`` once the flat file answers a stat through the mount and the control
socket listens, or ``ERROR <one line>`` when it cannot start; then it closes its end.
The command waits on the other end without polling: a line, end of file (the daemon
died) or the time-out wakes it.
"""

import os
import select
import time


class ReadyPipe:
    """The daemon's end (absent, fd None, in a user's own --foreground run)."""

    def __init__(self, fd):
        self.fd = fd

    def _send(self, line):
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def ready(self):
        self._send("READY")

    def note(self, message):
        """A line the user sees on `qcowfs mount`'s stderr (before READY)."""
        if self.fd is not None:
            try:
                os.write(self.fd, ("NOTE " + message.replace("\n", " ") + "\n").encode())
            except OSError:
                pass

    def error(self, message):
        self._send("ERROR " + message)


class ReplyReader:
    """The command's end: the daemon's lines, one at a time."""

    def __init__(self, fd, timeout):
        self.fd = fd
        self.deadline = time.monotonic() + timeout
        self.buf = b""

    def line(self):
        """The next line; '' on end of file, '?timeout' once the time is up."""
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return "?timeout"
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.fd, 4096)
            if not chunk:
                if not self.buf:
                    return ""
                self.buf += b"\n"  # a last line cut short by the daemon's death
                break
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")
