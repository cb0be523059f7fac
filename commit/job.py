"""QEMU's job model for commit jobs: a sans-I/O state machine, a rate limiter, and a
trio `JobManager` that runs job algorithms and answers the QMP job commands.

Sans-I/O part (no trio, no clock of its own):

* `Job` - status, progress and the user's requests for one job. Its transitions follow
  QEMU's table (job.c `JobSTT`), its verbs QEMU's `JobVerbTable`, and it emits events
  through an `emit(event, data)` callback in QEMU's order:
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
* `RateLimiter` (commit/ratelimit.py) - a token bucket: `consume(nbytes, now)` returns
  how long to wait; the offline driver uses it too.

trio part: `JobContext` (what an algorithm's `run(ctx)` sees) and `JobManager`.
"""

from __future__ import annotations

import logging
import os
import re

import trio

from qcow.errors import JobError, QcowError

from .qapi import DEVICE_NOT_ACTIVE, GENERIC_ERROR, QMPError
from .ratelimit import RateLimiter

log = logging.getLogger("qcowfs.job")

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


class JobCommandError(JobError):
    """A user command the job refuses (QMP GenericError)."""

    def __init__(self, message):
        super().__init__(None, message)


def io_error(operation, exc):
    """Tag an OSError with the QMP `operation` ("read" or "write") for BLOCK_JOB_ERROR."""
    exc.operation = operation
    return exc


def error_message(exc):
    """What QEMU puts in `error` for a failed job: strerror, or our own detail."""
    if isinstance(exc, OSError):
        if exc.strerror:
            return exc.strerror
        if exc.errno:
            return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- job


class Job:
    """One job's state (sans-I/O). Events go to `emit(event, data)`.

    Driver side (the runner): `start`, `enter_pause`/`leave_pause` at pause points,
    `transition_to_ready`, `report_io_error`, `finished`.
    User side (QMP): `user_pause`, `user_resume`, `user_cancel`, `user_complete`,
    `user_set_speed`, `user_dismiss` - each raises `JobCommandError` with QEMU's text.
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
        self.started = False
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
        if self.error is not None:
            d["error"] = self.error
        d.update(self.extra)
        return d

    def job_info(self):
        """query-jobs' JobInfo for this job."""
        d = {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "current-progress": self.offset,
            "total-progress": self.len,
        }
        if self.error is not None:
            d["error"] = self.error
        return d

    # -- driver side
    def start(self):
        self.started = True
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

    def report_io_error(self, operation="read"):
        """BLOCK_JOB_ERROR for on-error=report (the job then ends with the error)."""
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
        if speed < 0:
            raise JobCommandError("Parameter 'speed' expects a non-negative value")
        self.limiter.set_speed(speed, now)

    def user_dismiss(self):
        self._apply_verb("dismiss")
        self._transition("null")


# --------------------------------------------------------------------------- trio


