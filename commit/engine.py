"""The commit engine: one entry for offline commits, one for live jobs, same algorithms.

`start_commit` resolves and checks the request (layers, modes, writability, the
stranding guard) and returns the algorithm's step generator; `run_offline` drives it
to the end in the calling thread; the mount drives it as a job (fusefs.daemon), one
step at a time in a worker thread.
"""

import sys
import time

import qcow
from qcow.errors import JobError

from .completion import delete_files
from .guard import guard_commit
from .intent import with_intent
from .ratelimit import RateLimiter
from .restartable import restartable_commit
from .simple import simple_commit
from .steps import CHUNK, Copied, Ready, SetLen
from .target import require_active, resolve_target

# Offline no guest waits behind a step: bigger steps (fewer flush barriers in
# restartable mode), unless a speed limit wants its bytes counted finely.
OFFLINE_CHUNK = 16 << 20


def start_commit(
    chain,
    top=None,
    base=None,
    mode="simple",
    active=False,
    default_top_active=False,
    guard_dirs=(),
    force=False,
    delete=False,
    job_id="commit",
    speed=0,
    chunk=CHUNK,
    backing_file=None,
):
    """(target, stranded, steps): a checked request and its step generator, copying
    `chunk` bytes per step at most. The steps return the dropped layers when they finish.

    The stranding guard runs first: it refuses (JobError) when another chain depends on
    an image this commit changes, invalidates or deletes; with force it returns the
    dependants that are stranded."""
    target = resolve_target(chain, top, base, mode, active, default_top_active, backing_file)
    stranded = guard_commit(
        [layer.path for layer in chain.layers],
        target.base_index,
        target.top_index,
        mode,
        list(guard_dirs),
        force,
        delete=delete,
    )
    if target.active:
        from .active import active_commit

        steps = active_commit(target, chunk)
    elif mode == "restartable":
        steps = restartable_commit(target, chunk)
    else:
        steps = simple_commit(target, chunk)
    steps = with_intent(target, job_id, force, speed, steps)  # resumed by the next mount
    return target, stranded, _finally_read_only(target, steps)


def _finally_read_only(target, steps):
    """Base (and, in restartable mode, every intermediate) is writable, with write
    locks, for the job's duration only: each image the job reopened goes back to
    read-only (a backing file again, locks as before) however the job ends, as QEMU
    does (iotest 249). Nothing is opened for writing before the job's first step."""
    chain = target.chain
    was_read_only = {layer.path for layer in chain.layers if layer.read_only}
    try:
        chain.reopen(target.base, True)
        return (yield from steps)
    finally:
        failed = None
        for layer in chain.layers[1:]:  # the active layer (a pivoted base) stays
            if not layer.read_only and layer.path in was_read_only:
                try:
                    chain.reopen(layer, False)
                except Exception as e:  # the others still go back
                    failed = failed or e
        if failed is not None:
            raise failed


def run_offline(
    image,
    top=None,
    base=None,
    mode="simple",
    speed=0,
    delete=False,
    guard_dirs=(),
    force=False,
    progress=None,
):
    """Commit an unmounted chain to the end. progress(offset, length) after each step.
    Returns (dropped paths, stranded dependants)."""
    with qcow.open_chain(image, writable=True, force=force) as chain:
        target, stranded, steps = start_commit(
            chain,
            top,
            base,
            mode,
            guard_dirs=guard_dirs,
            force=force,
            delete=delete,
            speed=speed,
            chunk=CHUNK if speed else OFFLINE_CHUNK,
        )
        limiter = RateLimiter(speed)
        length = offset = 0
        gen = steps
        value = None
        try:
            while True:
                step = gen.send(value)
                # offline nothing writes meanwhile: an active commit pivots once in sync
                value = "complete" if isinstance(step, Ready) else None
                if isinstance(step, SetLen):
                    length = step.length
                elif isinstance(step, Copied):
                    offset += step.nbytes
                    target.base.io.start_writeback()  # see _Trips.after_copy
                    delay = limiter.consume(step.nbytes, time.monotonic())
                    if delay:
                        time.sleep(delay)
                if progress:
                    progress(offset, length)
        except StopIteration as stop:
            dropped = stop.value or []
        finally:
            gen.close()
        paths = [layer.path for layer in dropped]
    if delete:
        delete_files(dropped)
    return paths, stranded


