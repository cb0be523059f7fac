"""Helpers for the control-socket and job tests (imported by test_qmp*.py and
test_job*.py), plus a few tests of the helpers themselves.

- `ServerThread`: a real trio `QMPServer` + `JobManager` on a Unix socket, in a thread.
- `FakeJobs`: a block-commit factory whose jobs copy nothing but call `ctx.progress` in
  steps (the real JobContext, rate limiter, pause, cancel and ready machinery).
- `Raw`: a raw-socket client, to see the bytes QEMU's clients would see.
- `qmp_session()`: run an async function against the server with the real `qemu.qmp`.
- `qmp_call()`, `qmp_execute_and_follow()`: one command through the product's blocking
  client (`fusefs.qmp.QMPConnection`).
"""

import asyncio
import errno
import json
import os
import socket
import threading
import time

import trio

from commit.jobmanager import JobManager
from commit.qapi import SCHEMA, QMPError
from fusefs.qmp import QMPConnection, QMPServer
from qcow.errors import QcowError

MiB = 1 << 20

# The real schema plus the test commands below (None: takes any arguments) and
# FakeJobs' block-commit extensions.
TEST_SCHEMA = dict(
    SCHEMA,
    **{
        "x-emit": {"event": "str", "*data": "any"},
        "x-echo": None,
        "x-qcow-error": {},
        "x-crash": {},
        "x-sleep": {"*seconds": "number"},
        "x-none": None,
        "block-commit": dict(
            SCHEMA["block-commit"],
            **{
                "*x-steps": "int",
                "*x-chunk": "int",
                "*x-active": "bool",
                "*x-fail-at": "int",
                "*x-fail": "str",
                "*x-work": "number",
                "*x-refuse": "bool",
            },
        ),
    },
)


# QEMU's job event orders (recorded from qemu-storage-daemon 7.2) in the summaries the
# tests take: a JOB_STATUS_CHANGE as its status, any other event as its name.
START = ["created", "running"]
READY = ["ready", "BLOCK_JOB_READY"]
END_COMPLETED = ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
END_CANCELLED = ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


def statuses_only(order):
    """An event order without its events: the JOB_STATUS_CHANGE statuses alone."""
    return [s for s in order if s.islower()]


# query-block-jobs' BlockJobInfo members, in QEMU's order.
BLOCK_JOB_INFO_FIELDS = [
    "type",
    "device",
    "len",
    "offset",
    "busy",
    "paused",
    "speed",
    "io-status",
    "ready",
    "status",
    "auto-finalize",
    "auto-dismiss",
]


class FakeJobs:
    """A block-commit factory for fake-but-real jobs.

    Arguments (besides job-id/device): x-steps, x-chunk (bytes per progress call),
    x-active (go READY, then wait for complete/cancel), x-fail-at (step index),
    x-fail ('oserror' | 'qcow' | 'bug'), x-work (seconds of uninterruptible "work"
    before each progress call), x-refuse (the factory refuses the request).
    `outcomes[job_id]` records what the run saw.
    """

    def __init__(self):
        self.outcomes = {}

    def factory(self, args):
        args = dict(args)
        job_id = args.pop("job-id", "commit")
        args.pop("device", None)
        steps = args.pop("x-steps", 10)
        chunk = args.pop("x-chunk", MiB)
        active = args.pop("x-active", False)
        fail_at = args.pop("x-fail-at", None)
        fail = args.pop("x-fail", "oserror")
        work = args.pop("x-work", 0.0)
        if args.pop("x-refuse", False):
            raise QcowError("/images/top.qcow2", "is not an image of this chain")
        for key in args:
            raise QMPError("GenericError", f"Parameter '{key}' is unexpected")
        record = self.outcomes[job_id] = {
            "chunks": 0,
            "decision": None,
            "cancelled": False,
            "finished": False,
            "in_work": False,
            "interrupted_work": False,
        }

        async def run(ctx):
            try:
                ctx.set_len(steps * chunk)
                for i in range(steps):
                    if fail_at == i:
                        if fail == "oserror":
                            raise OSError(errno.EIO, os.strerror(errno.EIO))
                        if fail == "qcow":
                            raise QcowError("/images/mid.qcow2", "bad L2 table entry")
                        raise RuntimeError("a bug in the algorithm")
                    if work:
                        record["in_work"] = True
                        try:
                            await trio.sleep(work)  # not a ctx point: must not be interrupted
                        except trio.Cancelled:
                            record["interrupted_work"] = True
                            raise
                        record["in_work"] = False
                    record["chunks"] += 1
                    await ctx.progress(chunk)
                if active:
                    await ctx.transition_to_ready()
                    record["decision"] = await ctx.wait_for_completion_request()
                record["finished"] = True
            except trio.Cancelled:
                record["cancelled"] = True
                raise

        return job_id, "commit", run, {}