class JobContext:
    """What the algorithm's `async def run(ctx)` gets.

    Progress: `set_len(n)`, `add_len(n)`, `await progress(nbytes)` (adds to offset,
    applies the speed limit, waits while paused, and is where a cancel arrives).
    Call `progress()` (or `checkpoint()`) between bounded chunks of work: a force
    cancel is delivered there - and at `transition_to_ready()` and
    `wait_for_completion_request()` - as `trio.Cancelled` (the job's cancel scope is
    cancelled, so any later unshielded await raises too: do cleanup in `finally`,
    shielded where it must finish). Nothing else in `run` is interrupted, so a chunk
    between two checkpoints runs to its end.

    Two-phase (active commit): `await transition_to_ready()` once base is in sync,
    then `await wait_for_completion_request()` -> 'complete' (pivot) or 'cancel' (soft
    cancel after ready: end without pivot, return normally -> BLOCK_JOB_COMPLETED).

    I/O errors: let an OSError escape (tag it with `commit.job.io_error('write', e)`
    to name the operation) -> BLOCK_JOB_ERROR, then COMPLETED with the error.
    """

    def __init__(self, manager, job):
        self._manager = manager
        self.job = job
        self._scope = None
        self._wakeup = None
        self.parked = False  # inside a ctx wait (the job is not busy)

    # -- plain properties
    @property
    def job_id(self):
        return self.job.id

    @property
    def speed(self):
        return self.job.speed

    @property
    def len(self):
        return self.job.len

    @property
    def offset(self):
        return self.job.offset

    @property
    def paused(self):
        """True while a pause is requested or in force (the job should stop copying)."""
        return self.job.should_pause or self.job.paused

    @property
    def cancel_requested(self):
        """A force cancel is pending: it is raised at the next checkpoint."""
        return self.job.force_cancel

    @property
    def ready(self):
        return self.job.ready

    def set_len(self, n):
        self.job.len = int(n)

    def add_len(self, n):
        self.job.len += int(n)

    def poll_completion_request(self):
        """None, 'complete' or 'cancel' (soft), without waiting."""
        job = self.job
        if job.cancelled and not job.force_cancel:
            return "cancel"
        if job.completion_requested:
            return "complete"
        return None

    # -- waiting machinery
    def _kick(self):
        if self._wakeup is not None:
            self._wakeup.set()

    async def _wait(self, timeout=None):
        ev = trio.Event()
        self._wakeup = ev
        try:
            if timeout is None:
                await ev.wait()
            else:
                with trio.move_on_after(timeout):
                    await ev.wait()
        finally:
            self._wakeup = None

    def _deliver_cancel(self):
        if self._scope is not None:
            self._scope.cancel()

    async def _park(self, done):
        """Wait at a pause point until `done()` -> (finished, timeout) says so.

        Handles pause (paused/standby) and delivers a force cancel.
        """
        job = self.job
        self.parked = True
        try:
            while True:
                if job.force_cancel:
                    self._deliver_cancel()
                    job.leave_pause()
                    await trio.lowlevel.checkpoint()  # raises Cancelled...
                    return  # ...unless the caller shields this point: go on
                if job.paused:
                    if not job.should_pause:
                        job.leave_pause()
                        continue
                    job.busy = False
                    await self._wait()
                    continue
                if job.enter_pause():
                    continue
                finished, timeout = done()
                if finished:
                    return
                job.busy = False
                await self._wait(timeout)
        finally:
            self.parked = False
            job.busy = True

    # -- the algorithm's API
    async def checkpoint(self):
        """A pause point: yields to the trio loop, waits while paused, raises on cancel."""
        await trio.lowlevel.checkpoint()
        await self._park(lambda: (True, None))

    async def progress(self, nbytes):
        """Count `nbytes` copied; wait for the speed limit and any pause; cancel point."""
        job = self.job
        job.offset += int(nbytes)
        job.limiter.consume(int(nbytes), trio.current_time())
        await trio.lowlevel.checkpoint()

        def done():
            delay = job.limiter.delay(trio.current_time())
            return (delay <= 0, delay)

        await self._park(done)

    async def transition_to_ready(self):
        await self.checkpoint()
        self.job.transition_to_ready()

    async def wait_for_completion_request(self):
        """After READY: wait for block-job-complete ('complete') or a soft
        block-job-cancel ('cancel'). A force cancel raises trio.Cancelled. While the
        job is paused (standby) a pending complete waits for the resume, as in QEMU."""
        result = []

        def done():
            r = self.poll_completion_request()
            if r is None:
                return (False, None)
            result.append(r)
            return (True, None)

        await trio.lowlevel.checkpoint()
        await self._park(done)
        return result[0]


_JOB_KEYS = {"speed", "auto-dismiss", "auto-finalize", "on-error"}


