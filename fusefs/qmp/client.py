"""The blocking QMP client the command line uses to talk to a mount: plain sockets, no
asyncio, no trio (a CLI command starts fast)."""

import json
import os
import select
import socket
import time

from commit.qapi import GENERIC_ERROR
from qcow.errors import QcowError

from .address import short_address


class QMPCallError(QcowError):
    """The server answered a command with an error; `.error_class`, `.desc`."""

    def __init__(self, label, error_class, desc):
        self.error_class = error_class
        self.desc = desc
        super().__init__(label, desc)


class QMPConnection:
    """A blocking QMP client on a Unix socket (for the CLI): negotiate, execute, events.

    Events that arrive while waiting for a reply are kept for `next_event()`, so
    nothing is lost between starting a job and following it. Faults are `QcowError`s
    labelled with `label` (the mountpoint, for the CLI), or the socket path.
    """

    def __init__(self, socket_path, *, label=None, timeout=60.0):
        self.socket_path = os.fspath(socket_path)
        self.label = label if label is not None else self.socket_path
        self.timeout = timeout
        self.greeting = None
        self._sock = None
        self._buf = b""
        self._events = []
        self._next_id = 0

    def __enter__(self):
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            with short_address(self.socket_path) as addr:
                sock.connect(addr)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise QcowError(
                self.label,
                f"no qcowfs control socket answers at {self.socket_path} (is it a qcowfs mount?)",
            ) from None
        except OSError as e:
            sock.close()
            raise QcowError(
                self.label, f"cannot connect to {self.socket_path}: {e.strerror or e}"
            ) from None
        self._sock = sock
        try:
            greeting = self._read_message(self.timeout)
            if not isinstance(greeting, dict) or "QMP" not in greeting:
                raise QcowError(self.label, f"{self.socket_path} does not speak QMP")
            self.greeting = greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self):
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _read_message(self, timeout):
        """The next JSON message, or None when `timeout` (seconds) passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                if not line.strip():
                    continue
                try:
                    return json.loads(line)
                except ValueError:
                    raise QcowError(self.label, "garbled message on the control socket") from None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                ready, _, _ = select.select([self._sock], [], [], left)
                if not ready:
                    return None
            self._sock.settimeout(None)
            try:
                data = self._sock.recv(65536)
            except OSError as e:
                raise QcowError(self.label, f"control socket: {e.strerror or e}") from None
            if not data:
                raise QcowError(self.label, "the control socket closed the connection")
            self._buf += data

    def execute(self, command, arguments=None):
        """Run a command; return its "return" value or raise `QMPCallError`."""
        if self._sock is None:
            raise QcowError(self.label, "not connected")
        self._next_id += 1
        req_id = f"qcowfs-{os.getpid()}-{self._next_id}"
        msg = {"execute": command, "id": req_id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QcowError(self.label, f"control socket: {e.strerror or e}") from None
        while True:
            reply = self._read_message(self.timeout)
            if reply is None:
                raise QcowError(self.label, f"no reply to {command} within {self.timeout:g} s")
            if "event" in reply:
                self._events.append(reply)
                continue
            if reply.get("id") != req_id:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QMPCallError(
                    self.label, err.get("class", GENERIC_ERROR), err.get("desc", "error")
                )
            return reply.get("return")

    @property
    def has_pending_events(self):
        """Events already received (e.g. while waiting for a reply) and not yet taken."""
        return bool(self._events)

    def next_event(self, timeout=None):
        """The next event (a dict with "event", "data", "timestamp"), or None on timeout."""
        if self._events:
            return self._events.pop(0)
        while True:
            msg = self._read_message(timeout)
            if msg is None:
                return None
            if "event" in msg:
                return msg

    def events(self, timeout=None):
        """Iterate over events; stops when `timeout` seconds pass without one."""
        while True:
            ev = self.next_event(timeout)
            if ev is None:
                return
            yield ev