# Seconds of copying a trip to the worker thread may batch when no speed limit
# applies: progress steps do not each cost a round trip through the trio thread, which
# is busy serving the guest.
STEP_BUDGET = 0.05
# The GIL switch interval while a job runs. The copying thread keeps the GIL between
# its syscalls; the trio thread, back from each FUSE request's syscall, waits for it up
# to the interval (5 ms by default): that wait is the guest's latency.
JOB_SWITCH_INTERVAL = 0.0005


# While the guest writes, the copy leaves it this share of the mount's CPU, sleeping
# between its steps: the guest's requests and the copy share one CPU. Measured with
# the bench's writing guest: 0.78 leaves it 73-91% of its idle IOPS during a commit,
# 0.7 only 60-78% (the goal is 70%), 0.8 77% for a commit 15% longer.
GUEST_SHARE = 0.78
# The same for an active commit, where the guest kept 101-113% of its idle IOPS at
# GUEST_SHARE: the pauses held the mirror back and gave the guest nothing. Measured,
# 0.5 leaves it 77-80% and reaches READY in 0.79-0.91 s against 1.30-1.33 s; 0.6
# 88-90% in 0.93 s; 0.4 no sooner than 0.5.
ACTIVE_GUEST_SHARE = 0.5


def guest_pause(cpu, wall, share=GUEST_SHARE):
    """Seconds the copy sleeps after a step that took `cpu` seconds of its thread's CPU
    time (syscalls included) over `wall` seconds, so that the copy's CPU is 1 - share
    of the time since the step began. The step's wall time also holds the guest
    requests served meanwhile: counted as the copy's, it left the copy about half its
    share."""
    return cpu / (1 - share) - wall


class _GuestWrites:
    """Whether the guest wrote since the last look (the chain counts its writes)."""

    def __init__(self, chain):
        self.chain = chain
        self.seen = chain.guest_writes

    def since_last(self):
        seen, self.seen = self.seen, self.chain.guest_writes
        return self.seen != seen


class _Trips:
    """An algorithm's steps run from the trio side, a batch per trip to a worker thread."""

    def __init__(self, gen, guest, written, share):
        self.gen = gen
        self.guest = guest
        self.share = share
        self.written = written  # the layer the copy writes into, looked up when needed
        self.returned = None  # (value,): the algorithm returned in a trip with progress

    def run(self, value, budget):
        """In a worker thread: run the steps until one is anything but progress, or
        progress went on for `budget` seconds. (finished, the step that stopped it
        (None: the budget) or the algorithm's return value, the last length it set,
        the bytes its Copied steps reported, None without any). A trip that reports
        progress never reports the end too: progress is a point to cancel at, and a
        finished commit can no longer be cancelled."""
        if self.returned is not None:
            return True, self.returned[0], None, None
        length = copied = None
        deadline = time.monotonic() + budget
        try:
            while True:
                t = time.monotonic(), time.thread_time()
                step = self.gen.send(value)
                value = None
                if isinstance(step, SetLen):
                    length = step.length
                elif isinstance(step, Copied):
                    copied = (copied or 0) + step.nbytes
                    self._after_copy(t)
                    if time.monotonic() >= deadline:
                        return False, None, length, copied
                else:
                    return False, step, length, copied
        except StopIteration as stop:
            if copied is None:
                return True, stop.value, length, None
            self.returned = (stop.value,)
            return False, None, length, copied

    def _after_copy(self, started):
        """A writing guest gets `share` of the CPU: the copy sleeps (see
        `guest_pause`). With no guest writing, the write-out of what the copy wrote
        starts now (sync_file_range), so the flush at the job's end has little left;
        under guest writes that write-out competes with the guest's requests
        (measured: the guest kept 7-8 points less of its IOPS, for a commit 25%
        shorter), and the job leaves it to the final flush."""
        if self.guest is not None and self.guest.since_last():
            wall, cpu = started
            pause = guest_pause(time.thread_time() - cpu, time.monotonic() - wall, self.share)
            if pause > 0:
                time.sleep(pause)
        elif self.written is not None:
            self.written().io.start_writeback()

    def close(self):
        self.gen.close()


