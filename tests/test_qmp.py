"""The control socket's QMP: protocol (sans-I/O), the trio server driven by the real
`qemu.qmp` client and by raw sockets, the blocking CLI client, and the socket path.

The expected replies for malformed input were recorded from qemu-storage-daemon 7.2
(Debian 1:7.2+dfsg-7) on the same bytes.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_qmp_support import (
    TEST_SCHEMA,
    Raw,
    ServerThread,
    qmp_call,
    qmp_execute_and_follow,
    qmp_session,
)

from commit.qapi import QMPError, check_arguments
from fusefs import qmp
from fusefs.qmp import (
    JSONStreamer,
    QMPCallError,
    QMPConnection,
    QMPProtocol,
    QMPServer,
    Request,
    default_socket_path,
)
from qcow.errors import QcowError

GE = "GenericError"
CNF = "CommandNotFound"


def err(cls, desc, **kw):
    d = dict(kw)
    d["error"] = {"class": cls, "desc": desc}
    return d


def jpe(what):
    return err(GE, f"JSON parse error, {what}")


NOT_OBJECT = err(GE, "QMP input must be a JSON object")

# (bytes sent after negotiation, replies QEMU 7.2 sends)
QEMU_CASES = [
    (
        b'{"execute":"qmp_capabilities","id":"x"}\n',
        [err(CNF, "Capabilities negotiation is already complete, command ignored", id="x")],
    ),
    (b"{bad json}\n", [jpe("invalid keyword 'bad'")]),
    (b"[1,2]\n", [NOT_OBJECT]),
    (b"42\n", [NOT_OBJECT]),
    (b'"str"\n', [NOT_OBJECT]),
    (b'{"id":5}\n', [err(GE, "QMP input lacks member 'execute'", id=5)]),
    (b'{"execute":5,"id":6}\n', [err(GE, "QMP input member 'execute' must be a string", id=6)]),
    (
        b'{"execute":"x-none","arguments":[1],"id":7}\n',
        [err(GE, "QMP input member 'arguments' must be an object", id=7)],
    ),
    (
        b'{"execute":"x-none","arguments":null}\n',
        [err(GE, "QMP input member 'arguments' must be an object")],
    ),
    (
        b'{"execute":"x-none","foo":1,"id":8}\n',
        [err(GE, "QMP input member 'foo' is unexpected", id=8)],
    ),
    (b'{"execute":"x-none","control":{}}\n', [err(GE, "QMP input member 'control' is unexpected")]),
    (
        b'{"exec-oob":"x-none","id":1}\n',
        [err(GE, "QMP input member 'exec-oob' is unexpected", id=1)],
    ),
    (
        b'{"execute":"x-none","id":1}{"execute":"x-none","id":2}',
        [{"return": {}, "id": 1}, {"return": {}, "id": 2}],
    ),
    (b"}\n", [jpe("expecting value")]),
    (b"]\n", [jpe("expecting value")]),
    (b"abc\n", [jpe("invalid keyword 'abc'")]),
    (b'{"execute":"x-none","id":4,}\n', [jpe("expecting value")]),
    (b'{"execute":"x-none","id":"\\u00e9"}\n', [{"return": {}, "id": "\u00e9"}]),
    (b"\xff\xfe\n", [jpe("stray '\ufffd'"), jpe("stray '\ufffd'")]),
    (b"{'execute':'x-none','id':6}\n", [{"return": {}, "id": 6}]),
    (b'{"execute":"x-none","id":7,"id":8}\n', [jpe("duplicate key")]),
    (b'{"execute": bad, "id": 1}\n', [jpe("invalid keyword 'bad'")]),
    (
        b'{"execute": @, "id": 1}\n',
        [
            jpe("stray '@'"),
            jpe("expecting value"),
            NOT_OBJECT,
            jpe("expecting value"),
            NOT_OBJECT,
            jpe("expecting value"),
        ],
    ),
    (b'{"execute" "x"}\n', [jpe("missing : in object pair")]),
    (b'{"execute":"x" "id":1}\n', [jpe("expected separator in dict")]),
    (b"{1:2}\n", [jpe("key is not a string in object")]),
    (b'{"execute":"x-none","id":1.5e3}\n', [{"return": {}, "id": 1500}]),
    (
        b'{"execute":"x-none","id":123456789012345678901234}\n',
        [{"return": {}, "id": 1.2345678901234569e23}],
    ),
    (b'{"execute":"x-none","id":-0}\n', [{"return": {}, "id": 0}]),
    (b'{"execute":"x-none","id":true}\n', [{"return": {}, "id": True}]),
    (b'{"execute":"x-none","id":null}\n', [{"return": {}, "id": None}]),
    (b'{"execute":"x-none","id":[1]}\n', [{"return": {}, "id": [1]}]),
    (
        b'{"execute":"nosuch","id":{"a":1}}\n',
        [err(CNF, "The command nosuch has not been found", id={"a": 1})],
    ),
    (b'{"execute":""}\n', [err(CNF, "The command  has not been found")]),
    (b'{"execute":"x-none","id":"a\\qb"}\n', [jpe("invalid escape sequence in string")]),
    (b'{"execute":"x-none","id":"a\nb"}\n', [jpe("stray '\"a\n'"), jpe("expecting value")]),
    (b'{"execute":"x-none","id":01}\n', [jpe("stray '01'"), jpe("expecting value")]),
    (b"@ 1\n", [jpe("stray '@'")]),
    (b'{"a": @ 1}\n', [jpe("stray '@'"), jpe("expecting value")]),
    (b'"abc\n1\n', [jpe("stray '\"abc\n'")]),
    (b"@ , 1\n", [jpe("stray '@'"), jpe("expecting value"), NOT_OBJECT]),
    (b'@ "x" 1\n', [jpe("stray '@'")]),
    (b"x@y 1\n", [jpe("invalid keyword 'x'"), jpe("stray '@'")]),
    (b'{"a":"\\ud800"}\n', [jpe("\\ud800 is not a valid Unicode character")]),
    (b'{"a":"\xc3("}\n', [jpe("invalid UTF-8 sequence in string")]),
    (b'{"a":1.}\n', [jpe("stray '1.}'")]),
    (b'{"a":-}\n', [jpe("stray '-}'")]),
    (b'{"a":1e}\n', [jpe("stray '1e}'")]),
    (b'{"a":True}\n', [jpe("stray 'T'"), jpe("expecting value")]),
    (b'{"execute":"x-none","arguments":{"x":1}}\n', [{"return": {}}]),  # x-none takes anything
    (
        b'{"execute":"qmp_capabilities","arguments":{"x":1}}\n',  # arguments first, as QEMU 7.2
        [err(GE, "Parameter 'x' is unexpected")],
    ),
    (
        b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n',
        [err(CNF, "Capabilities negotiation is already complete, command ignored")],
    ),
]


def _replies(proto, data):
    """Feed a QMPProtocol; answer Requests for 'x-none' with {} like the server."""
    out = []
    for action in proto.feed(data):
        if isinstance(action, Request):
            assert action.command == "x-none"
            action = proto.reply(action, None)
        out.append(json.loads(action))
    return out


# ------------------------------------------------------------------ sans-I/O


def test_greeting_shape():
    g = json.loads(QMPProtocol({}).greeting())
    assert set(g) == {"QMP"}
    ver = g["QMP"]["version"]
    assert set(ver["qemu"]) == {"major", "minor", "micro"}
    assert all(isinstance(v, int) for v in ver["qemu"].values())
    assert ver["package"].startswith("qcowfs")
    assert g["QMP"]["capabilities"] == []


def test_commands_refused_before_negotiation_as_qemu():
    p = QMPProtocol({"x-none": None}, schema=TEST_SCHEMA)
    got = _replies(p, b'{"execute":"x-none","id":1}\n{"execute":"nosuch","id":2}\n{"id":5}\n')
    assert got == [
        err(CNF, "Expecting capabilities negotiation with 'qmp_capabilities'", id=1),
        err(CNF, "Expecting capabilities negotiation with 'qmp_capabilities'", id=2),
        err(GE, "QMP input lacks member 'execute'", id=5),
    ]
    assert not p.negotiated
    assert p.event("X", {}) is None  # no events before negotiation
    assert _replies(p, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n') == [
        err(GE, "Capability 'oob' not available")
    ]
    assert _replies(p, b'{"execute":"qmp_capabilities","arguments":{"bar":1}}\n') == [
        err(GE, "Parameter 'bar' is unexpected")
    ]
    assert _replies(p, b'{"execute":"qmp_capabilities","arguments":{}, "id":"n"}\n') == [
        {"return": {}, "id": "n"}
    ]
    assert p.negotiated
    assert p.event("X", None) is not None


def test_block_commit_arguments_are_checked_before_its_handler():
    """block-commit's arguments pass the one schema (commit.qapi.SCHEMA) in the protocol:
    a wrong-typed x-guard-dirs never reaches the command table, and gets QEMU's words."""
    p = QMPProtocol({"block-commit": None})
    _replies(p, b'{"execute":"qmp_capabilities"}')
    for dirs, desc in (
        (b'"/tmp"', "Invalid parameter type for 'x-guard-dirs', expected: array"),
        (b'{"d":"/tmp"}', "Invalid parameter type for 'x-guard-dirs', expected: array"),
        (b"null", "Invalid parameter type for 'x-guard-dirs', expected: array"),
        (b"[1]", "Invalid parameter type for 'x-guard-dirs[0]', expected: string"),
        (b'["/tmp",["/x"]]', "Invalid parameter type for 'x-guard-dirs[1]', expected: string"),
    ):
        request = b'{"execute":"block-commit","id":7,"arguments":{"top":"mid.qcow2","x-guard-dirs":'
        # _replies fails on any Request other than x-none's: none may come out here
        assert _replies(p, request + dirs + b"}}") == [err(GE, desc, id=7)], dirs
    (ok,) = p.feed(request + b'["/tmp"]}}')
    assert isinstance(ok, Request) and ok.arguments["x-guard-dirs"] == ["/tmp"]


