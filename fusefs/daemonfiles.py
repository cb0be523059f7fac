"""The files the mount daemon writes beside its control socket: its pid file and its log.

The daemon runs as root, and the control socket's folder may belong to a user. So
neither file is opened through a symbolic link (O_NOFOLLOW), the pid file is created
exclusively, both are mode 0600, and a path that exists and is not ours (a link, not a
regular file, someone else's, hard-linked elsewhere) is refused with one line. The log
rotates at LOG_MAX_BYTES, and a message logged over and over is rate-limited
(`RepeatFilter`), so no client can fill the disk through the log.

The reading side is here too: a command trusts the pid in a pid file (or a mount record)
only while that process runs and is a qcowfs daemon of the same mountpoint
(`verified_pid`: a stale file may name a pid reused by something else).
"""

import errno
import logging
import logging.handlers
import os
import select
import stat
import time

from qcow.errors import QcowError

LOG_MAX_BYTES = 8 << 20  # then the log moves to <log>.1 (one old log is kept)


def _stem(socket_path):
    base, ext = os.path.splitext(socket_path)
    return base if ext == ".sock" else socket_path


def pid_file_path(socket_path):
    return _stem(socket_path) + ".pid"


def default_log_path(socket_path):
    return _stem(socket_path) + ".log"


def read_pid(path, mountpoint=None):
    """The daemon's pid from its pid file, if that process still runs and is ours (a
    stale pid file may name a pid reused by something else)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return verified_pid(pid, mountpoint)


def verified_pid(pid, mountpoint=None):
    """`pid` if it is a running qcowfs daemon (of `mountpoint`), else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if b"fusefs" not in argv or (mountpoint is not None and os.fsencode(mountpoint) not in argv):
        return None
    return pid if pid_alive(pid) else None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def wait_exit(pid, timeout):
    """Whether process `pid` (a child or not) ends within `timeout` s: woken by its
    pidfd, no polling."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _refuse_unless_ours(path, st, what):
    if stat.S_ISLNK(st.st_mode):
        raise QcowError(path, f"{what} is a symbolic link; refusing to write through it")
    if not stat.S_ISREG(st.st_mode):
        raise QcowError(path, f"{what} exists and is not a regular file; refusing to use it")
    if st.st_uid != os.geteuid():
        raise QcowError(path, f"{what} exists and belongs to uid {st.st_uid}; refusing to use it")
    if st.st_nlink != 1:
        raise QcowError(path, f"{what} has other hard links; refusing to use it")


def _open_private(path, flags, what):
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise QcowError(
                path, f"{what} is a symbolic link; refusing to write through it"
            ) from None
        if e.errno == errno.EEXIST:
            raise
        raise QcowError(path, f"cannot open the {what}: {e.strerror}") from None
    try:
        _refuse_unless_ours(path, os.fstat(fd), what)
        os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_log(path):
    """A file descriptor appending to the log at `path` (created 0600)."""
    return _open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "log file")


def write_pid_file(path):
    """Create the pid file exclusively with our pid. A leftover of ours (a daemon that
    was killed; the caller checked that no daemon answers on the socket) is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = _open_private(path, flags, "pid file")
    except FileExistsError:
        try:
            _refuse_unless_ours(path, os.lstat(path), "pid file")
            os.unlink(path)
            fd = _open_private(path, flags, "pid file")
        except FileNotFoundError:
            fd = _open_private(path, flags, "pid file")
        except FileExistsError:
            raise QcowError(
                path, "pid file appeared while replacing it; another daemon starting?"
            ) from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")


def remove_pid_file(path):
    """Remove the pid file if it still is the one we wrote."""
    try:
        st = os.lstat(path)
        _refuse_unless_ours(path, st, "pid file")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            if f.read(32).strip() != str(os.getpid()):
                return
        os.unlink(path)
    except (OSError, QcowError):
        pass


class LogHandler(logging.handlers.RotatingFileHandler):
    """The daemon's log file: opened as `open_log` does, rotated at LOG_MAX_BYTES."""

    def __init__(self, path):
        self.on_open = None  # called with each new stream (after a rotation too)
        super().__init__(path, maxBytes=LOG_MAX_BYTES, backupCount=1, encoding="utf-8")

    def _open(self):
        stream = os.fdopen(open_log(self.baseFilename), "a", encoding="utf-8")
        if self.on_open is not None:
            self.on_open(stream)
        return stream


class RepeatFilter(logging.Filter):
    """At most BURST records of one message (its logger, level and format string) per
    WINDOW seconds; the first one let through after that says how many were dropped."""

    BURST = 20
    WINDOW = 10.0
    MAX_KEYS = 1024

    def __init__(self):
        super().__init__()
        self._seen = {}  # key -> [window start, records in window, dropped]

    def filter(self, record):
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.WINDOW:
            if len(self._seen) >= self.MAX_KEYS:
                self._seen.clear()
            dropped = entry[2] if entry else 0
            entry = self._seen[key] = [now, 0, 0]
            if dropped:
                record.msg = f"{record.getMessage()} ({dropped} more like it suppressed)"
                record.args = None
        entry[1] += 1
        if entry[1] > self.BURST:
            entry[2] += 1
            return False
        return True