class JobManager:
    """Runs jobs in its own nursery and serves the QMP job commands.

    `commit_factory(arguments)` (sync or async) gets block-commit's arguments minus the
    generic job keys it handles itself (speed, auto-dismiss, auto-finalize, on-error),
    validates them (raising QcowError or QMPError for user faults) and returns
    `(job_id, job_type, run, extra)` where `run` is `async def run(ctx: JobContext)`
    and `extra` holds x- fields added to the job's query-block-jobs entry and events.
    `factories` maps more job-starting commands (block-stream) to factories with the
    same contract. A factory with a true `wants_speed` attribute also gets `speed`.
    Only one job runs at a time (a concluded job kept by auto-dismiss=false does not
    count). Events go to `self.emit(event, data)` (set it to `QMPServer.emit`).
    Start it with `await nursery.start(manager.run)` (without that, jobs run as trio
    system tasks).
    """

    def __init__(self, commit_factory=None, *, emit=None, factories=None):
        self.commit_factory = commit_factory
        # more job-starting commands, e.g. {"block-stream": factory}: same contract
        self.factories = dict(factories or {})
        self.emit = emit
        self._jobs = {}  # id -> (Job, JobContext), newest last
        self._nursery = None
        self._changed = trio.Event()
        self._commit_lock = trio.Lock()

    def _emit(self, event, data):
        log.info("job event %s %s", event, data)
        if self.emit is not None:
            self.emit(event, data)

    # -- life cycle
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _notify(self):
        self._changed.set()
        self._changed = trio.Event()

    # -- queries
    def jobs(self):
        """Every job still known (not dismissed), newest first."""
        return [job for job, _ in reversed(list(self._jobs.values()))]

    def get(self, job_id):
        entry = self._jobs.get(job_id)
        return entry[0] if entry else None

    @property
    def start_lock(self):
        """Held while a job starts: hold it to keep any job from starting meanwhile."""
        return self._commit_lock

    def has_running_jobs(self):
        return any(job.status not in FINISHED for job, _ in self._jobs.values())

    # -- starting
    def start_job(self, job_id, job_type, run, *, speed=0, auto_dismiss=True, auto_finalize=True):
        """Create and start a job now (emits created, running); returns the `Job`."""
        if not id_wellformed(job_id):
            raise JobError(None, f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise JobError(None, f"Job ID '{job_id}' already in use")
        for other, _ in self._jobs.values():
            if other.status not in FINISHED:
                raise JobError(
                    None,
                    f"job '{other.id}' is already running on this chain; only one job at a time "
                    "(wait for it, or cancel it first)",
                )
        if speed < 0:
            raise JobError(None, "Parameter 'speed' expects a non-negative value")
        job = Job(
            job_id,
            job_type,
            emit=self._emit,
            speed=speed,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
        )
        ctx = JobContext(self, job)
        self._jobs[job_id] = (job, ctx)
        job.start()
        if self._nursery is not None:
            self._nursery.start_soon(self._run_job, job, ctx, run, name=f"job {job_id}")
        else:  # run() was not started: the job runs as a trio system task
            trio.lowlevel.spawn_system_task(self._run_job, job, ctx, run, name=f"job {job_id}")
        self._notify()
        return job

    async def _run_job(self, job, ctx, run):
        done = False
        try:
            error = None
            cancelled = False
            with trio.CancelScope() as scope:
                ctx._scope = scope
                try:
                    await ctx.checkpoint()  # QEMU pauses a job once before it runs
                    await run(ctx)
                except BaseException as exc:
                    found = _pick(exc)
                    if found is None:
                        raise
                    if isinstance(found, OSError):
                        job.report_io_error(getattr(found, "operation", "read"))
                        log.error("job %s: I/O error: %s", job.id, found)
                    elif isinstance(found, QcowError):
                        log.error("job %s failed: %s", job.id, found)
                    else:
                        log.error("job %s crashed", job.id, exc_info=found)
                    error = error_message(found)
                    if not isinstance(found, (OSError, QcowError)):
                        error = f"internal error: {error}"
            if scope.cancelled_caught:
                cancelled = True
            job.finished(error=error, cancelled=cancelled)
            done = True
        finally:
            if not done:  # cancelled from outside (the manager is shutting down)
                job.finished(cancelled=True)
            if job.status == "null":
                self._jobs.pop(job.id, None)
            self._notify()

    # -- stopping
    async def wait_idle(self):
        """Wait until no job is running."""
        while self.has_running_jobs():
            await self._changed.wait()

    async def cancel_all(self, grace=10.0):
        """Force-cancel every running job and wait until they all ended. A job that
        has not reached a checkpoint within `grace` seconds is cancelled outright."""
        for job, ctx in list(self._jobs.values()):
            if job.status in FINISHED:
                continue
            try:
                job.user_cancel(force=True)
            except JobCommandError:
                pass  # waiting/pending: it is finishing anyway
            if job.paused and not job.should_pause:
                job.leave_pause()
            ctx._kick()
        with trio.move_on_after(grace):
            await self.wait_idle()
        if self.has_running_jobs():
            for job, ctx in list(self._jobs.values()):
                if job.status not in FINISHED and ctx._scope is not None:
                    log.warning(
                        "job %s did not stop within %s s; cancelling it outright", job.id, grace
                    )
                    ctx._scope.cancel()
            await self.wait_idle()

    # -- QMP
    def _block_job(self, device):
        entry = self._jobs.get(device)
        if entry is None:
            raise QMPError(DEVICE_NOT_ACTIVE, f"Block job '{device}' not found")
        return entry

    def _any_job(self, job_id):
        entry = self._jobs.get(job_id)
        if entry is None:
            raise QMPError(GENERIC_ERROR, "Job not found")
        return entry

    def _after_user_command(self, job, ctx):
        """Make a parked job's status follow a command at once (QEMU's order: the
        paused/running status change precedes the reply), then wake it."""
        if ctx.parked:
            if job.paused and not job.should_pause:
                job.leave_pause()
            elif not job.paused and job.should_pause:
                job.enter_pause()
        ctx._kick()
        self._notify()

    def commands(self):
        """The QMP command table for jobs: name -> async handler(arguments). The
        control socket checked the arguments against commit.qapi.SCHEMA already."""
        cmds = {
            "query-block-jobs": self._qmp_query_block_jobs,
            "query-jobs": self._qmp_query_jobs,
            "block-job-cancel": self._qmp_block_job_cancel,
            "block-job-set-speed": self._qmp_block_job_set_speed,
            "job-cancel": self._qmp_job_cancel,
            "job-dismiss": self._qmp_job_dismiss,
        }
        # the plain verbs exist twice: block-job-X keyed by device, job-X keyed by id
        for verb in ("pause", "resume", "complete"):
            cmds[f"block-job-{verb}"] = self._verb_handler("device", self._block_job, verb)
            cmds[f"job-{verb}"] = self._verb_handler("id", self._any_job, verb)
        if self.commit_factory is not None:
            cmds["block-commit"] = self._qmp_block_commit
        for name, factory in self.factories.items():
            cmds[name] = self._job_starter(factory)
        return cmds

    async def _qmp_block_commit(self, args):
        return await self._qmp_start_job(self.commit_factory, args)

    def _job_starter(self, factory):
        async def handler(args):
            return await self._qmp_start_job(factory, args)

        return handler

    def _verb_handler(self, key, lookup, verb):
        async def handler(args):
            job, ctx = lookup(args[key])
            getattr(job, f"user_{verb}")()
            self._after_user_command(job, ctx)

        return handler

    async def _qmp_query_block_jobs(self, args):
        return [job.info() for job in self.jobs()]

    async def _qmp_query_jobs(self, args):
        return [job.job_info() for job in self.jobs()]

    async def _qmp_block_job_cancel(self, args):
        force = args.get("force", False)
        job, ctx = self._block_job(args["device"])
        if job.user_paused and not force:
            raise QMPError(
                GENERIC_ERROR, f"The block job for device '{job.id}' is currently paused"
            )
        self._cancel(job, ctx, force)

    def _cancel(self, job, ctx, force):
        job.user_cancel(force)
        self._after_user_command(job, ctx)

    async def _qmp_block_job_set_speed(self, args):
        job, ctx = self._block_job(args["device"])
        job.user_set_speed(args["speed"], trio.current_time())
        self._after_user_command(job, ctx)

    async def _qmp_job_cancel(self, args):
        job, ctx = self._any_job(args["id"])
        self._cancel(job, ctx, True)

    async def _qmp_job_dismiss(self, args):
        job, _ = self._any_job(args["id"])
        job.user_dismiss()
        self._jobs.pop(job.id, None)
        self._notify()

    async def _qmp_start_job(self, factory, args):
        args = dict(args)
        generic = {k: args.pop(k) for k in list(args) if k in _JOB_KEYS}
        speed = generic.get("speed", 0)
        if speed < 0:
            raise QMPError(GENERIC_ERROR, "Parameter 'speed' expects a non-negative value")
        if generic.get("auto-finalize") is False:
            raise QMPError(GENERIC_ERROR, "auto-finalize=false is not supported by qcowfs")
        on_error = generic.get("on-error", "report")
        if on_error != "report":
            raise QMPError(
                GENERIC_ERROR, f"on-error={on_error} is not supported by qcowfs (only 'report')"
            )
        async with self._commit_lock:
            self._check_one_job()
            if getattr(factory, "wants_speed", False):
                args["speed"] = speed  # e.g. recorded with a commit's intent
            result = factory(args)
            if hasattr(result, "__await__"):
                result = await result
            job_id, job_type, run, extra = result
            job = self.start_job(
                job_id,
                job_type,
                run,
                speed=speed,
                auto_dismiss=generic.get("auto-dismiss") is not False,
            )
            job.extra.update(extra)
        return {}

    def _check_one_job(self):
        for other, _ in self._jobs.values():
            if other.status not in FINISHED:
                raise JobError(
                    None,
                    f"job '{other.id}' is already running on this chain; only one job at a time "
                    "(wait for it, or cancel it first)",
                )


def _pick(exc):
    """The exception that decides a failed job's outcome, looking inside groups:
    an OSError first, then a QcowError, then any other Exception; None when only
    cancellations (or BaseExceptions like KeyboardInterrupt) are inside."""
    leaves = []

    def walk(e):
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    if any(not isinstance(e, Exception) and not isinstance(e, trio.Cancelled) for e in leaves):
        return None  # KeyboardInterrupt, SystemExit...: let it through
    for kind in (OSError, QcowError, Exception):
        for e in leaves:
            if isinstance(e, kind):
                return e
    return None


__all__ = [
    "STATUSES",
    "TRANSITIONS",
    "VERBS",
    "Job",
    "JobCommandError",
    "JobStateError",
    "JobContext",
    "JobManager",
    "RateLimiter",
    "id_wellformed",
    "io_error",
]
