"""The trio side of jobs: `JobContext` (what a job algorithm's `run(ctx)` sees) and
`JobManager`, which runs each job's algorithm in its nursery (the bulk I/O in worker
threads, commit.engine.live_run), drives its `Job` (commit/job.py) and answers the QMP
job commands: block-commit and block-stream start jobs, block-job-* and job-* steer
them, query-block-jobs and query-jobs report them, and the events go out through
`emit`.
"""

from __future__ import annotations

import logging

import trio

from qcow.errors import JobError, QcowError

from .job import FINISHED, Job, JobCommandError, error_message, id_wellformed
from .qapi import DEVICE_NOT_ACTIVE, GENERIC_ERROR, QMPError

log = logging.getLogger("qcowfs.job")


class JobContext:
    """What the algorithm's `async def run(ctx)` gets.

    The job itself (`ctx.job`) holds its id, speed, len and offset. Progress:
    `set_len(n)`, `await progress(nbytes)` (adds to offset, applies the speed limit,
    waits while paused, and is where a cancel arrives).
    Call `progress()` (or `checkpoint()`) between bounded chunks of work: a force
    cancel is delivered there - and at `transition_to_ready()` and
    `wait_for_completion_request()` - as `trio.Cancelled` (the job's cancel scope is
    cancelled, so any later unshielded await raises too: do cleanup in `finally`,
    shielded where it must finish). Nothing else in `run` is interrupted, so a chunk
    between two checkpoints runs to its end.

    Two-phase (active commit): `await transition_to_ready()` once base is in sync,
    then `await wait_for_completion_request()` -> 'complete' (pivot) or 'cancel' (soft
    cancel after ready: end without pivot, return normally -> BLOCK_JOB_COMPLETED).

    I/O errors: let an OSError escape -> BLOCK_JOB_ERROR, then COMPLETED with the
    error. BLOCK_JOB_ERROR's operation is the tag commit.steps.WRITING or READING put
    on it ("read" when untagged).
    """

    def __init__(self, job):
        self.job = job
        self._scope = None
        self._wakeup = None
        self.parked = False  # inside a ctx wait (the job is not busy)

    @property
    def ready(self):
        return self.job.ready

    def set_len(self, n):
        self.job.len = int(n)

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
        """Create and start a job now (emits created, running); returns the `Job`. The
        job commands check first, under `start_lock`, that no other job runs."""
        if not id_wellformed(job_id):
            raise JobError(None, f"Invalid job ID '{job_id}'")
        if job_id in self._jobs:
            raise JobError(None, f"Job ID '{job_id}' already in use")
        job = Job(
            job_id,
            job_type,
            emit=self._emit,
            speed=speed,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
        )
        ctx = JobContext(job)
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
                        # the side of the copy it came from (commit.steps); untagged,
                        # e.g. a table of a layer the job reads, it counts as a read
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
        speed = generic.get("speed", 0)  # checked by the job's rate limiter
        if generic.get("auto-finalize") is False:
            raise QMPError(GENERIC_ERROR, "auto-finalize=false is not supported by qcowfs")
        on_error = generic.get("on-error", "report")
        if on_error != "report":
            raise QMPError(
                GENERIC_ERROR, f"on-error={on_error} is not supported by qcowfs (only 'report')"
            )
        async with self._commit_lock:
            # before the factory: a second job is refused before any scan or check
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
        """Only one job runs at a time (a concluded job kept by auto-dismiss=false does
        not count)."""
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


__all__ = ["JobContext", "JobManager"]
