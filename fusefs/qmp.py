"""The control socket: a QMP subset that the `qemu.qmp` client library can drive.

Two halves:

* sans-I/O: `JSONStreamer` splits a byte stream into JSON values the way QEMU's
  json-lexer/json-streamer do (a value ends where its braces and brackets balance, not
  at a newline; a malformed value gives one error and the parser resynchronises), and
  `QMPProtocol` turns those values into replies, errors and `Request`s for the
  application, with QEMU's wording for every protocol-level error (checked against
  qemu-storage-daemon 7.2);
* trio: `QMPServer` listens on a Unix socket, serves several clients at once, runs
  each client's commands one after the other (as QEMU's monitor does, without OOB) and
  broadcasts events to every client that finished capabilities negotiation.

Plus `default_socket_path()` (shared by the daemon and the CLI) and a small blocking
client (`QMPConnection`, `qmp_call`) for the command line: plain sockets, no asyncio.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import select
import socket
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from commit.qapi import (
    COMMAND_NOT_FOUND,
    DEVICE_NOT_ACTIVE,
    DEVICE_NOT_FOUND,  # noqa: F401
    GENERIC_ERROR,
    SCHEMA,
    QMPError,
    check_arguments,
)
from qcow.errors import QcowError

log = logging.getLogger("qcowfs.qmp")

# The QMP dialect we speak is QEMU 7.2's (the version every behaviour here was checked
# against); `package` says who really answers.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


def _package():
    try:
        from importlib.metadata import version

        return f"qcowfs {version('qcowfs')}"
    except Exception:  # not installed (running from a source tree)
        return "qcowfs"


# --------------------------------------------------------------------------- paths


def default_socket_path(mountpoint):
    """`${XDG_RUNTIME_DIR:-/run}/qcowfs/<first 16 hex of sha256(realpath)>.sock`
    (see fusefs.mountrecord for a non-root user without XDG_RUNTIME_DIR)."""
    from .mountrecord import default_socket_path as path_of

    return path_of(mountpoint)


_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux


@contextmanager
def _short_address(path):
    """A bindable/connectable address for `path`, even past sun_path's 108 bytes.

    A long path is reached through /proc/self/fd/<directory fd>/<name>, which Linux
    accepts for both bind() and connect().
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        alias = f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"
        if len(os.fsencode(alias)) > _SUN_PATH_MAX:
            raise QcowError(path, "socket name too long")
        yield alias
    finally:
        os.close(dirfd)


# --------------------------------------------------------------------------- JSON


class JSONParseError(Exception):
    """One malformed JSON value; the message is QEMU's text after 'JSON parse error, '."""


_WS = frozenset(b" \t\n\r")
_STRUCTURAL = {
    ord("{"): "{",
    ord("}"): "}",
    ord("["): "[",
    ord("]"): "]",
    ord(":"): ":",
    ord(","): ",",
}
_DIGITS = frozenset(b"0123456789")
_KEYWORD = frozenset(b"abcdefghijklmnopqrstuvwxyz")
_WS_RUN = re.compile(rb"[ \t\n\r]+")
_DIGIT_RUN = re.compile(rb"[0-9]+")
_KEYWORD_RUN = re.compile(rb"[a-z]+")
_RESYNC_AT = re.compile(rb"[{}\[\],:\x00-\x08\x0a-\x1f\xfe\xff]")
_SPECIAL_DQ = re.compile(rb'[\\"\x00-\x1f]')
_SPECIAL_SQ = re.compile(rb"[\\'\x00-\x1f]")

# lexer states
_START, _STRING, _KEYWORD_ST, _RECOVERY = range(4)
# number sub-states
_N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_EXP, _N_EXPSIGN, _N_EXPDIG = range(10, 18)


