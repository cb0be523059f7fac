"""QEMU's job model, sans-I/O: `Job` holds one job's status, progress and the user's
requests; no trio, no clock of its own (the runner, commit/jobmanager.py, passes the time
where the speed limit needs it).

Its transitions follow QEMU's table (job.c `JobSTT`), its verbs QEMU's `JobVerbTable`,
and it emits events through an `emit(event, data)` callback in QEMU's order:
``JOB_STATUS_CHANGE`` on every status change, ``BLOCK_JOB_READY`` on reaching ready,
``BLOCK_JOB_ERROR`` on an I/O error (on-error=report), ``BLOCK_JOB_COMPLETED`` (with
``error`` on failure) or ``BLOCK_JOB_CANCELLED`` at the end. Verified sequences
(qemu-storage-daemon 7.2):

- non-active commit: created, running, waiting, pending, COMPLETED, concluded, null
- active commit: created, running, ready + READY, [complete] waiting, pending,
  COMPLETED, concluded, null
- pause/resume: running -> paused -> running; ready -> standby -> ready
- cancel (force, or any cancel before ready): aborting, CANCELLED, concluded, null
- soft cancel after ready: waiting, pending, COMPLETED (no pivot), concluded, null
- I/O error: BLOCK_JOB_ERROR, aborting, COMPLETED{error}, concluded, null
- auto-dismiss false: stops at concluded until job-dismiss -> null
"""

import os
import re

from .qapi import JobCommandError
from .ratelimit import RateLimiter

STATUSES = (
    "undefined",
    "created",
    "running",
    "paused",
    "ready",
    "standby",
    "waiting",
    "pending",
    "aborting",
    "concluded",
    "null",
)

