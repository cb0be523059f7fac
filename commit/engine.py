"""The commit engine: one entry for offline commits, one for live jobs, same algorithms.

`start_commit` resolves and checks the request (layers, modes, writability, the
stranding guard) and returns the algorithm's step generator; `run_offline` drives it
to the end in the calling thread; the mount drives it as a job (fusefs.daemon), one
step at a time in a worker thread.
"""

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
from .target import resolve_target

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
):
    """(target, stranded, steps): a checked request and its step generator, copying
    `chunk` bytes per step at most. The steps return the dropped layers when they finish.

    The stranding guard runs first: it refuses (JobError) when another chain depends on
    an image this commit changes, invalidates or deletes; with force it returns the
    dependants that are stranded."""
    target = resolve_target(chain, top, base, mode, active, default_top_active)
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


def _step(gen, value):
    """One step of an algorithm, in a worker thread: (finished, the step it yielded or
    the value it returned, the last length it set on the way). Length updates do not
    cost a round trip to the trio thread of their own."""
    length = None
    try:
        step = gen.send(value)
        while isinstance(step, SetLen):
            length = step.length
            step = gen.send(None)
        return False, step, length
    except StopIteration as stop:
        return True, stop.value, length


def live_run(steps, delete=False):
    """Adapt an algorithm's steps to a mount job: `async def run(ctx)` for JobManager.
    Each step runs in a worker thread (bulk I/O off the trio loop); between steps the
    job applies the speed limit, pauses, and receives cancels."""
    import trio

    async def run(ctx):
        value = None
        decision = None
        try:
            while True:
                finished, step, length = await trio.to_thread.run_sync(_step, steps, value)
                value = None
                if length is not None:
                    ctx.set_len(length)
                if finished:
                    dropped = step or []
                    break
                if isinstance(step, Copied):
                    await ctx.progress(step.nbytes)
                elif isinstance(step, Ready):
                    if not ctx.ready:
                        await ctx.transition_to_ready()
                    if decision is None:
                        decision = await ctx.wait_for_completion_request()
                    value = decision
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(steps.close)
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
            )

        # the stranding guard's scan may be long: cancelling the command (a shutdown)
        # abandons it; nothing was opened for writing yet, so its result can be dropped
        target, stranded, steps = await trio.to_thread.run_sync(prepare, abandon_on_cancel=True)
        run = live_run(steps, delete=delete)
        extra = {}
        if force:
            # forced past the stranding guard: say so, and what it strands
            extra = {"x-forced": True, "x-stranded": [d.message() for d in stranded]}
        return job_id, "commit", run, extra

    factory.wants_speed = True  # kept in the commit's intent record
    return factory