@pytest.mark.parametrize("data,expected", QEMU_CASES, ids=[repr(c[0])[:40] for c in QEMU_CASES])
def test_protocol_matches_qemu(data, expected):
    p = QMPProtocol({"x-none": None}, schema=TEST_SCHEMA)
    _replies(p, b'{"execute":"qmp_capabilities"}')
    assert _replies(p, data) == expected


def test_protocol_recovers_after_each_malformed_case():
    p = QMPProtocol({"x-none": None}, schema=TEST_SCHEMA)
    _replies(p, b'{"execute":"qmp_capabilities"}')
    for data, _ in QEMU_CASES:
        _replies(p, data)
        assert _replies(p, b'{"execute":"x-none","id":"ok"}\n') == [{"return": {}, "id": "ok"}], (
            data
        )


def test_unbalanced_value_waits_and_control_char_resets():
    p = QMPProtocol({"x-none": None}, schema=TEST_SCHEMA)
    _replies(p, b'{"execute":"qmp_capabilities"}')
    assert (
        _replies(p, b'{"a":[1,2}\n{"execute":"x-none","id":3}\n{{{\n}}}\n') == []
    )  # bracket still open
    assert _replies(p, b"\x00\n") == [jpe("stray ''")]
    assert _replies(p, b'{"execute":"x-none","id":5}\n') == [{"return": {}, "id": 5}]


