"""JobManager and JobContext under trio, in-process, on a mock clock (fast and exact):
speed limit, pause points, where cancels arrive, errors, one job at a time, shutdown."""

import errno

import pytest
import trio
import trio.testing
from test_qmp_support import (
    END_CANCELLED,
    END_COMPLETED,
    READY,
    START,
    TEST_SCHEMA,
    FakeJobs,
    MiB,
)

from commit.jobmanager import JobContext, JobManager
from commit.qapi import QMPError, check_arguments
from qcow.errors import JobError, QcowError


class Events:
    def __init__(self):
        self.log = []

    def __call__(self, event, data):
        self.log.append((event, data, trio.current_time()))

    def summary(self, job_id=None):
        out = []
        for e, d, _ in self.log:
            if job_id is not None and d.get("id", d.get("device")) != job_id:
                continue
            out.append(d["status"] if e == "JOB_STATUS_CHANGE" else e)
        return out

    def time_of(self, event, status=None):
        for e, d, t in self.log:
            if e == event and (status is None or d.get("status") == status):
                return t
        return None

    def data(self, event):
        return [d for e, d, _ in self.log if e == event]


def run_trio(fn, *args):
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def run_manager(body, factory=None):
    """`await body(jm, ev, cmds)` on the mock clock, with a running JobManager `jm`, the
    Events `ev` it emits to and its QMP commands `cmds`; then the manager is torn down
    (whatever job still runs is cancelled). Returns `ev`."""

    async def main():
        ev = Events()
        async with trio.open_nursery() as n:
            jm = JobManager(factory, emit=ev)
            await n.start(jm.run)
            await body(jm, ev, jm.commands())
            n.cancel_scope.cancel()
        return ev

    return run_trio(main)


async def wait_for(pred, step=0.01, limit=10_000):
    for _ in range(limit):
        if pred():
            return
        await trio.sleep(step)
    raise AssertionError("condition never became true")


def test_speed_limit_and_progress():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        t0 = trio.current_time()
        await cmds["block-commit"]({"job-id": "j", "x-steps": 16, "x-chunk": MiB, "speed": 4 * MiB})
        await jm.wait_idle()
        elapsed = trio.current_time() - t0
        # 16 MiB at 4 MiB/s: 4 s less the initial 0.1 s burst, give or take one chunk
        assert 3.6 <= elapsed <= 4.2, elapsed
        done = ev.data("BLOCK_JOB_COMPLETED")[0]
        assert done == {
            "device": "j",
            "len": 16 * MiB,
            "offset": 16 * MiB,
            "speed": 4 * MiB,
            "type": "commit",
        }
        assert ev.summary() == START + END_COMPLETED

    run_manager(body, fake.factory)


def test_set_speed_wakes_a_sleeping_job():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        await cmds["block-commit"]({"job-id": "j", "x-steps": 100, "x-chunk": MiB, "speed": 1})
        await trio.sleep(5)
        assert fake.outcomes["j"]["chunks"] == 1  # the first chunk put it deep in debt
        info = (await cmds["query-block-jobs"]({}))[0]
        assert info["busy"] is False and info["status"] == "running"
        t0 = trio.current_time()
        await cmds["block-job-set-speed"]({"device": "j", "speed": 0})
        await jm.wait_idle()
        assert trio.current_time() - t0 < 0.5
        assert ev.data("BLOCK_JOB_COMPLETED")[0]["speed"] == 0

    run_manager(body, fake.factory)


def test_pause_of_a_parked_job_is_immediate_and_holds():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        await cmds["block-commit"]({"job-id": "j", "x-steps": 8, "x-chunk": MiB, "speed": MiB})
        await trio.sleep(0.5)
        await cmds["block-job-pause"]({"device": "j"})
        # parked in the rate-limit wait: the status changed before the reply (as QEMU)
        assert ev.summary()[-1] == "paused"
        info = (await cmds["query-block-jobs"]({}))[0]
        assert info["paused"] is True and info["status"] == "paused" and info["busy"] is False
        chunks = fake.outcomes["j"]["chunks"]
        await trio.sleep(60)
        assert fake.outcomes["j"]["chunks"] == chunks  # nothing copied while paused
        with pytest.raises(QMPError) as e:
            await cmds["block-job-cancel"]({"device": "j"})
        assert e.value.desc == "The block job for device 'j' is currently paused"
        await cmds["block-job-resume"]({"device": "j"})
        assert ev.summary()[-1] == "running"
        await jm.wait_idle()
        assert ev.summary() == [*START, "paused", "running", *END_COMPLETED]

    run_manager(body, fake.factory)