class JSONStreamer:
    """Feed bytes, get complete JSON values out (sans-I/O).

    `feed()` returns a list whose items are either `(True, value)` or
    `(False, message)` for a malformed value (message without the 'JSON parse error, '
    prefix). Follows QEMU: single-quoted strings are accepted, keywords are lower-case,
    a lexical error drops what was gathered of the current value and skips input up to
    the next structural character or control character, a stray closing bracket is an
    error of its own.
    """

    # QEMU allows 64 MiB and 2**20 tokens in one value; our commands are tiny, and a
    # client must not make the daemon hold much memory for it.
    MAX_TOKEN_SIZE = 1 << 20  # bytes in one value
    MAX_TOKEN_COUNT = 1 << 14
    MAX_NESTING = 256  # QEMU allows 1024; we parse recursively

    def __init__(self):
        self._state = _START
        self._tok = bytearray()
        self._quote = 0
        self._escape = False
        self._tokens = []
        self._size = 0
        self._braces = 0
        self._brackets = 0
        self.limit_hit = False  # a value went past a limit: the peer is abusive

    @property
    def pending(self):
        """Bytes held for the value not complete yet."""
        return self._size + len(self._tok)

    # -- lexer
    def feed(self, data):
        out = []
        i = 0
        n = len(data)
        while i < n:
            c = data[i]
            st = self._state
            # runs of the same class are taken in one regex match: a client streaming
            # blanks or digits costs little
            if st == _START:
                if c in _WS:
                    i = _WS_RUN.match(data, i).end()
                elif c in _STRUCTURAL:
                    self._token(_STRUCTURAL[c], bytes((c,)), out)
                    i += 1
                elif c == 0x22 or c == 0x27:  # " or '
                    self._state = _STRING
                    self._quote = c
                    self._escape = False
                    self._tok = bytearray((c,))
                    i += 1
                elif c == 0x2D:  # -
                    self._state = _N_MINUS
                    self._tok = bytearray((c,))
                    i += 1
                elif c == 0x30:
                    self._state = _N_ZERO
                    self._tok = bytearray((c,))
                    i += 1
                elif c in _DIGITS:
                    self._state = _N_INT
                    self._tok = bytearray((c,))
                    i += 1
                elif c in _KEYWORD:
                    self._state = _KEYWORD_ST
                    self._tok = bytearray((c,))
                    i += 1
                else:
                    self._tok = bytearray()
                    self._lex_error(c, out)
                    i += 1
            elif st == _STRING:
                i = self._string(data, i, out)
            elif st == _KEYWORD_ST:
                if c in _KEYWORD:
                    j = _KEYWORD_RUN.match(data, i).end()
                    self._tok += data[i:j]
                    i = j
                    if len(self._tok) > self.MAX_TOKEN_SIZE:
                        self._limit_error("JSON token size limit exceeded", out)
                else:  # lookahead: c is not consumed
                    self._state = _START
                    self._token("keyword", bytes(self._tok), out)
            elif st == _RECOVERY:
                m = _RESYNC_AT.search(data, i)
                if m is None:
                    i = n
                else:
                    i = m.start()
                    self._state = _START  # reprocess it
            elif st in (_N_INT, _N_FRAC, _N_EXPDIG) and c in _DIGITS:
                j = _DIGIT_RUN.match(data, i).end()
                self._tok += data[i:j]
                i = j
                if len(self._tok) > self.MAX_TOKEN_SIZE:
                    self._limit_error("JSON token size limit exceeded", out)
            else:
                i += self._number(c, out)
        return out

    def _string(self, data, i, out):
        """Consume string bytes from data[i:]; returns the new position."""
        special = _SPECIAL_DQ if self._quote == 0x22 else _SPECIAL_SQ
        n = len(data)
        while i < n:
            if self._escape:
                b = data[i]
                if b < 0x20:
                    i += 1
                    self._lex_error(b, out)
                    return i
                self._tok.append(b)
                self._escape = False
                i += 1
                continue
            m = special.search(data, i)
            j = m.start() if m else n
            self._tok += data[i:j]
            i = j
            if i >= n:
                break
            b = data[i]
            i += 1
            if b == 0x5C:  # backslash: the next byte is escaped
                self._tok.append(b)
                self._escape = True
            elif b < 0x20:
                self._lex_error(b, out)
                return i
            else:  # the closing quote
                self._tok.append(b)
                self._state = _START
                self._token("string", bytes(self._tok), out)
                return i
        if len(self._tok) > self.MAX_TOKEN_SIZE:
            self._limit_error("JSON token size limit exceeded", out)
        return i

    def _number(self, c, out):
        """Advance the number automaton by one byte; return bytes consumed (0 or 1)."""
        st = self._state
        isdigit = c in _DIGITS
        if st == _N_MINUS:
            if c == 0x30:
                nxt = _N_ZERO
            elif isdigit:
                nxt = _N_INT
            else:
                self._lex_error(c, out)
                return 1
        elif st == _N_ZERO:
            if c == 0x2E:
                nxt = _N_DOT
            elif c in (0x65, 0x45):
                nxt = _N_EXP
            elif isdigit:
                self._lex_error(c, out)
                return 1
            else:
                return self._end_number(out)
        elif st == _N_INT:
            if isdigit:
                nxt = _N_INT
            elif c == 0x2E:
                nxt = _N_DOT
            elif c in (0x65, 0x45):
                nxt = _N_EXP
            else:
                return self._end_number(out)
        elif st == _N_DOT:
            if not isdigit:
                self._lex_error(c, out)
                return 1
            nxt = _N_FRAC
        elif st == _N_FRAC:
            if isdigit:
                nxt = _N_FRAC
            elif c in (0x65, 0x45):
                nxt = _N_EXP
            else:
                return self._end_number(out)
        elif st == _N_EXP:
            if c in (0x2B, 0x2D):
                nxt = _N_EXPSIGN
            elif isdigit:
                nxt = _N_EXPDIG
            else:
                self._lex_error(c, out)
                return 1
        elif st == _N_EXPSIGN:
            if not isdigit:
                self._lex_error(c, out)
                return 1
            nxt = _N_EXPDIG
        else:  # _N_EXPDIG
            if isdigit:
                nxt = _N_EXPDIG
            else:
                return self._end_number(out)
        self._state = nxt
        self._tok.append(c)
        if len(self._tok) > self.MAX_TOKEN_SIZE:
            self._limit_error("JSON token size limit exceeded", out)
        return 1

    def _end_number(self, out):
        tok = bytes(self._tok)
        kind = "float" if (b"." in tok or b"e" in tok or b"E" in tok) else "integer"
        self._state = _START
        self._token(kind, tok, out)
        return 0  # lookahead

    def _lex_error(self, c, out):
        tok = self._tok
        if c is not None:
            tok = tok + bytes((c,))
        text = bytes(tok).split(b"\0", 1)[0].decode("utf-8", "replace")
        self._reset_value()
        self._state = _RECOVERY
        self._tok = bytearray()
        out.append((False, f"stray '{text}'"))

    def _limit_error(self, message, out):
        self.limit_hit = True
        self._reset_value()
        self._state = _RECOVERY
        self._tok = bytearray()
        out.append((False, message))

    def _reset_value(self):
        self._tokens = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    # -- streamer
    def _token(self, kind, text, out):
        if kind == "{":
            self._braces += 1
        elif kind == "}":
            self._braces -= 1
        elif kind == "[":
            self._brackets += 1
        elif kind == "]":
            self._brackets -= 1
        self._tokens.append((kind, text))
        self._size += len(text)
        for over, message in (
            (self._size > self.MAX_TOKEN_SIZE, "JSON token size limit exceeded"),
            (len(self._tokens) > self.MAX_TOKEN_COUNT, "JSON token count limit exceeded"),
            (self._braces + self._brackets > self.MAX_NESTING, "JSON nesting depth limit exceeded"),
        ):
            if over:
                self.limit_hit = True
                self._reset_value()
                out.append((False, message))
                return
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return  # value not complete yet
        tokens = self._tokens
        self._reset_value()
        try:
            out.append((True, _Parser(tokens).parse()))
        except JSONParseError as e:
            out.append((False, str(e)))