# QEMU's JobSTT: status -> the statuses it may move to.
TRANSITIONS = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"aborting", "concluded"}),
    "aborting": frozenset({"aborting", "concluded"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}

_LIVE = frozenset({"created", "running", "paused", "ready", "standby"})
# QEMU's JobVerbTable: verb -> statuses that accept it.
VERBS = {
    "cancel": _LIVE | {"waiting", "pending"},
    "pause": _LIVE,
    "resume": _LIVE,
    "set-speed": _LIVE,
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
    "change": _LIVE,
}

FINISHED = frozenset({"concluded", "null"})

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


def id_wellformed(job_id):
    """QEMU's rule for ids: a letter, then letters, digits, '-', '.', '_'."""
    return isinstance(job_id, str) and bool(_ID_RE.match(job_id))


class JobStateError(RuntimeError):
    """A transition QEMU's table forbids: a bug in the caller, not a user fault."""


def error_message(exc):
    """What QEMU puts in `error` for a failed job: strerror, or our own detail."""
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror
        if exc.errno:
            return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class Job:
    """One job's state (sans-I/O). Events go to `emit(event, data)`.

    Driver side (the runner): `start`, `enter_pause`/`leave_pause` at pause points,
    `transition_to_ready`, `report_io_error`, `finished`.
    User side (QMP): `user_pause`, `user_resume`, `user_cancel`, `user_complete`,
    `user_set_speed`, `user_dismiss` - each raises `JobCommandError` with QEMU's text
    (a negative speed, here or at creation, is the rate limiter's refusal).
    """

    def __init__(
        self, job_id, job_type, *, emit=None, speed=0, auto_finalize=True, auto_dismiss=True
    ):
        if not auto_finalize:
            raise ValueError("auto-finalize=false is not supported")
        self.id = job_id
        self.type = job_type
        self.emit = emit or (lambda event, data: None)
        self.status = "undefined"
        self.len = 0
        self.offset = 0
        self.limiter = RateLimiter(speed)
        self.busy = False
        self.paused = False  # parked at a pause point (status paused/standby)
        self.user_paused = False
        self.pause_count = 0
        self.cancelled = False  # any cancel requested
        self.force_cancel = False  # a cancel that aborts (vs a soft cancel after ready)
        self.completion_requested = False
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.error = None
        self.extra = {}  # x- fields of the factory's (e.g. x-forced, x-stranded)
        self._status_before_pause = None
        self._transition("created")

    # -- helpers
    @property
    def speed(self):
        return self.limiter.speed

    @property
    def ready(self):
        return self.status in ("ready", "standby")

    @property
    def should_pause(self):
        return self.pause_count > 0 and not self.force_cancel

    def _transition(self, status):
        if status not in TRANSITIONS[self.status]:
            raise JobStateError(
                f"job {self.id}: transition {self.status} -> {status} is not allowed"
            )
        old = self.status
        self.status = status
        if status != old:
            self.emit("JOB_STATUS_CHANGE", {"status": status, "id": self.id})

    def _apply_verb(self, verb):
        if self.status not in VERBS[verb]:
            raise JobCommandError(
                f"Job '{self.id}' in state '{self.status}' cannot accept command verb '{verb}'"
            )

    def block_event_data(self):
        return {
            "device": self.id,
            "len": self.len,
            "offset": self.offset,
            "speed": self.speed,
            "type": self.type,
            **self.extra,
        }

    def info(self):
        """query-block-jobs' BlockJobInfo for this job."""
        d = {
            "type": self.type,
            "device": self.id,
            "len": self.len,
            "offset": self.offset,
            "busy": self.busy,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "io-status": "ok",
            "ready": self.ready,
            "status": self.status,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        return self._with_error(d) | self.extra

    def job_info(self):
        """query-jobs' JobInfo for this job."""
        d = {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "current-progress": self.offset,
            "total-progress": self.len,
        }
        return self._with_error(d)

    def _with_error(self, d):
        """A finished job's info says why it failed, as QEMU's do."""
        if self.error is not None:
            d["error"] = self.error
        return d

    # -- driver side
    def start(self):
        self.busy = True
        self._transition("running")

    def enter_pause(self):
        """At a pause point: park if a pause is due. Returns True if now paused."""
        if self.paused:
            return True
        if not self.should_pause or self.status not in ("running", "ready"):
            return False
        self._status_before_pause = self.status
        self._transition("standby" if self.status == "ready" else "paused")
        self.paused = True
        self.busy = False
        return True

    def leave_pause(self):
        """Resume from a pause point (the pause was lifted or the job is cancelled)."""
        if not self.paused:
            return
        self.paused = False
        self.busy = True
        self._transition(self._status_before_pause)
        self._status_before_pause = None

    def transition_to_ready(self):
        self._transition("ready")
        self.emit("BLOCK_JOB_READY", self.block_event_data())

    def report_io_error(self, operation):
        """BLOCK_JOB_ERROR for on-error=report (the job then ends with the error);
        `operation` is "read" or "write", the side of the copy that failed."""
        self.emit(
            "BLOCK_JOB_ERROR", {"device": self.id, "operation": operation, "action": "report"}
        )

    def finished(self, *, error=None, cancelled=False):
        """The algorithm returned (error None), failed (error = message), or was
        stopped by a force cancel (cancelled=True). Runs QEMU's completion sequence."""
        if self.status in FINISHED:
            return
        self.busy = False
        if self.paused:
            self.paused = False
            self._transition(self._status_before_pause)
        if cancelled:
            self.force_cancel = True
            self.cancelled = True
            if error is None:
                error = "Operation canceled"
        if error is not None:
            self.error = error
            self._transition("aborting")
            if self.force_cancel:
                self.emit("BLOCK_JOB_CANCELLED", self.block_event_data())
            else:
                data = self.block_event_data()
                data["error"] = error
                self.emit("BLOCK_JOB_COMPLETED", data)
        else:
            self._transition("waiting")
            self._transition("pending")
            self.emit("BLOCK_JOB_COMPLETED", self.block_event_data())
        self._transition("concluded")
        if self.auto_dismiss:
            self._transition("null")

    # -- user side
    def user_pause(self):
        self._apply_verb("pause")
        if self.user_paused:
            raise JobCommandError("Job is already paused")
        self.user_paused = True
        self.pause_count += 1

    def user_resume(self):
        if not self.user_paused or self.pause_count <= 0:
            raise JobCommandError("Can't resume a job that was not paused")
        self._apply_verb("resume")
        self.user_paused = False
        self.pause_count -= 1

    def user_cancel(self, force=False):
        """A cancel before ready is always a force cancel (QEMU's mirror and commit)."""
        self._apply_verb("cancel")
        if not self.ready:
            force = True
        if self.user_paused:
            self.user_paused = False
            self.pause_count -= 1
        self.cancelled = True
        self.force_cancel = self.force_cancel or force

    def user_complete(self):
        self._apply_verb("complete")
        if self.cancelled:
            raise JobCommandError(f"The active block job '{self.id}' cannot be completed")
        self.completion_requested = True

    def user_set_speed(self, speed, now=None):
        self._apply_verb("set-speed")
        self.limiter.set_speed(speed, now)

    def user_dismiss(self):
        self._apply_verb("dismiss")
        self._transition("null")


__all__ = [
    "FINISHED",
    "STATUSES",
    "TRANSITIONS",
    "VERBS",
    "Job",
    "JobCommandError",
    "JobStateError",
    "error_message",
    "id_wellformed",
]