def test_split_at_every_byte():
    msg = (
        b'{"execute": "x-none", "arguments": {"s": "a\\"b\\u00e9\xc3\xa9"}, '
        b'"id": [1, {"k": -1.5e-3}]}\r\n'
    )
    p = QMPProtocol({"x-none": None}, schema=TEST_SCHEMA)
    _replies(p, b'{"execute":"qmp_capabilities"}')
    got = []
    for i in range(len(msg)):
        for action in p.feed(msg[i : i + 1]):
            got.append(action)
    assert len(got) == 1 and isinstance(got[0], Request)
    assert got[0].arguments == {"s": 'a"b\u00e9\u00e9'}
    assert got[0].id == [1, {"k": -1.5e-3}]


def test_streamer_limits():
    s = JSONStreamer()
    deep = b"[" * (JSONStreamer.MAX_NESTING + 1)
    assert s.feed(deep) == [(False, "JSON nesting depth limit exceeded")]
    assert s.feed(b"\n[1]") == [(True, [1])]
    big = b'"' + b"x" * (JSONStreamer.MAX_TOKEN_SIZE + 10)
    out = s.feed(big)
    assert out == [(False, "JSON token size limit exceeded")]
    assert s.feed(b'\n{"a": 1}') == [(True, {"a": 1})]