class _Parser:
    """Recursive descent over one value's tokens; the first error wins."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.pos = 0

    def parse(self):
        return self.value()

    def peek(self):
        if self.pos >= len(self.tokens):
            raise JSONParseError("premature EOI")
        return self.tokens[self.pos]

    def pop(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def value(self):
        kind, text = self.peek()
        if kind == "{":
            return self.obj()
        if kind == "[":
            return self.array()
        self.pos += 1
        if kind == "string":
            return _unescape(text)
        if kind == "integer" and len(text) <= 20:  # int() refuses over 4300 digits
            v = int(text)
            if -(1 << 63) <= v < (1 << 64):
                return v
        if kind in ("integer", "float"):
            # past 64 bits QEMU takes a double, as here; one past the double's range
            # would have no JSON spelling in a reply (QEMU sends 'inf')
            v = float(text)
            if not math.isfinite(v):
                raise JSONParseError("number out of range")
            return v
        if kind == "keyword":
            if text == b"true":
                return True
            if text == b"false":
                return False
            if text == b"null":
                return None
            raise JSONParseError(f"invalid keyword '{text.decode()}'")
        raise JSONParseError("expecting value")

    def obj(self):
        self.pop()  # {
        d = {}
        if self.peek()[0] == "}":
            self.pop()
            return d
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise JSONParseError("key is not a string in object")
            if self.pop()[0] != ":":
                raise JSONParseError("missing : in object pair")
            val = self.value()
            if key in d:
                raise JSONParseError("duplicate key")
            d[key] = val
            kind = self.pop()[0]
            if kind == "}":
                return d
            if kind != ",":
                raise JSONParseError("expected separator in dict")

    def array(self):
        self.pop()  # [
        lst = []
        if self.peek()[0] == "]":
            self.pop()
            return lst
        while True:
            lst.append(self.value())
            kind = self.pop()[0]
            if kind == "]":
                return lst
            if kind != ",":
                raise JSONParseError("expected separator in list")


_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def _unescape(text):
    """A string token (with its quotes) -> str, QEMU's error messages."""
    raw = text[1:-1]
    if b"\\" not in raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise JSONParseError("invalid UTF-8 sequence in string") from None
    out = []
    i = 0
    n = len(raw)
    while i < n:
        j = raw.find(b"\\", i)
        if j < 0:
            j = n
        if j > i:
            try:
                out.append(raw[i:j].decode("utf-8"))
            except UnicodeDecodeError:
                raise JSONParseError("invalid UTF-8 sequence in string") from None
        if j >= n:
            break
        if j + 1 >= n:
            raise JSONParseError("invalid escape sequence in string")
        e = raw[j + 1]
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i = j + 2
            continue
        if e != ord("u") or not _HEX4.fullmatch(raw[j + 2 : j + 6]):
            if e == ord("u"):
                raise JSONParseError("invalid hex escape sequence in string")
            raise JSONParseError("invalid escape sequence in string")
        cp = int(raw[j + 2 : j + 6], 16)
        i = j + 6
        if (
            0xD800 <= cp < 0xDC00
            and raw[i : i + 2] == b"\\u"
            and _HEX4.fullmatch(raw[i + 2 : i + 6])
        ):
            lo = int(raw[i + 2 : i + 6], 16)
            if 0xDC00 <= lo < 0xE000:
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                i += 6
        if 0xD800 <= cp < 0xE000:
            esc = raw[j : j + 6].decode()
            raise JSONParseError(f"{esc} is not a valid Unicode character")
        out.append(chr(cp))
    return "".join(out)