def test_pause_of_a_busy_job_waits_for_its_next_checkpoint():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        await cmds["block-commit"]({"job-id": "j", "x-steps": 5, "x-work": 1.0})
        await trio.sleep(1.5)  # in the middle of the second chunk's work
        assert fake.outcomes["j"]["in_work"]
        await cmds["block-job-pause"]({"device": "j"})
        assert ev.summary()[-1] == "running"  # busy: not paused yet
        await trio.sleep(1.0)
        assert ev.summary()[-1] == "paused"
        assert fake.outcomes["j"]["chunks"] == 2
        await trio.sleep(30)
        assert fake.outcomes["j"]["chunks"] == 2
        await cmds["block-job-resume"]({"device": "j"})
        await jm.wait_idle()
        assert fake.outcomes["j"]["finished"]

    run_manager(body, fake.factory)


def test_force_cancel_arrives_at_a_checkpoint_not_mid_chunk():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        await cmds["block-commit"]({"job-id": "j", "x-steps": 10, "x-work": 1.0})
        await trio.sleep(2.5)
        assert fake.outcomes["j"]["in_work"]
        await cmds["block-job-cancel"]({"device": "j"})  # before ready: a force cancel
        await jm.wait_idle()
        out = fake.outcomes["j"]
        assert out["cancelled"] and not out["interrupted_work"] and not out["finished"]
        assert out["chunks"] == 3  # the chunk in flight finished, then the cancel hit
        assert ev.summary() == START + END_CANCELLED
        assert ev.data("BLOCK_JOB_CANCELLED")[0]["offset"] == 3 * MiB
        assert jm.get("j") is None

    run_manager(body, fake.factory)


def test_active_job_complete_soft_cancel_and_force_cancel():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        for job_id, action, decision, ending in (
            ("a1", ("block-job-complete", {}), "complete", "BLOCK_JOB_COMPLETED"),
            ("a2", ("block-job-cancel", {}), "cancel", "BLOCK_JOB_COMPLETED"),
            ("a3", ("block-job-cancel", {"force": True}), None, "BLOCK_JOB_CANCELLED"),
        ):
            await cmds["block-commit"]({"job-id": job_id, "x-steps": 3, "x-active": True})
            await wait_for(lambda job_id=job_id: jm.get(job_id).status == "ready")
            info = (await cmds["query-block-jobs"]({}))[0]
            assert info["ready"] is True and info["status"] == "ready" and info["busy"] is False
            with pytest.raises(JobError, match="already running on this chain"):
                await cmds["block-commit"]({"job-id": "other"})
            name, extra = action
            await cmds[name](dict(extra, device=job_id))
            await jm.wait_idle()
            assert fake.outcomes[job_id]["decision"] == decision
            s = ev.summary(job_id)
            assert s[:4] == START + READY
            if ending == "BLOCK_JOB_COMPLETED":
                assert s[4:] == END_COMPLETED
            else:
                assert s[4:] == END_CANCELLED

    run_manager(body, fake.factory)


def test_complete_during_standby_waits_for_resume():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        await cmds["block-commit"]({"job-id": "a", "x-steps": 2, "x-active": True})
        await wait_for(lambda: jm.get("a").status == "ready")
        await cmds["block-job-pause"]({"device": "a"})
        assert jm.get("a").status == "standby"
        await cmds["block-job-complete"]({"device": "a"})
        await cmds["block-job-complete"]({"device": "a"})  # QEMU accepts it twice
        await trio.sleep(10)
        assert jm.get("a").status == "standby" and fake.outcomes["a"]["decision"] is None
        await cmds["block-job-resume"]({"device": "a"})
        await jm.wait_idle()
        assert fake.outcomes["a"]["decision"] == "complete"
        assert ev.summary()[4:] == ["standby", "ready", *END_COMPLETED]

    run_manager(body, fake.factory)