class ServerThread:
    """QMPServer + JobManager running under trio in a background thread."""

    def __init__(self, socket_path, factory=None, extra_commands=None):
        self.socket_path = str(socket_path)
        self.factory = factory
        self.extra_commands = extra_commands or {}
        self.manager = None
        self.server = None
        self._token = None
        self._stop = None
        self._started = threading.Event()
        self._error = None
        self._thread = None

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("server thread did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc):
        self.stop()

    def _run(self):
        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                e = e.exceptions[0]
            self._error = e
            self._started.set()

    async def _main(self):
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.manager = JobManager(self.factory)
            commands = dict(self.manager.commands())
            commands.update(self._builtin_commands())
            commands.update(self.extra_commands)
            self.server = QMPServer(self.socket_path, commands, schema=TEST_SCHEMA)
            self.manager.emit = self.server.emit
            await nursery.start(self.manager.run)
            await nursery.start(self.server.serve)
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _builtin_commands(self):
        async def x_emit(args):
            self.server.emit(args["event"], args.get("data"))

        async def x_echo(args):
            return args

        async def x_qcow_error(args):
            raise QcowError("/images/base.qcow2", "is locked by another process")

        async def x_crash(args):
            raise RuntimeError("boom")

        async def x_sleep(args):
            await trio.sleep(args.get("seconds", 0.1))

        async def x_none(args):
            return None

        return {
            "x-emit": x_emit,
            "x-echo": x_echo,
            "x-qcow-error": x_qcow_error,
            "x-crash": x_crash,
            "x-sleep": x_sleep,
            "x-none": x_none,
        }

    def run_sync(self, fn, *args):
        """Call fn(*args) in the trio thread; return its result."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stop(self):
        if self._thread is None:
            return
        if self._token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)
        self._thread = None


class Raw:
    """A raw-socket QMP client: send bytes, read reply lines (dicts)."""

    def __init__(self, path, *, negotiate=False, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = b""
        self.greeting_line = self.raw_line(timeout)
        self.greeting = json.loads(self.greeting_line)
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}\n')
            assert self.line() == {"return": {}}

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def raw_line(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def line(self, timeout=5.0):
        raw = self.raw_line(timeout)
        return None if raw is None else json.loads(raw)

    def lines(self, quiet=0.3):
        """Every line until nothing arrives for `quiet` seconds."""
        out = []
        while True:
            msg = self.line(quiet)
            if msg is None:
                return out
            out.append(msg)

    def drain(self, payload, timeout=30.0):
        """Send `payload`, close our sending side, and return every raw line the server
        sends until it closes the connection (a dropped client gets what it got)."""
        try:
            self.sock.sendall(payload)
            self.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.sock.settimeout(timeout)
        data = self.buf
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        self.buf = b""
        return [line for line in data.split(b"\n") if line.strip()]

    def execute(self, command, arguments=None, id=None):
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        if id is not None:
            msg["id"] = id
        self.send(json.dumps(msg) + "\n")
        while True:
            reply = self.line()
            assert reply is not None, f"no reply to {command}"
            if "event" not in reply:
                return reply


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


def qmp_session(path, body, timeout=30.0):
    """asyncio.run(body(qmp)) with a connected qemu.qmp QMPClient."""
    from qemu.qmp import QMPClient

    async def main():
        qmp = QMPClient("test")
        await qmp.connect(str(path))
        try:
            return await asyncio.wait_for(body(qmp), timeout)
        finally:
            await qmp.disconnect()

    return asyncio.run(main())


async def events_until(qmp, stop, timeout=10.0):
    """Collect qemu.qmp events until stop(event) is true (inclusive)."""
    got = []
    while True:
        ev = await asyncio.wait_for(qmp.events.get(), timeout)
        got.append(ev)
        if stop(ev):
            return got


def status_null(job_id):
    return lambda ev: (
        ev["event"] == "JOB_STATUS_CHANGE" and ev["data"] == {"status": "null", "id": job_id}
    )


def summarize(events):
    """Events as compact tuples: ('status', s) or (EVENT_NAME,)."""
    out = []
    for ev in events:
        if ev["event"] == "JOB_STATUS_CHANGE":
            out.append(ev["data"]["status"])
        else:
            out.append(ev["event"])
    return out


# ---------------------------------------------------------------- self-tests


def test_server_thread_starts_and_stops(tmp_path):
    path = tmp_path / "s.sock"
    with ServerThread(path):
        assert path.exists()
        r = Raw(path, negotiate=True)
        assert r.execute("x-echo", {"a": 1}) == {"return": {"a": 1}}
        r.close()
    assert not path.exists()  # removed on exit


def test_fake_job_runs_to_the_end(tmp_path):
    fake = FakeJobs()
    with ServerThread(tmp_path / "s.sock", fake.factory) as st:
        r = Raw(st.socket_path, negotiate=True)
        assert r.execute("block-commit", {"job-id": "j", "x-steps": 3}) == {"return": {}}
        deadline = time.monotonic() + 10
        while not fake.outcomes["j"]["finished"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert fake.outcomes["j"]["chunks"] == 3
        r.close()