# --------------------------------------------------------------------------- QMP


@dataclass
class Request:
    """A command for the application to execute; answer with `QMPProtocol.reply/error`."""

    command: str
    arguments: dict
    id: object = None
    has_id: bool = False


def _dumps(obj):
    return json.dumps(obj, allow_nan=False).encode() + b"\r\n"


def format_event(event, data=None, timestamp=None):
    """One event line: `{"timestamp": {...}, "event": ..., "data": ...}` + CRLF."""
    if timestamp is None:
        now = time.time()
        timestamp = (int(now), int((now - int(now)) * 1_000_000))
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

    def __init__(self, commands, *, schema=None, version=None, package=None):
        self.commands = commands
        self.schema = SCHEMA if schema is None else schema
        self.version = dict(version or QEMU_VERSION)
        self.package = package if package is not None else _package()
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


# --------------------------------------------------------------------------- server


class _Client:
    MAX_QUEUED = 1 << 20  # a client that does not read its replies and events is dropped past this

    def __init__(self, server, stream, number):
        self.stream = stream
        self.number = number
        self.proto = QMPProtocol(server.commands, schema=server.schema, package=server.package)
        self.queue = []
        self.queued = 0
        self.wakeup = trio.Event()
        self.closed = False
        self.overflow = False
        self.in_handler = False
        self.reader_scope = trio.CancelScope()
        self.writer_done = trio.Event()

    def send(self, data):
        if self.closed:
            return
        if self.queued + len(data) > self.MAX_QUEUED:
            self.drop("does not read its messages")
            return
        self.queue.append(data)
        self.queued += len(data)
        self.wakeup.set()

    def drop(self, why):
        """Disconnect now, without sending what is queued."""
        log.warning("QMP client %d %s; disconnecting it", self.number, why)
        self.overflow = True
        self.closed = True
        self.wakeup.set()
        if not self.in_handler:
            self.reader_scope.cancel()

    @property
    def buffered(self):
        return self.queued + self.proto.pending