def live_run(steps, delete=False, chain=None, written=None, share=GUEST_SHARE):
    """Adapt an algorithm's steps to a mount job: `async def run(ctx)` for JobManager.
    The steps run in a worker thread (bulk I/O off the trio loop), a batch of them per
    trip (one step each under a speed limit); between trips the job applies the speed
    limit, pauses, and receives cancels. With the `chain`, the copy leaves a writing
    guest `share` of the CPU; `written()`, the layer the copy writes into, has its
    write-out started while the guest is not writing."""
    import trio

    trips = _Trips(steps, _GuestWrites(chain) if chain is not None else None, written, share)

    async def run(ctx):
        value = None
        decision = None
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, JOB_SWITCH_INTERVAL))
        try:
            while True:
                budget = 0 if ctx.job.speed else STEP_BUDGET
                finished, step, length, copied = await trio.to_thread.run_sync(
                    trips.run, value, budget
                )
                value = None
                if length is not None:
                    ctx.set_len(length)
                if copied is not None:
                    await ctx.progress(copied)
                if finished:
                    dropped = step or []
                    break
                if isinstance(step, Ready):
                    if not ctx.ready:
                        await ctx.transition_to_ready()
                    if decision is None:
                        decision = await ctx.wait_for_completion_request()
                    value = decision
        finally:
            sys.setswitchinterval(switch_interval)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(trips.close)
        if delete and dropped:
            await trio.to_thread.run_sync(delete_files, dropped)

    return run


def make_commit_factory(chain, default_guard_dirs=(), read_only_mount=None):
    """The mount's block-commit: QMP arguments -> (job_id, 'commit', run). A mount
    made with --read-only (`read_only_mount` = its mountpoint) refuses every commit."""
    import trio

    async def factory(args):
        if read_only_mount is not None:
            raise JobError(
                read_only_mount,
                "is a read-only mount (--read-only): a "
                "commit would write its images; remount it "
                "without --read-only to commit",
            )
        # the control socket checked every type against commit.qapi.SCHEMA; an empty
        # name is a name (refused as one), not an absent argument
        top = args.get("top-node", args.get("top"))
        base = args.get("base-node", args.get("base"))
        mode = args.get("x-mode", "simple")
        job_id = args.get("job-id", args.get("device", "commit"))
        guard_dirs = list(default_guard_dirs) + args.get("x-guard-dirs", [])
        force = args.get("x-force", False)
        delete = args.get("x-delete", False)

        def prepare():
            require_active(
                chain, args.get("device"), "block-commit's device must be the active image"
            )
            return start_commit(
                chain,
                top,
                base,
                mode,
                default_top_active=True,
                guard_dirs=guard_dirs,
                force=force,
                delete=delete,
                job_id=job_id,
                speed=args.get("speed", 0),
                backing_file=args.get("backing-file"),
            )

        # the stranding guard's scan may be long: cancelling the command (a shutdown)
        # abandons it; nothing was opened for writing yet, so its result can be dropped
        target, stranded, steps = await trio.to_thread.run_sync(prepare, abandon_on_cancel=True)
        share = ACTIVE_GUEST_SHARE if target.active else GUEST_SHARE
        run = live_run(steps, delete=delete, chain=chain, written=lambda: target.base, share=share)
        extra = {}
        if force:
            # forced past the stranding guard: say so, and what it strands
            extra = {"x-forced": True, "x-stranded": [d.message() for d in stranded]}
        return job_id, "commit", run, extra

    factory.wants_speed = True  # kept in the commit's intent record
    return factory