@pytest.mark.parametrize(
    "fail,error,io_event",
    [
        ("oserror", "Input/output error", True),
        ("qcow", "/images/mid.qcow2: bad L2 table entry", False),
        ("bug", "internal error: a bug in the algorithm", False),
    ],
)
def test_errors_end_the_job(fail, error, io_event):
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        await cmds["block-commit"](
            {"job-id": "e", "x-steps": 5, "x-fail-at": 2, "x-fail": fail, "auto-dismiss": False}
        )
        await jm.wait_idle()
        expected = (
            START
            + (["BLOCK_JOB_ERROR"] if io_event else [])
            + ["aborting", "BLOCK_JOB_COMPLETED", "concluded"]
        )
        assert ev.summary() == expected
        if io_event:
            assert ev.data("BLOCK_JOB_ERROR") == [
                {"device": "e", "operation": "read", "action": "report"}
            ]
        done = ev.data("BLOCK_JOB_COMPLETED")[0]
        assert done["error"] == error and done["offset"] == 2 * MiB
        info = (await cmds["query-block-jobs"]({}))[0]
        assert info["status"] == "concluded" and info["error"] == error
        assert not jm.has_running_jobs()
        # a concluded job does not block a new one, but its id stays taken
        with pytest.raises(JobError, match="Job ID 'e' already in use"):
            await cmds["block-commit"]({"job-id": "e"})
        await cmds["job-dismiss"]({"id": "e"})
        assert await cmds["query-block-jobs"]({}) == []

    run_manager(body, fake.factory)


def test_error_inside_an_exception_group_and_tagged_operation():
    from commit.steps import io_error

    async def factory(args):
        async def run(ctx):
            ctx.set_len(10)

            async def fail():
                raise io_error("write", OSError(errno.ENOSPC, "No space left on device"))

            async with trio.open_nursery() as inner:  # trio wraps it in an ExceptionGroup
                inner.start_soon(fail)

        return "g", "commit", run, {}

    async def body(jm, ev, cmds):
        await cmds["block-commit"]({})
        await jm.wait_idle()
        assert ev.data("BLOCK_JOB_ERROR") == [
            {"device": "g", "operation": "write", "action": "report"}
        ]
        assert ev.data("BLOCK_JOB_COMPLETED")[0]["error"] == "No space left on device"

    run_manager(body, factory)


def test_block_commit_arguments():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        handler = cmds["block-commit"]

        async def bc(args):  # as the control socket calls it: the schema first
            check_arguments(args, TEST_SCHEMA["block-commit"])
            return await handler(args)

        for args, message in (
            ({"speed": -1}, "Parameter 'speed' expects a non-negative value"),
            ({"speed": "fast"}, "Invalid parameter type for 'speed', expected: integer"),
            ({"auto-finalize": False}, "auto-finalize=false is not supported"),
            ({"on-error": "stop"}, "on-error=stop is not supported"),
            ({"on-error": "bogus"}, "Parameter 'on-error' does not accept value 'bogus'"),
            ({"x-unknown": 1}, "Parameter 'x-unknown' is unexpected"),
            ({"job-id": "1bad"}, "Invalid job ID '1bad'"),
        ):
            with pytest.raises((QMPError, QcowError)) as e:
                await bc(args)
            assert message in str(e.value), (args, str(e.value))
        with pytest.raises(QcowError, match="is not an image of this chain"):
            await bc({"x-refuse": True})
        assert ev.log == []  # nothing started
        await bc({"job-id": "ok", "on-error": "report", "auto-finalize": True, "x-steps": 1})
        await jm.wait_idle()
        assert ev.summary()[-1] == "null"

    run_manager(body, fake.factory)


