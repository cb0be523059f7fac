"""Job commands over the control socket, driven by the real `qemu.qmp` client, with
fake-but-real jobs (the real JobManager/JobContext; the run copies nothing but calls
ctx.progress in steps). Event orders and error texts are qemu-storage-daemon 7.2's,
recorded with the same commands on a real chain."""

import asyncio

import pytest
from test_qmp_support import (
    BLOCK_JOB_INFO_FIELDS,
    END_CANCELLED,
    END_COMPLETED,
    READY,
    START,
    FakeJobs,
    MiB,
    Raw,
    ServerThread,
    events_until,
    qmp_session,
    status_null,
    summarize,
)


@pytest.fixture
def fake():
    return FakeJobs()


@pytest.fixture
def server(tmp_path, fake):
    with ServerThread(tmp_path / "ctl.sock", fake.factory) as st:
        yield st


def run(server, body):
    return qmp_session(server.socket_path, body)


async def wait_status(q, job_id, status, timeout=10.0):
    return await events_until(
        q,
        lambda ev: (
            ev["event"] == "JOB_STATUS_CHANGE" and ev["data"] == {"status": status, "id": job_id}
        ),
        timeout,
    )


def test_non_active_commit_sequence_and_query(server):
    async def body(q):
        assert (
            await q.execute("block-commit", {"job-id": "j1", "x-steps": 8, "speed": 8 * MiB}) == {}
        )
        await asyncio.sleep(0.1)  # len is set by the job once it runs (as in QEMU)
        info = await q.execute("query-block-jobs")
        assert len(info) == 1
        j = info[0]
        assert set(j) == set(BLOCK_JOB_INFO_FIELDS)
        assert (j["type"], j["device"], j["len"], j["speed"], j["status"]) == (
            "commit",
            "j1",
            8 * MiB,
            8 * MiB,
            "running",
        )
        assert (j["paused"], j["ready"], j["io-status"], j["auto-finalize"], j["auto-dismiss"]) == (
            False,
            False,
            "ok",
            True,
            True,
        )
        evs = await events_until(q, status_null("j1"))
        assert summarize(evs) == START + END_COMPLETED
        done = [e for e in evs if e["event"] == "BLOCK_JOB_COMPLETED"][0]
        assert done["data"] == {
            "device": "j1",
            "len": 8 * MiB,
            "offset": 8 * MiB,
            "speed": 8 * MiB,
            "type": "commit",
        }
        assert set(done["timestamp"]) == {"seconds", "microseconds"}
        assert await q.execute("query-block-jobs") == []
        return True

    assert run(server, body)


def test_pause_resume_set_speed(server, fake):
    from qemu.qmp import ExecuteError

    async def body(q):
        await q.execute("block-commit", {"job-id": "j1", "x-steps": 40, "speed": 4 * MiB})
        await wait_status(q, "j1", "running")
        await asyncio.sleep(0.3)
        await q.execute("block-job-pause", {"device": "j1"})
        await wait_status(q, "j1", "paused")
        j = (await q.execute("query-block-jobs"))[0]
        assert (j["status"], j["paused"], j["busy"]) == ("paused", True, False)
        chunks = fake.outcomes["j1"]["chunks"]
        await asyncio.sleep(0.5)
        assert fake.outcomes["j1"]["chunks"] == chunks
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-pause", {"device": "j1"})
        assert str(e.value) == "Job is already paused"
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-cancel", {"device": "j1"})
        assert str(e.value) == "The block job for device 'j1' is currently paused"
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-complete", {"device": "j1"})
        assert str(e.value) == "Job 'j1' in state 'paused' cannot accept command verb 'complete'"
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-set-speed", {"device": "j1", "speed": -1})
        assert str(e.value) == "Parameter 'speed' expects a non-negative value"
        await q.execute("block-job-set-speed", {"device": "j1", "speed": 64 * MiB})
        assert (await q.execute("query-block-jobs"))[0]["speed"] == 64 * MiB
        await q.execute("block-job-resume", {"device": "j1"})
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-resume", {"device": "j1"})
        assert str(e.value) == "Can't resume a job that was not paused"
        evs = await events_until(q, status_null("j1"))
        assert summarize(evs) == ["running", *END_COMPLETED]
        assert evs[3]["data"]["speed"] == 64 * MiB
        return True

    assert run(server, body)


