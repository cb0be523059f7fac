"""The job state machine and the rate limiter, sans-I/O (fast: no trio, no clock).

The expected event orders (test_qmp_support) and the transition table below are those
recorded from qemu-storage-daemon 7.2.
"""

import pytest
from test_qmp_support import BLOCK_JOB_INFO_FIELDS, END_CANCELLED, END_COMPLETED, READY, START

from commit.job import (
    FINISHED,
    STATUSES,
    TRANSITIONS,
    VERBS,
    Job,
    JobCommandError,
    JobStateError,
    error_message,
    id_wellformed,
)
from commit.ratelimit import RateLimiter
from commit.steps import io_error


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event, data):
        self.events.append((event, data))

    def summary(self):
        return [d["status"] if e == "JOB_STATUS_CHANGE" else e for e, d in self.events]

    def clear(self):
        self.events.clear()


def new_job(**kw):
    rec = Recorder()
    job = Job("j1", "commit", emit=rec, **kw)
    return job, rec


# QEMU's JobSTT, rows U C R P Y S W D X E N (job.c)
QEMU_STT = {
    "undefined": "0 1 0 0 0 0 0 0 0 0 0",
    "created": "0 0 1 0 0 0 0 0 1 0 1",
    "running": "0 0 0 1 1 0 1 0 1 0 0",
    "paused": "0 0 1 0 0 0 0 0 0 0 0",
    "ready": "0 0 0 0 0 1 1 0 1 0 0",
    "standby": "0 0 0 0 1 0 0 0 0 0 0",
    "waiting": "0 0 0 0 0 0 0 1 1 0 0",
    "pending": "0 0 0 0 0 0 0 0 1 1 0",
    "aborting": "0 0 0 0 0 0 0 0 1 1 0",
    "concluded": "0 0 0 0 0 0 0 0 0 0 1",
    "null": "0 0 0 0 0 0 0 0 0 0 0",
}
QEMU_VERBS = {
    "cancel": "0 1 1 1 1 1 1 1 0 0 0",
    "pause": "0 1 1 1 1 1 0 0 0 0 0",
    "resume": "0 1 1 1 1 1 0 0 0 0 0",
    "set-speed": "0 1 1 1 1 1 0 0 0 0 0",
    "complete": "0 0 0 0 1 1 0 0 0 0 0",
    "finalize": "0 0 0 0 0 0 0 1 0 0 0",
    "dismiss": "0 0 0 0 0 0 0 0 0 1 0",
    "change": "0 1 1 1 1 1 0 0 0 0 0",
}


def test_tables_are_qemus():
    for s0, row in QEMU_STT.items():
        allowed = {STATUSES[i] for i, bit in enumerate(row.split()) if bit == "1"}
        assert TRANSITIONS[s0] == allowed, s0
    for verb, row in QEMU_VERBS.items():
        allowed = {STATUSES[i] for i, bit in enumerate(row.split()) if bit == "1"}
        assert VERBS[verb] == allowed, verb


def test_illegal_transition_is_a_bug():
    job, _ = new_job()
    with pytest.raises(JobStateError):
        job.transition_to_ready()  # created -> ready is not in the table
    job.start()
    job.finished()
    with pytest.raises(JobStateError):
        job.start()


def test_non_active_success_sequence():
    job, rec = new_job(speed=123)
    job.start()
    job.len = 100
    job.offset = 100
    job.finished()
    assert rec.summary() == START + END_COMPLETED
    assert rec.events[0] == ("JOB_STATUS_CHANGE", {"status": "created", "id": "j1"})
    assert rec.events[4][1] == {
        "device": "j1",
        "len": 100,
        "offset": 100,
        "speed": 123,
        "type": "commit",
    }
    assert job.status == "null" and job.error is None


def test_active_complete_sequence():
    job, rec = new_job()
    job.start()
    job.transition_to_ready()
    assert job.ready
    job.user_complete()
    assert job.completion_requested
    job.finished()
    assert rec.summary() == START + READY + END_COMPLETED