def test_surrogate_pairs_and_escapes():
    s = JSONStreamer()
    assert s.feed(b'"\\ud83d\\ude00 \\/\\b\\f\\n\\r\\t\\\'"') == [(True, "\U0001f600 /\b\f\n\r\t'")]
    assert s.feed(b"'it\\'s \"x\"'") == [(True, 'it\'s "x"')]
    assert s.feed(b'"\\u12"') == [(False, "invalid hex escape sequence in string")]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    value=json_values, cuts=st.lists(st.integers(0, 10_000), max_size=6), ascii_only=st.booleans()
)
def test_streamer_round_trips_any_json(value, cuts, ascii_only):
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    points = sorted({c % (len(data) + 1) for c in cuts})
    s = JSONStreamer()
    out = []
    prev = 0
    for p in points + [len(data)]:
        out += s.feed(data[prev:p])
        prev = p
    out += s.feed(b" ")  # a bare number ends at the next character
    assert out == [(True, value)]


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_streamer_survives_garbage_and_resets_on_a_control_character(garbage):
    s = JSONStreamer()
    for ok, item in s.feed(garbage):
        assert ok or item.startswith(
            (
                "stray",
                "invalid",
                "expecting",
                "key ",
                "missing",
                "expected",
                "duplicate",
                "JSON ",
                "premature",
                "\\u",
            )
        )
    assert s.feed(b'\x00\n{"execute": "x"}')[-1] == (True, {"execute": "x"})


def test_event_format():
    line = qmp.format_event("BLOCK_JOB_READY", {"device": "j"}, (12, 345))
    assert line.endswith(b"\r\n")
    assert json.loads(line) == {
        "timestamp": {"seconds": 12, "microseconds": 345},
        "event": "BLOCK_JOB_READY",
        "data": {"device": "j"},
    }
    assert "data" not in json.loads(qmp.format_event("RESUME"))


def test_check_arguments_messages():
    members = {
        "device": "str",
        "*force": "bool",
        "*speed": "int",
        "*dirs": ["str"],
        "*on-error": "BlockdevOnError",
    }
    check_arguments({"device": "j", "force": False, "dirs": ["a"]}, members)
    with pytest.raises(QMPError, match="Parameter 'device' is missing"):
        check_arguments({}, members)
    with pytest.raises(QMPError, match="Parameter 'x' is unexpected"):
        check_arguments({"device": "j", "x": 1}, members)
    with pytest.raises(QMPError, match="Invalid parameter type for 'device', expected: string"):
        check_arguments({"device": 5}, members)
    with pytest.raises(QMPError, match="expected: integer"):
        check_arguments({"device": "j", "speed": True}, members)
    with pytest.raises(QMPError, match="expected: integer"):
        check_arguments({"device": "j", "speed": 1.5}, members)
    with pytest.raises(QMPError, match="expected: integer"):
        check_arguments({"device": "j", "speed": 1 << 63}, members)
    with pytest.raises(QMPError, match="expected: boolean"):
        check_arguments({"device": "j", "force": 1}, members)
    with pytest.raises(
        QMPError, match="Invalid parameter type for 'dirs\\[1\\]', expected: string"
    ):
        check_arguments({"device": "j", "dirs": ["a", 2]}, members)
    with pytest.raises(QMPError, match="Parameter 'on-error' does not accept value 'x'"):
        check_arguments({"device": "j", "on-error": "x"}, members)


# ------------------------------------------------------------------ socket path


def test_default_socket_path(tmp_path, monkeypatch):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    link = tmp_path / "link"
    link.symlink_to(mnt)
    digest = hashlib.sha256(os.fsencode(os.path.realpath(mnt))).hexdigest()[:16]
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    assert default_socket_path(mnt) == f"/run/user/4242/qcowfs/{digest}.sock"
    assert default_socket_path(link) == default_socket_path(str(mnt) + "/")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    assert default_socket_path(mnt) == f"/run/qcowfs/{digest}.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path(mnt) == f"/run/qcowfs/{digest}.sock"