def test_cancel_before_ready_and_force_cancel_of_paused(server, fake):
    async def body(q):
        await q.execute("block-commit", {"job-id": "c1", "x-steps": 50, "speed": 2 * MiB})
        await asyncio.sleep(0.2)
        await q.execute("block-job-cancel", {"device": "c1"})
        evs = await events_until(q, status_null("c1"))
        assert summarize(evs) == START + END_CANCELLED
        assert "error" not in evs[3]["data"] and evs[3]["data"]["device"] == "c1"
        assert fake.outcomes["c1"]["cancelled"]

        await q.execute("block-commit", {"job-id": "c2", "x-steps": 50, "speed": 2 * MiB})
        await q.execute("block-job-pause", {"device": "c2"})
        await wait_status(q, "c2", "paused")
        await q.execute("block-job-cancel", {"device": "c2", "force": True})
        evs = await events_until(q, status_null("c2"))
        assert summarize(evs) == ["running", *END_CANCELLED]
        return True

    assert run(server, body)


def test_active_commit_complete(server, fake):
    async def body(q):
        await q.execute("block-commit", {"job-id": "a1", "x-steps": 4, "x-active": True})
        evs = await events_until(q, lambda e: e["event"] == "BLOCK_JOB_READY")
        assert summarize(evs) == START + READY
        assert evs[-1]["data"] == {
            "device": "a1",
            "len": 4 * MiB,
            "offset": 4 * MiB,
            "speed": 0,
            "type": "commit",
        }
        j = (await q.execute("query-block-jobs"))[0]
        assert (j["status"], j["ready"]) == ("ready", True)
        await q.execute("block-job-pause", {"device": "a1"})
        await wait_status(q, "a1", "standby")
        j = (await q.execute("query-block-jobs"))[0]
        assert (j["status"], j["ready"], j["paused"]) == ("standby", True, True)
        await q.execute("block-job-resume", {"device": "a1"})
        await wait_status(q, "a1", "ready")
        await q.execute("block-job-complete", {"device": "a1"})
        evs = await events_until(q, status_null("a1"))
        assert summarize(evs) == END_COMPLETED
        assert fake.outcomes["a1"]["decision"] == "complete"
        return True

    assert run(server, body)


def test_active_commit_soft_and_force_cancel_after_ready(server, fake):
    async def body(q):
        await q.execute("block-commit", {"job-id": "k1", "x-steps": 2, "x-active": True})
        await events_until(q, lambda e: e["event"] == "BLOCK_JOB_READY")
        await q.execute("block-job-cancel", {"device": "k1"})
        evs = await events_until(q, status_null("k1"))
        # QEMU: a soft cancel after READY completes without a pivot
        assert summarize(evs) == END_COMPLETED
        assert "error" not in evs[2]["data"]
        assert fake.outcomes["k1"]["decision"] == "cancel"

        await q.execute("block-commit", {"job-id": "k2", "x-steps": 2, "x-active": True})
        await events_until(q, lambda e: e["event"] == "BLOCK_JOB_READY")
        await q.execute("block-job-cancel", {"device": "k2", "force": True})
        evs = await events_until(q, status_null("k2"))
        assert summarize(evs) == END_CANCELLED
        assert fake.outcomes["k2"]["cancelled"] and fake.outcomes["k2"]["decision"] is None
        return True

    assert run(server, body)


def test_io_error_and_manual_dismiss(server):
    async def body(q):
        await q.execute(
            "block-commit", {"job-id": "e1", "x-steps": 5, "x-fail-at": 2, "auto-dismiss": False}
        )
        evs = await wait_status(q, "e1", "concluded")
        assert summarize(evs) == [
            *START,
            "BLOCK_JOB_ERROR",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
        ]
        assert evs[2]["data"] == {"device": "e1", "operation": "read", "action": "report"}
        assert evs[4]["data"]["error"] == "Input/output error"
        j = (await q.execute("query-block-jobs"))[0]
        assert (j["status"], j["error"], j["auto-dismiss"]) == (
            "concluded",
            "Input/output error",
            False,
        )
        jobs = await q.execute("query-jobs")
        assert jobs == [
            {
                "id": "e1",
                "type": "commit",
                "status": "concluded",
                "current-progress": 2 * MiB,
                "total-progress": 5 * MiB,
                "error": "Input/output error",
            }
        ]
        await q.execute("job-dismiss", {"id": "e1"})
        evs = await wait_status(q, "e1", "null")
        assert await q.execute("query-block-jobs") == []
        return True

    assert run(server, body)