def test_soft_cancel_after_ready_completes_without_error():
    job, rec = new_job()
    job.start()
    job.transition_to_ready()
    job.user_cancel(force=False)
    assert job.cancelled and not job.force_cancel
    job.finished()  # the algorithm returns normally (no pivot)
    assert rec.summary()[-5:] == END_COMPLETED
    assert "error" not in rec.events[-3][1]


def test_cancel_before_ready_is_forced():
    job, rec = new_job()
    job.start()
    job.user_cancel(force=False)
    assert job.force_cancel
    job.finished(cancelled=True)
    assert rec.summary() == START + END_CANCELLED
    assert "error" not in rec.events[3][1]


def test_force_cancel_after_ready():
    job, rec = new_job()
    job.start()
    job.transition_to_ready()
    job.user_cancel(force=True)
    job.finished(cancelled=True)
    assert rec.summary()[-4:] == END_CANCELLED


def test_io_error_sequence():
    job, rec = new_job()
    job.start()
    job.offset = 7
    job.report_io_error("write")
    job.finished(error="Input/output error")
    assert rec.summary() == [
        *START,
        "BLOCK_JOB_ERROR",
        "aborting",
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
    ]
    assert rec.events[2][1] == {"device": "j1", "operation": "write", "action": "report"}
    assert rec.events[4][1]["error"] == "Input/output error"
    assert rec.events[4][1]["offset"] == 7


def test_auto_dismiss_false_stops_at_concluded():
    job, rec = new_job(auto_dismiss=False)
    job.start()
    job.user_cancel()
    job.finished(cancelled=True)
    assert job.status == "concluded"
    info = job.info()
    assert info["error"] == "Operation canceled" and info["status"] == "concluded"
    assert info["ready"] is False and info["paused"] is False
    for verb, call in (
        ("cancel", job.user_cancel),
        ("pause", job.user_pause),
        ("complete", job.user_complete),
    ):
        with pytest.raises(
            JobCommandError,
            match=f"Job 'j1' in state 'concluded' cannot accept command verb '{verb}'",
        ):
            call()
    with pytest.raises(JobCommandError, match="verb 'set-speed'"):
        job.user_set_speed(1)
    job.user_dismiss()
    assert job.status == "null" and rec.summary()[-1] == "null"
    with pytest.raises(
        JobCommandError, match="in state 'null' cannot accept command verb 'dismiss'"
    ):
        job.user_dismiss()


def test_pause_resume_and_standby():
    job, rec = new_job()
    job.start()
    assert not job.enter_pause()  # nothing requested
    job.user_pause()
    with pytest.raises(JobCommandError, match="^Job is already paused$"):
        job.user_pause()
    assert job.info()["paused"] is True and job.status == "running"  # not parked yet
    assert job.enter_pause()
    assert job.status == "paused" and job.paused and not job.busy
    job.user_resume()
    with pytest.raises(JobCommandError, match="^Can't resume a job that was not paused$"):
        job.user_resume()
    job.leave_pause()
    assert job.status == "running"
    job.transition_to_ready()
    job.user_pause()
    job.enter_pause()
    assert job.status == "standby" and job.ready and job.info()["ready"] is True
    job.user_complete()  # QEMU accepts complete in standby
    job.user_resume()
    job.leave_pause()
    assert job.status == "ready"
    job.finished()
    assert rec.summary() == [
        *START,
        "paused",
        "running",
        *READY,
        "standby",
        "ready",
        *END_COMPLETED,
    ]


def test_force_cancel_of_a_paused_job_resumes_it_first():
    job, rec = new_job()
    job.start()
    job.user_pause()
    job.enter_pause()
    job.user_cancel(force=True)
    assert not job.user_paused and job.pause_count == 0 and not job.should_pause
    job.leave_pause()
    job.finished(cancelled=True)
    assert rec.summary() == [*START, "paused", "running", *END_CANCELLED]


