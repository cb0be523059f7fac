"""One client's QMP session as a sans-I/O state machine: bytes in, bytes and requests out.

`QMPProtocol` sends the greeting, holds every command back until `qmp_capabilities`
negotiated the session, checks each request's arguments against the schema
(commit.qapi.SCHEMA) before anything runs, answers the built-in commands itself and
hands the others to the application as `Request`s; `reply`, `error` and `event` encode
what goes back. Every protocol-level error has QEMU's wording (checked against
qemu-storage-daemon 7.2). No sockets, no trio: a test feeds bytes and reads bytes.
"""

import json
import time
from dataclasses import dataclass
from functools import cache

from commit.qapi import COMMAND_NOT_FOUND, GENERIC_ERROR, SCHEMA, QMPError, check_arguments

from .jsonstream import JSONStreamer

# The QMP dialect we speak is QEMU 7.2's (the version every behaviour here was checked
# against); the package says who really answers.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


@cache
def package():
    """'qcowfs VERSION' for the greeting and query-version."""
    try:
        from importlib.metadata import version

        return f"qcowfs {version('qcowfs')}"
    except Exception:  # not installed (running from a source tree)
        return "qcowfs"


@dataclass
class Request:
    """A command for the application to execute; answer with `QMPProtocol.reply/error`."""

    command: str
    arguments: dict
    id: object = None
    has_id: bool = False


def _dumps(obj):
    return json.dumps(obj, allow_nan=False).encode() + b"\r\n"


def event_timestamp():
    """(seconds, microseconds) of now, as an event's timestamp."""
    now = time.time()
    return int(now), int((now - int(now)) * 1_000_000)


def format_event(event, data=None, timestamp=None):
    """One event line: `{"timestamp": {...}, "event": ..., "data": ...}` + CRLF."""
    if timestamp is None:
        timestamp = event_timestamp()
    msg = {"timestamp": {"seconds": timestamp[0], "microseconds": timestamp[1]}, "event": event}
    if data is not None:
        msg["data"] = data
    return _dumps(msg)


class QMPProtocol:
    """One client's QMP session, without I/O.

    `commands` is a live container of the application's command names (a dict works).
    `feed(data)` returns, in order, `bytes` to send as they are and `Request`s to run;
    answer each `Request` with `reply()` or `error()` (which return the bytes to send).
    Built in: `qmp_capabilities`, `query-version`, `query-commands`.
    """

    BUILTINS = ("qmp_capabilities", "query-version", "query-commands")

    def __init__(self, commands, *, schema=None):
        self.commands = commands
        self.schema = SCHEMA if schema is None else schema
        self.version = QEMU_VERSION
        self.package = package()
        self.negotiated = False
        self._streamer = JSONStreamer()

    def greeting(self):
        return _dumps(
            {
                "QMP": {
                    "version": {"qemu": self.version, "package": self.package},
                    "capabilities": [],
                }
            }
        )

    def reply(self, request, value):
        if value is None:
            value = {}
        msg = {"return": value}
        if request is not None and request.has_id:
            msg["id"] = request.id
        return _dumps(msg)

    def error(self, request, cls, desc):
        msg = {}
        if request is not None and request.has_id:
            msg["id"] = request.id
        msg["error"] = {"class": cls, "desc": desc}
        return _dumps(msg)

    def event(self, event, data=None, timestamp=None):
        """The event line for this client, or None before negotiation (as QEMU)."""
        if not self.negotiated:
            return None
        return format_event(event, data, timestamp)

    @property
    def abusive(self):
        """The peer sent a value past the parser's limits (size, tokens, nesting)."""
        return self._streamer.limit_hit

    @property
    def pending(self):
        """Bytes of an incomplete value held for this client."""
        return self._streamer.pending

    def feed(self, data):
        actions = []
        for ok, value in self._streamer.feed(data):
            if not ok:
                actions.append(self.error(None, GENERIC_ERROR, f"JSON parse error, {value}"))
            else:
                actions.append(self._message(value))
        return actions

    def _message(self, msg):
        if not isinstance(msg, dict):
            return self.error(None, GENERIC_ERROR, "QMP input must be a JSON object")
        req = Request(command="", arguments={}, id=msg.get("id"), has_id="id" in msg)
        for key in msg:
            if key not in ("execute", "arguments", "id"):
                return self.error(req, GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
        if "execute" not in msg:
            return self.error(req, GENERIC_ERROR, "QMP input lacks member 'execute'")
        if not isinstance(msg["execute"], str):
            return self.error(req, GENERIC_ERROR, "QMP input member 'execute' must be a string")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return self.error(req, GENERIC_ERROR, "QMP input member 'arguments' must be an object")
        req.command = msg["execute"]
        req.arguments = args
        if req.command != "qmp_capabilities" and not self.negotiated:
            return self.error(
                req, COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        if req.command not in self.BUILTINS and req.command not in self.commands:
            return self.error(
                req, COMMAND_NOT_FOUND, f"The command {req.command} has not been found"
            )
        members = self.schema.get(req.command, {})
        try:
            # nothing runs before its arguments passed the schema (None: a test's
            # command that takes anything)
            if members is not None:
                check_arguments(args, members)
        except QMPError as e:
            return self.error(req, e.cls, e.desc)
        if req.command == "qmp_capabilities":
            return self._capabilities(req)
        if req.command == "query-version":
            return self.reply(req, {"qemu": self.version, "package": self.package})
        if req.command == "query-commands":
            names = sorted(set(self.BUILTINS) | set(self.commands))
            return self.reply(req, [{"name": n} for n in names])
        return req

    def _capabilities(self, req):
        if self.negotiated:
            return self.error(
                req,
                COMMAND_NOT_FOUND,
                "Capabilities negotiation is already complete, command ignored",
            )
        for cap in req.arguments.get("enable", ()):
            return self.error(req, GENERIC_ERROR, f"Capability '{cap}' not available")
        self.negotiated = True
        return self.reply(req, {})