def test_server_creates_parent_and_removes_stale_socket(tmp_path):
    path = tmp_path / "a" / "b" / "ctl.sock"
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening, then dropped: a stale socket
    stale.close()
    assert path.exists()
    with ServerThread(path):
        r = Raw(path, negotiate=True)
        assert r.execute("x-echo", {"k": "v"}) == {"return": {"k": "v"}}
        r.close()
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    assert not path.exists()

    fresh = tmp_path / "new" / "dir" / "ctl.sock"
    with ServerThread(fresh):
        assert fresh.exists()
        assert oct(os.stat(fresh.parent).st_mode & 0o777) == oct(0o700)


def test_server_refuses_live_socket_and_non_socket(tmp_path):
    path = tmp_path / "ctl.sock"
    with ServerThread(path):
        with pytest.raises(QcowError, match="in use by another process"):
            with ServerThread(path):
                pass
        assert path.exists()  # the live server's socket was not touched
        r = Raw(path, negotiate=True)
        assert r.execute("x-none") == {"return": {}}
        r.close()
    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    with pytest.raises(QcowError, match="not a socket"):
        with ServerThread(regular):
            pass
    assert regular.read_text() == "not a socket"


def test_long_socket_path(tmp_path):
    d = tmp_path
    while len(str(d)) < 150:
        d = d / "a-rather-long-directory-name"
    d.mkdir(parents=True)
    path = d / "ctl.sock"
    with ServerThread(path):
        assert qmp_call(path, "x-echo", {"n": 1}) == {"n": 1}
    assert not path.exists()


# ------------------------------------------------------------------ server, raw bytes


@pytest.fixture
def server(tmp_path):
    with ServerThread(tmp_path / "ctl.sock") as st:
        yield st


def test_raw_session_matches_qemu(server):
    r = Raw(server.socket_path)
    assert r.greeting["QMP"]["capabilities"] == []
    r.send(b'{"execute":"x-none","id":1}\n')
    assert r.line() == err(CNF, "Expecting capabilities negotiation with 'qmp_capabilities'", id=1)
    r.send(b'{"execute":"qmp_capabilities","id":"x"}\n')
    assert r.line() == {"return": {}, "id": "x"}
    for data, expected in QEMU_CASES:
        r.send(data)
        got = [r.line() for _ in expected]
        assert got == expected, data
    assert r.lines(0.2) == []  # nothing more than QEMU sends
    r.send(b'{"execute":"x-none","id":"end"}\n')
    assert r.line() == {"return": {}, "id": "end"}
    r.close()


def test_replies_end_with_crlf_and_commands_run_in_order(server):
    r = Raw(server.socket_path, negotiate=True)
    r.send(b'{"execute":"x-sleep","arguments":{"seconds":0.2},"id":1}{"execute":"x-none","id":2}\n')
    first = r.raw_line()
    assert first.endswith(b"\r\n")
    assert json.loads(first) == {"return": {}, "id": 1}
    assert r.line() == {"return": {}, "id": 2}
    r.close()


def test_handler_errors(server):
    r = Raw(server.socket_path, negotiate=True)
    assert r.execute("x-qcow-error", id=3) == err(
        GE, "/images/base.qcow2: is locked by another process", id=3
    )
    reply = r.execute("x-crash", id=4)
    assert reply["error"]["class"] == GE and "boom" in reply["error"]["desc"] and reply["id"] == 4
    assert r.execute("x-none", id=5) == {"return": {}, "id": 5}  # still serving
    r.close()


def test_query_version_and_commands(server):
    r = Raw(server.socket_path, negotiate=True)
    v = r.execute("query-version")["return"]
    assert v["package"].startswith("qcowfs") and set(v["qemu"]) == {"major", "minor", "micro"}
    names = {c["name"] for c in r.execute("query-commands")["return"]}
    assert {"qmp_capabilities", "query-block-jobs", "block-job-cancel", "x-echo"} <= names
    r.close()