class QMPServer:
    """A QMP server on a Unix socket, for several clients at once.

    `commands` maps a command name to `async handler(arguments) -> return value` (None
    means `{}`); the dict is consulted live, so commands may be added after construction.
    A handler raises `QMPError(cls, desc)` for an error reply; a `QcowError` becomes a
    GenericError with its message; anything else is logged and becomes a GenericError.
    Arguments are checked against `schema` (default: commit.qapi.SCHEMA) first.

    A client cannot starve the mount: input is parsed in slices with a checkpoint
    between them, and a client is disconnected when it sends a value past the parser's
    limits, lets its unread output pass `_Client.MAX_QUEUED`, or would push the bytes
    buffered for all clients past MAX_BUFFERED. At most MAX_CLIENTS are served.
    """

    MAX_CLIENTS = 32
    MAX_BUFFERED = 8 << 20
    SLICE = 4096  # bytes parsed between two checkpoints

    def __init__(self, socket_path, commands, *, schema=None, package=None, backlog=16):
        self.socket_path = os.fspath(socket_path)
        self.commands = commands
        self.schema = schema
        self.package = package if package is not None else _package()
        self.backlog = backlog
        self._clients = set()
        self._numbers = 0
        self._listener = None
        self._inode = None
        self.serving = False

    # -- events
    def emit(self, event, data=None):
        """Send an event (with a timestamp) to every client past negotiation."""
        line = format_event(event, data)
        log.debug("event %s", line.rstrip().decode())
        for client in list(self._clients):
            if client.proto.negotiated:
                client.send(line)

    @property
    def client_count(self):
        return len(self._clients)

    async def flush(self, timeout=1.0):
        """Wait (at most `timeout` s) until every queued reply and event has been sent."""
        with trio.move_on_after(timeout):
            while any(c.queue for c in self._clients if not c.closed):
                await trio.sleep(0.005)

    # -- socket set-up
    def _prepare_path(self):
        path = self.socket_path
        parent = os.path.dirname(path)
        if parent:
            try:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            except OSError as e:
                raise QcowError(
                    parent, f"cannot create the control socket's directory: {e.strerror}"
                ) from None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise QcowError(path, "exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            with _short_address(path) as addr:
                probe.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        except OSError as e:
            raise QcowError(
                path, f"cannot probe the existing control socket: {e.strerror or e}"
            ) from None
        finally:
            probe.close()
        raise QcowError(path, "control socket is in use by another process")

    async def _bind(self):
        self._prepare_path()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # created 0600 by the umask: a chmod by name after bind() could be sent
            # through a symlink planted in its place
            old_umask = os.umask(0o177)
            try:
                with _short_address(self.socket_path) as addr:
                    await sock.bind(addr)
            finally:
                os.umask(old_umask)
            self._inode = os.lstat(self.socket_path).st_ino
            sock.listen(self.backlog)
        except OSError as e:
            sock.close()
            raise QcowError(
                self.socket_path, f"cannot listen on the control socket: {e.strerror or e}"
            ) from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _remove_socket_file(self):
        try:
            st = os.lstat(self.socket_path)
            if self._inode is not None and stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
                os.unlink(self.socket_path)
        except OSError:
            pass
        self._inode = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Bind, call `task_status.started(socket_path)`, then serve until cancelled."""
        sock = await self._bind()
        self._listener = sock
        self.serving = True
        log.info("control socket listening on %s", self.socket_path)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.socket_path)
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("accept on the control socket failed: %s", e)
                            await trio.sleep(0.1)
                            continue
                        if e.errno in (errno.ECONNABORTED, errno.EINTR):
                            continue
                        raise
                    self._numbers += 1
                    if len(self._clients) >= self.MAX_CLIENTS:
                        log.warning(
                            "control socket: %d clients already; refusing client %d",
                            len(self._clients),
                            self._numbers,
                        )
                        conn.close()
                        continue
                    nursery.start_soon(self._serve_client, conn, self._numbers)
        finally:
            self.serving = False
            sock.close()
            self._listener = None
            self._remove_socket_file()
            for client in list(self._clients):
                client.closed = True

    async def _serve_client(self, conn, number):
        stream = trio.SocketStream(conn)
        client = _Client(self, stream, number)
        self._clients.add(client)
        log.debug("QMP client %d connected", number)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, client)
                client.send(client.proto.greeting())
                with client.reader_scope:
                    await self._reader(client)
                # the peer closed its side (or we gave up on it): flush, then stop
                client.closed = True
                client.wakeup.set()
                if not client.overflow:  # a dropped client gets nothing more
                    with trio.move_on_after(5.0):
                        await client.writer_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            client.closed = True
            self._clients.discard(client)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            log.debug("QMP client %d disconnected", number)

    async def _writer(self, client):
        try:
            while not client.overflow:
                if not client.queue:
                    if client.closed:
                        break
                    client.wakeup = trio.Event()
                    await client.wakeup.wait()
                    continue
                data = b"".join(client.queue)
                client.queue.clear()
                client.queued = 0
                await client.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            client.closed = True
            client.writer_done.set()
            # a command being executed runs to its end; the reader stops after it
            if not client.in_handler:
                client.reader_scope.cancel()

    async def _reader(self, client):
        while not client.closed:
            try:
                data = await client.stream.receive_some(self.SLICE * 4)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            for start in range(0, len(data), self.SLICE):
                await trio.lowlevel.checkpoint()
                await self._handle(client, client.proto.feed(data[start : start + self.SLICE]))
                if client.closed:
                    return
                if client.proto.abusive:
                    client.drop("sent a value past the parser's limits")
                    return
                if self._buffered() > self.MAX_BUFFERED:
                    client.drop(
                        f"pushed the control socket's buffers past {self.MAX_BUFFERED} bytes"
                    )
                    return

    def _buffered(self):
        return sum(c.buffered for c in self._clients if not c.closed)

    async def _handle(self, client, actions):
        for action in actions:
            if client.closed:
                return
            if isinstance(action, bytes):
                client.send(action)
            else:
                client.in_handler = True
                try:
                    reply = await self._execute(client, action)
                finally:
                    client.in_handler = False
                client.send(reply)

    async def _execute(self, client, req):
        handler = self.commands.get(req.command)
        proto = client.proto
        if handler is None:  # removed since feed() looked
            return proto.error(
                req, COMMAND_NOT_FOUND, f"The command {req.command} has not been found"
            )
        try:
            value = handler(req.arguments)
            if hasattr(value, "__await__"):
                value = await value
            return proto.reply(req, value)
        except QMPError as e:
            return proto.error(req, e.cls, e.desc)
        except QcowError as e:
            return proto.error(req, GENERIC_ERROR, str(e))
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as e:
            log.exception("QMP command %s failed", req.command)
            return proto.error(req, GENERIC_ERROR, f"internal error in {req.command}: {e}")


# --------------------------------------------------------------------------- client


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
            with _short_address(self.socket_path) as addr:
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


def qmp_call(socket_path, command, arguments=None, *, label=None, timeout=60.0):
    """Connect, negotiate, run one command, return its value (raises QcowError)."""
    with QMPConnection(socket_path, label=label, timeout=timeout) as conn:
        return conn.execute(command, arguments)


def qmp_execute_and_follow(socket_path, command, arguments=None, *, label=None, timeout=60.0):
    """Run a command and return `(value, connection)`; iterate `connection.events()`
    to follow what it started (events sent before the reply are kept). Close the
    connection when done."""
    conn = QMPConnection(socket_path, label=label, timeout=timeout)
    conn.connect()
    try:
        return conn.execute(command, arguments), conn
    except BaseException:
        conn.close()
        raise


__all__ = [
    "QMPError",
    "QMPServer",
    "QMPProtocol",
    "Request",
    "JSONStreamer",
    "QMPConnection",
    "QMPCallError",
    "check_arguments",
    "SCHEMA",
    "default_socket_path",
    "format_event",
    "qmp_call",
    "qmp_execute_and_follow",
    "GENERIC_ERROR",
    "COMMAND_NOT_FOUND",
    "DEVICE_NOT_ACTIVE",
    "DEVICE_NOT_FOUND",
]