def test_errors_for_unknown_jobs_and_conflicts(server):
    from qemu.qmp import ExecuteError

    async def body(q):
        for name in (
            "block-job-cancel",
            "block-job-pause",
            "block-job-resume",
            "block-job-complete",
        ):
            with pytest.raises(ExecuteError) as e:
                await q.execute(name, {"device": "nope"})
            assert e.value.error_class == "DeviceNotActive"
            assert str(e.value) == "Block job 'nope' not found"
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-set-speed", {"device": "nope", "speed": 1})
        assert e.value.error_class == "DeviceNotActive"
        with pytest.raises(ExecuteError) as e:
            await q.execute("job-dismiss", {"id": "nope"})
        assert (e.value.error_class, str(e.value)) == ("GenericError", "Job not found")
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-cancel", {})
        assert (e.value.error_class, str(e.value)) == (
            "GenericError",
            "Parameter 'device' is missing",
        )
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-cancel", {"device": 5})
        assert str(e.value) == "Invalid parameter type for 'device', expected: string"
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-commit", {"x-refuse": True})
        assert (e.value.error_class, str(e.value)) == (
            "GenericError",
            "/images/top.qcow2: is not an image of this chain",
        )

        await q.execute("block-commit", {"job-id": "one", "x-steps": 1000, "speed": MiB})
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-commit", {"job-id": "two"})
        assert e.value.error_class == "GenericError"
        assert "job 'one' is already running on this chain" in str(e.value)
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-complete", {"device": "one"})
        assert str(e.value) == "Job 'one' in state 'running' cannot accept command verb 'complete'"
        await q.execute("block-job-cancel", {"device": "one"})
        await events_until(q, status_null("one"))
        # now a second job may start
        await q.execute("block-commit", {"job-id": "two", "x-steps": 1})
        await events_until(q, status_null("two"))
        return True

    assert run(server, body)


def test_job_events_reach_every_client(server):
    from qemu.qmp import QMPClient

    raw = Raw(server.socket_path, negotiate=True)

    async def main():
        a, b = QMPClient("a"), QMPClient("b")
        await a.connect(server.socket_path)
        await b.connect(server.socket_path)
        try:
            await a.execute("block-commit", {"job-id": "m", "x-steps": 3})
            ea = await events_until(a, status_null("m"))
            eb = await events_until(b, status_null("m"))
            assert summarize(ea) == summarize(eb) == START + END_COMPLETED
            assert [e["timestamp"] for e in ea] == [e["timestamp"] for e in eb]
        finally:
            await a.disconnect()
            await b.disconnect()

    asyncio.run(main())
    got = [m for m in raw.lines(0.3) if "event" in m]
    assert summarize(got) == START + END_COMPLETED
    raw.close()


def test_status_changes_precede_the_reply_like_qemu(server):
    """QEMU sends created/running before block-commit's reply, and the paused/running
    change of a parked job before block-job-pause/resume's reply."""
    r = Raw(server.socket_path, negotiate=True)
    r.send(
        b'{"execute":"block-commit","arguments":{"job-id":"o","x-steps":1000,"speed":1048576},"id":1}\n'
    )
    msgs = [r.line() for _ in range(3)]
    assert [m.get("event") for m in msgs[:2]] == ["JOB_STATUS_CHANGE"] * 2
    assert msgs[2] == {"return": {}, "id": 1}
    import time

    time.sleep(0.3)
    r.send(b'{"execute":"block-job-pause","arguments":{"device":"o"},"id":2}\n')
    first, second = r.line(), r.line()
    assert first["data"] == {"status": "paused", "id": "o"} and second == {"return": {}, "id": 2}
    r.send(b'{"execute":"block-job-resume","arguments":{"device":"o"},"id":3}\n')
    first, second = r.line(), r.line()
    assert first["data"] == {"status": "running", "id": "o"} and second == {"return": {}, "id": 3}
    r.send(b'{"execute":"block-job-cancel","arguments":{"device":"o"},"id":4}\n')
    rest = r.lines(0.5)
    assert {"return": {}, "id": 4} in rest
    assert summarize([m for m in rest if "event" in m]) == END_CANCELLED
    r.close()