def test_client_disconnects_do_not_disturb_others(server):
    a = Raw(server.socket_path, negotiate=True)
    for _ in range(5):
        b = Raw(server.socket_path)
        b.send(
            b'{"execute":"qmp_capabilities"}\n{"execute":"x-sleep","arguments":{"seconds":0.05}}\n'
        )
        b.close()  # gone before its replies
    half = socket.socket(socket.AF_UNIX)
    half.connect(server.socket_path)
    half.send(b'{"execute": "qmp_cap')  # and never finishes
    assert a.execute("x-echo", {"still": "here"}) == {"return": {"still": "here"}}
    half.close()
    a.close()


# ------------------------------------------------------------------ qemu.qmp client


def test_qemu_qmp_connects_and_executes(server):
    from qemu.qmp import ExecuteError

    async def body(q):
        g = q.greeting
        assert g.QMP.capabilities == []
        assert g.QMP.version["package"].startswith("qcowfs")
        assert set(g.QMP.version["qemu"]) == {"major", "minor", "micro"}
        assert await q.execute("x-echo", {"a": [1, 2]}) == {"a": [1, 2]}
        assert await q.execute("query-block-jobs") == []
        with pytest.raises(ExecuteError) as e:
            await q.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(e.value)
        with pytest.raises(ExecuteError) as e:
            await q.execute("x-qcow-error")
        assert e.value.error_class == "GenericError"
        # qemu.qmp's ids are echoed: a caller-chosen one too
        reply = await q.execute_msg(q.make_execute_msg("x-echo", {"z": 1}))
        assert reply == {"z": 1}
        return True

    assert qmp_session(server.socket_path, body)


def test_qemu_qmp_id_echo(server):
    async def body(q):
        msg = q.make_execute_msg("x-none")
        msg["id"] = "my-own-id"
        # `_raw` sends as-is and returns the whole reply
        reply = await q._raw(msg, assign_id=False)
        assert reply["id"] == "my-own-id" and reply["return"] == {}
        return True

    assert qmp_session(server.socket_path, body)


def test_several_clients_receive_every_event(server):
    import asyncio

    from qemu.qmp import QMPClient

    unnegotiated = Raw(server.socket_path)
    raw = Raw(server.socket_path, negotiate=True)

    async def main():
        clients = [QMPClient(f"c{i}") for i in range(3)]
        for c in clients:
            await c.connect(server.socket_path)
        try:
            for n in range(3):
                await clients[n % 3].execute("x-emit", {"event": "TEST_EVENT", "data": {"n": n}})
            await clients[0].execute("x-emit", {"event": "NO_DATA"})
            for c in clients:
                got = []
                for _ in range(4):
                    got.append(await asyncio.wait_for(c.events.get(), 5))
                assert [e["event"] for e in got] == ["TEST_EVENT"] * 3 + ["NO_DATA"]
                assert [e["data"]["n"] for e in got[:3]] == [0, 1, 2]
                assert "data" not in got[3]
                for e in got:
                    ts = e["timestamp"]
                    assert set(ts) == {"seconds", "microseconds"}
                    assert (
                        abs(ts["seconds"] - time.time()) < 60
                        and 0 <= ts["microseconds"] < 1_000_000
                    )
        finally:
            for c in clients:
                await c.disconnect()

    asyncio.run(main())
    evs = [m for m in raw.lines(0.3) if "event" in m]
    assert [e["event"] for e in evs] == ["TEST_EVENT"] * 3 + ["NO_DATA"]
    assert unnegotiated.lines(0.2) == []  # before qmp_capabilities: no events (QEMU)
    raw.close()
    unnegotiated.close()


def test_events_emitted_during_a_command_precede_its_reply(server):
    r = Raw(server.socket_path, negotiate=True)
    r.send(b'{"execute":"x-emit","arguments":{"event":"E"},"id":1}\n')
    first, second = r.line(), r.line()
    assert first["event"] == "E"
    assert second == {"return": {}, "id": 1}
    r.close()


# ------------------------------------------------------------------ blocking client


