"""QEMU's JSON stream reader, sans-I/O: bytes in, complete JSON values out.

A value ends where its braces and brackets balance, not at a newline (QEMU's
json-lexer/json-streamer); a malformed value gives one error, in QEMU's words, and the
reader resynchronises. Bounds on a value's size, token count and nesting keep a client
from making the daemon hold much memory for it (`JSONStreamer.limit_hit`).
"""

import math
import re


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
_N_ERROR = -1


def _edges(*pairs):
    return {c: state for chars, state in pairs for c in chars}


# the number automaton: state -> {byte: next state}. A byte not listed ends the number
# in an accepting state (and is looked at again) and is a lexical error elsewhere; a
# digit after a leading 0 is an error even though 0 is a number.
_NUMBER = {
    _N_MINUS: _edges((b"0", _N_ZERO), (b"123456789", _N_INT)),
    _N_ZERO: _edges((b".", _N_DOT), (b"eE", _N_EXP), (b"0123456789", _N_ERROR)),
    _N_INT: _edges((b"0123456789", _N_INT), (b".", _N_DOT), (b"eE", _N_EXP)),
    _N_DOT: _edges((b"0123456789", _N_FRAC)),
    _N_FRAC: _edges((b"0123456789", _N_FRAC), (b"eE", _N_EXP)),
    _N_EXP: _edges((b"+-", _N_EXPSIGN), (b"0123456789", _N_EXPDIG)),
    _N_EXPSIGN: _edges((b"0123456789", _N_EXPDIG)),
    _N_EXPDIG: _edges((b"0123456789", _N_EXPDIG)),
}
_N_ACCEPTING = frozenset({_N_ZERO, _N_INT, _N_FRAC, _N_EXPDIG})


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
        nxt = _NUMBER[self._state].get(c)
        if nxt is None and self._state in _N_ACCEPTING:
            return self._end_number(out)  # lookahead: c is not consumed
        if nxt is None or nxt == _N_ERROR:
            self._lex_error(c, out)
            return 1
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