def test_unknown_ids():
    async def body(jm, ev, cmds):
        assert "block-commit" not in cmds  # no factory, no block-commit
        for name in (
            "block-job-cancel",
            "block-job-pause",
            "block-job-resume",
            "block-job-complete",
        ):
            with pytest.raises(QMPError) as e:
                await cmds[name]({"device": "nope"})
            assert (e.value.cls, e.value.desc) == (
                "DeviceNotActive",
                "Block job 'nope' not found",
            )
        with pytest.raises(QMPError) as e:
            await cmds["block-job-set-speed"]({"device": "nope", "speed": 1})
        assert e.value.cls == "DeviceNotActive"
        for name in ("job-dismiss", "job-cancel", "job-pause", "job-resume", "job-complete"):
            with pytest.raises(QMPError) as e:
                await cmds[name]({"id": "nope"})
            assert (e.value.cls, e.value.desc) == ("GenericError", "Job not found")
        # argument faults are the schema's (the control socket checks it first)
        with pytest.raises(QMPError, match="Parameter 'device' is missing"):
            check_arguments({}, TEST_SCHEMA["block-job-cancel"])
        with pytest.raises(QMPError, match="Invalid parameter type for 'device', expected: string"):
            check_arguments({"device": 5}, TEST_SCHEMA["block-job-cancel"])

    run_manager(body)


def test_cancel_all_and_grace():
    async def stubborn_factory(args):
        async def run(ctx):
            ctx.set_len(1)
            await trio.sleep(1e6)  # never reaches a checkpoint

        return args.get("job-id", "s"), "commit", run, {}

    fake = FakeJobs()

    async def body(jm, ev, cmds):
        await cmds["block-commit"]({"job-id": "a", "x-active": True, "x-steps": 1})
        await wait_for(lambda: jm.get("a").status == "ready")
        await cmds["block-job-pause"]({"device": "a"})
        assert jm.has_running_jobs()
        await jm.cancel_all()
        assert not jm.has_running_jobs()
        assert ev.summary("a")[-4:] == END_CANCELLED

        jm.commit_factory = stubborn_factory
        await cmds["block-commit"]({"job-id": "s"})
        await trio.sleep(1)
        t0 = trio.current_time()
        await jm.cancel_all(grace=5)
        assert 5 <= trio.current_time() - t0 < 6
        assert ev.summary("s")[-4:] == END_CANCELLED

    run_manager(body, fake.factory)


def test_manager_torn_down_with_a_running_job():
    fake = FakeJobs()

    async def body(jm, ev, cmds):
        await cmds["block-commit"]({"job-id": "t", "x-steps": 100, "speed": MiB})
        await trio.sleep(1)

    ev = run_manager(body, fake.factory)
    assert ev.summary()[-4:] == END_CANCELLED
    assert fake.outcomes["t"]["cancelled"]


def test_without_run_jobs_run_as_system_tasks():
    fake = FakeJobs()
    ev = Events()

    async def main():
        jm = JobManager(fake.factory, emit=ev)
        await jm.commands()["block-commit"]({"job-id": "sys", "x-steps": 3})
        await jm.wait_idle()

    run_trio(main)
    assert ev.summary()[-1] == "null" and fake.outcomes["sys"]["finished"]


def test_start_job_directly_and_query_order():
    async def body(jm, ev, cmds):

        async def quick(ctx):
            assert isinstance(ctx, JobContext)
            job = ctx.job
            assert job.id == "first" and job.speed == 7 and not job.should_pause
            assert not job.paused and not ctx.ready
            ctx.set_len(15)
            await ctx.progress(15)
            assert (job.len, job.offset) == (15, 15)
            await ctx.checkpoint()
            assert ctx.poll_completion_request() is None

        job = jm.start_job("first", "commit", quick, speed=7, auto_dismiss=False)
        assert job.status == "running"  # created and running emitted before start_job returns
        assert ev.summary() == START
        await jm.wait_idle()

        async def second(ctx):
            await trio.sleep_forever()

        jm.start_job("second", "commit", second)
        infos = await cmds["query-block-jobs"]({})
        assert [i["device"] for i in infos] == ["second", "first"]  # newest first, as QEMU
        jobs = await cmds["query-jobs"]({})
        assert jobs[1] == {
            "id": "first",
            "type": "commit",
            "status": "concluded",
            "current-progress": 15,
            "total-progress": 15,
        }
        await cmds["job-cancel"]({"id": "second"})
        await jm.cancel_all(grace=1)

    run_manager(body)
