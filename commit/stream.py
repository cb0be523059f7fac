"""Stream (pull, QEMU's `block-stream`): copy into the active image every cluster it
reads through from the layers above base, then make the active image name base as its
backing file (or nothing, without base) and drop the layers in between.

Why the guest view never changes, and a guest write always wins:
- only ranges still unallocated in the active image are written, with exactly what the
  active image reads there today (zeros past a short backing file included); the
  layers below are read-only while the job runs, so that never changes;
- the read from below happens outside the chain's lock; the write happens under it,
  after checking again which parts are still unallocated in the active image. Guest
  writes hold the same lock, so a range the guest wrote after the job read it is
  allocated by then and is skipped;
- nothing is ever removed from any image, so a cancel, a kill -9 or a power cut leaves
  a valid chain with the same view; a new run copies only what is still unallocated.
End (each step durable before the next, as for a commit): the active image flushed,
then its header names base, then the chain drops the intermediates.
"""

from qcow.errors import JobError
from qcow.l2_table import DATA, UNALLOCATED, ZERO
from qcow.runs import append_run

from .completion import backing_name_for
from .copy import SCAN_SLICE
from .guard import guard_stream, stream_dependant_line
from .steps import CHUNK, READING, WRITING, Copied, SetLen, chunks
from .target import find_layer, require_active


def _from_below(chain, base_i, off, n):
    """Runs (start, length, kind) of [off, off+n) that the layers between the active
    image and base answer for, kind DATA or ZERO; base's own answers are left out, and
    so are zeros where base reads zeros too (past its end; everywhere without base).
    Those layers do not change while the job runs: scanned outside the chain's lock."""
    with READING:
        scan = chain.scan(1, base_i, off, n)
    layers = scan.layers
    zeros_matter_below = layers[base_i].virtual_size if base_i < len(layers) else 0
    out = []
    for s, ln, _depth, kind, _aux in scan.runs:
        if kind == UNALLOCATED:
            continue
        if kind == ZERO:
            ln = min(s + ln, zeros_matter_below) - s
            if ln <= 0:
                continue
        append_run(out, (s, ln, ZERO if kind == ZERO else DATA))
    return out


def _pending(chain, runs):
    """The parts of `runs` still unallocated in the active image; under the chain's
    lock, so that what the guest wrote is seen as allocated (the guest wins)."""
    out = []
    for s, ln, kind in runs:
        for es, eln, ekind, _aux in chain.active.extents(s, ln):
            if ekind == UNALLOCATED:
                append_run(out, (es, eln, kind))
    return out


def _pull(chain, base_i, off, n):
    """Copy up what [off, off+n) still reads through from above base.

    What the active image sees below it is read first, outside the lock, over whole
    clusters of the active image: a write into part of a cluster copies the rest of
    it from that buffer, so nothing calls back into the chain under a layer's lock."""
    cs = chain.active.cluster_size
    lo = off // cs * cs
    hi = -(-(off + n) // cs) * cs  # a tail cluster's end may pass the disk's end
    with READING:
        view = chain.read_from(1, lo, hi - lo)
        runs = _from_below(chain, base_i, off, n)

    def below(o, ln):
        assert lo <= o and o + ln <= hi, (o, ln, lo, hi)
        return view[o - lo : o - lo + ln]

    with chain.lock:
        active = chain.active
        for s, ln, kind in _pending(chain, runs):
            # the active image is looked at again under the lock: what the guest wrote
            # meanwhile is allocated now and left out (the guest wins)
            with WRITING:
                if kind == DATA:
                    active.write(s, below(s, ln), below)
                else:
                    active.write_zeroes(s, ln, below)


def stream_steps(chain, base_path):
    """The algorithm (steps protocol of commit.steps). Returns the dropped layers."""

    def base_index():
        if base_path is None:
            return len(chain.layers)
        for i, layer in enumerate(chain.layers):
            if layer.path == base_path:
                return i
        raise JobError(base_path, "left the chain while the job ran")

    if base_index() <= 1:
        yield SetLen(0)  # base is the backing file already
        return []
    size = chain.virtual_size
    cs = chain.active.cluster_size
    runs = []
    for off in range(0, size, SCAN_SLICE):
        below = _from_below(chain, base_index(), off, min(SCAN_SLICE, size - off))
        with chain.lock, READING:
            runs += _pending(chain, below)
    yield SetLen(sum(ln for _s, ln, kind in runs if kind == DATA))
    for start, length, kind in runs:
        for pos, n in chunks(start, length, cs, CHUNK):
            _pull(chain, base_index(), pos, n)
            # progress by the plan: a part the guest wrote meanwhile, or that the
            # copy-on-write of a neighbour already filled, is done all the same
            yield Copied(n if kind == DATA else 0)
    active = chain.active
    with WRITING:
        active.flush()
        if base_path is None:
            return chain.drop_backing(active)
        base = chain.layers[base_index()]
        return chain.drop_layers(active, base, backing_name_for(active, base))


def start_stream(chain, base=None, guard_dirs=(), force=False, delete=False):
    """(base layer or None, stranded dependants, steps): a checked request and its step
    generator. Refuses (JobError) what cannot work: a read-only active image, a base
    not below it; with delete, images outside the chain that read through the layers
    it drops (the stranding guard), unless force."""
    layers = chain.layers
    active = layers[0]
    if active.read_only:
        raise JobError(
            active.filename, "the active image is read-only: nothing can be streamed into it"
        )
    base_layer = find_layer(chain, base) if base else None
    if base_layer is active:
        raise JobError(active.filename, "base must be below the active image")
    base_i = chain.index_of(base_layer) if base_layer is not None else len(layers)
    for layer in layers[1:base_i]:
        if getattr(layer, "encrypted", False):
            raise JobError(layer.filename, "encrypted images cannot be streamed")
    dropped = [layer.path for layer in layers[1:base_i]]
    stranded = (
        guard_stream([layer.path for layer in layers], dropped, guard_dirs, force) if delete else []
    )
    base_path = base_layer.path if base_layer is not None else None
    return base_layer, stranded, stream_steps(chain, base_path)


def make_stream_factory(chain, default_guard_dirs=(), read_only_mount=None):
    """The mount's block-stream: QMP arguments -> (job_id, 'stream', run, extra).
    On a read-only mount (`read_only_mount` names it) it refuses."""
    import trio

    from .engine import live_run

    async def factory(args):
        if read_only_mount is not None:
            raise JobError(
                read_only_mount,
                "is a read-only mount (--read-only): a "
                "stream would write its active image; "
                "remount it without --read-only to stream",
            )
        # the control socket checked every type against commit.qapi.SCHEMA
        device = args.get("device")
        base = args.get("base-node", args.get("base"))
        delete = args.get("x-delete", False)
        force = args.get("x-force", False)
        guard_dirs = list(default_guard_dirs) + args.get("x-guard-dirs", [])

        def prepare():
            require_active(chain, device, "block-stream streams into the active image only")
            return start_stream(chain, base, guard_dirs, force, delete)

        _base, stranded, steps = await trio.to_thread.run_sync(prepare, abandon_on_cancel=True)
        run = live_run(steps, delete=delete, chain=chain)
        extra = {}
        if force:
            extra = {"x-forced": True, "x-stranded": [stream_dependant_line(d) for d in stranded]}
        return args.get("job-id", device or "stream"), "stream", run, extra

    return factory


__all__ = ["start_stream", "stream_steps", "make_stream_factory"]