def test_blocking_client(server):
    assert qmp_call(server.socket_path, "x-echo", {"a": 1}) == {"a": 1}
    assert qmp_call(server.socket_path, "x-none") == {}
    with pytest.raises(QMPCallError) as e:
        qmp_call(server.socket_path, "nosuch", label="/mnt/disk")
    assert e.value.error_class == "CommandNotFound"
    assert str(e.value) == "/mnt/disk: The command nosuch has not been found"
    with pytest.raises(QMPCallError, match="is locked by another process"):
        qmp_call(server.socket_path, "x-qcow-error")


def test_blocking_client_keeps_events_sent_before_a_reply(server):
    value, conn = qmp_execute_and_follow(
        server.socket_path, "x-emit", {"event": "EARLY", "data": {"k": 1}}
    )
    with conn:
        assert value == {}
        ev = conn.next_event(timeout=5)
        assert ev["event"] == "EARLY" and ev["data"] == {"k": 1}
        assert conn.next_event(timeout=0.1) is None
        assert conn.execute("x-emit", {"event": "LATER"}) == {}
        assert [e["event"] for e in conn.events(timeout=0.2)] == ["LATER"]


def test_cli_talks_to_a_mount_without_loading_trio(server, tmp_path):
    """`qcowfs jobs` (as `commit --wait` and the other job commands) loads the blocking
    client only: neither trio nor the server, whose import is most of a CLI command's
    start-up time."""
    cp = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fusefs", "jobs", str(tmp_path)]
        + ["--control-socket", server.socket_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 0 and cp.stdout == "No jobs.\n", cp.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in cp.stderr.splitlines()}
    assert "fusefs.qmp.client" in loaded
    assert not loaded & {"trio", "fusefs.qmp.server", "fusefs.qmp.protocol"}, loaded


def test_blocking_client_errors(tmp_path):
    missing = tmp_path / "nothing.sock"
    with pytest.raises(
        QcowError, match=r"^/mnt/x: no qcowfs control socket answers at .*nothing\.sock"
    ):
        qmp_call(missing, "x-none", label="/mnt/x")
    # a server that closes the connection
    path = tmp_path / "closing.sock"
    greeting = (
        b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, '
        b'"package": ""}, "capabilities": []}}\r\n'
    )
    with _serving_once(path, lambda c: (c.sendall(greeting), c.recv(1000))):
        with pytest.raises(QcowError, match="the control socket closed the connection"):
            qmp_call(path, "x-none")


def test_blocking_client_against_garbage_server(tmp_path):
    path = tmp_path / "junk.sock"
    with _serving_once(path, lambda c: (c.sendall(b'{"hello": 1}\n'), time.sleep(0.2))):
        with pytest.raises(QcowError, match="does not speak QMP"):
            QMPConnection(path).connect()


@contextmanager
def _serving_once(path, serve):
    """A Unix socket at `path` whose first connection `serve(connection)` handles in a
    thread before it is closed."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        try:
            serve(conn)
        finally:
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        t.join(10)
        srv.close()


# ------------------------------------------------------------------ trio-level API


def test_serve_reports_started_and_cleans_up(tmp_path):
    path = tmp_path / "x" / "s.sock"
    seen = {}

    async def main():
        server = QMPServer(path, {})
        async with trio.open_nursery() as n:
            seen["started"] = await n.start(server.serve)
            seen["exists"] = path.exists()
            seen["serving"] = server.serving
            server.emit("NOBODY_LISTENS", {})  # no clients: fine
            n.cancel_scope.cancel()
        seen["after"] = path.exists()

    trio.run(main)
    assert seen == {"started": str(path), "exists": True, "serving": True, "after": False}


def test_flush_delivers_queued_messages(tmp_path):
    path = tmp_path / "s.sock"
    got = []

    async def main():
        server = QMPServer(path, {})
        async with trio.open_nursery() as n:
            await n.start(server.serve)

            def client():
                r = Raw(path, negotiate=True)
                got.append("ready")
                got.extend(m["event"] for m in r.lines(1.0))
                r.close()

            t = threading.Thread(target=client)
            t.start()
            while not got:
                await trio.sleep(0.01)
            await trio.sleep(0.05)
            for i in range(100):
                server.emit("BYE", {"i": i})
            await server.flush(timeout=5)
            n.cancel_scope.cancel()
        await trio.to_thread.run_sync(t.join)

    trio.run(main)
    assert got == ["ready"] + ["BYE"] * 100