def test_finished_while_parked_in_pause():
    job, rec = new_job()
    job.start()
    job.user_pause()
    job.enter_pause()
    job.finished(cancelled=True)  # e.g. the manager was torn down
    assert rec.summary() == [*START, "paused", "running", *END_CANCELLED]
    assert job.status == "null"


def test_complete_refusals():
    job, _ = new_job()
    job.start()
    with pytest.raises(
        JobCommandError, match="Job 'j1' in state 'running' cannot accept command verb 'complete'"
    ):
        job.user_complete()
    job.transition_to_ready()
    job.user_cancel(force=False)
    with pytest.raises(JobCommandError, match="The active block job 'j1' cannot be completed"):
        job.user_complete()


def test_set_speed():
    job, _ = new_job(speed=10)
    job.start()
    with pytest.raises(JobCommandError, match="^Parameter 'speed' expects a non-negative value$"):
        job.user_set_speed(-1)
    job.user_set_speed(5 << 20, 0.0)
    assert job.speed == 5 << 20 and job.info()["speed"] == 5 << 20


def test_info_fields_are_qemus():
    job, _ = new_job()
    job.start()
    assert list(job.info()) == BLOCK_JOB_INFO_FIELDS
    assert job.job_info() == {
        "id": "j1",
        "type": "commit",
        "status": "running",
        "current-progress": 0,
        "total-progress": 0,
    }


def test_auto_finalize_false_refused():
    with pytest.raises(ValueError):
        Job("j", "commit", auto_finalize=False)


def test_helpers():
    assert id_wellformed("commit") and id_wellformed("a-1.b_2")
    for bad in ("", "1abc", "-x", "a b", "é", None, 5):
        assert not id_wellformed(bad)
    e = io_error("write", OSError(5, "Input/output error"))
    assert e.operation == "write"
    assert error_message(OSError(28, "No space left on device")) == "No space left on device"
    assert (
        error_message(OSError(5, "/img/mid.qcow2: bad L2 entry")) == "/img/mid.qcow2: bad L2 entry"
    )
    assert FINISHED == {"concluded", "null"}


# ------------------------------------------------------------------ rate limiter


def test_unlimited():
    r = RateLimiter(0)
    assert r.consume(1 << 40, 0.0) == 0.0
    assert r.delay(0.0) == 0.0


def test_token_bucket_delays():
    r = RateLimiter(1000)  # 1000 B/s, a full bucket holds 100 B
    assert r.consume(100, 0.0) == 0.0  # the initial burst
    assert r.consume(100, 0.0) == pytest.approx(0.1)
    assert r.delay(0.05) == pytest.approx(0.05)
    assert r.delay(0.1) == 0.0
    assert r.consume(1000, 0.1) == pytest.approx(1.0)  # a chunk larger than the bucket: debt


def test_long_run_rate_is_respected():
    speed = 4 << 20
    r = RateLimiter(speed)
    now = 0.0
    total = 0
    chunk = 1 << 20
    for _ in range(64):
        total += chunk
        now += r.consume(chunk, now)
        now += 0.001  # the copy itself
    # 64 MiB at 4 MiB/s: 16 s, less one bucket of burst
    assert now >= total / speed - RateLimiter.SLICE
    assert now <= total / speed + 1


def test_idle_time_does_not_bank_more_than_one_slice():
    r = RateLimiter(1000)
    r.consume(100, 0.0)
    assert r.consume(200, 100.0) == pytest.approx(0.1)  # only 100 B of credit after a long idle


def test_set_speed_recomputes_the_wait():
    r = RateLimiter(1000)
    r.consume(1100, 0.0)
    assert r.delay(0.0) == pytest.approx(1.0)
    r.set_speed(10000, 0.0)
    assert r.delay(0.0) == pytest.approx(0.1)  # the same debt at the new speed
    r.set_speed(0, 0.0)
    assert r.delay(0.0) == 0.0 and r.consume(10**9, 0.0) == 0.0
    r.set_speed(1000, 5.0)  # a new limit starts with a full bucket
    assert r.consume(100, 5.0) == 0.0
    with pytest.raises(ValueError):
        r.set_speed(-1, 0.0)
