"""`qcowfs commit`, `stream`, `snapshot`, `jobs`, `cancel|pause|resume|complete`: the
command-line side of jobs and live chain changes.

A live commit (TARGET is a mountpoint) talks QMP to the mount's control socket
(`--control-socket PATH`, else the one the mount recorded: `fusefs.mountrecord`); an
offline commit (TARGET is an image file) runs `commit.engine` in this process.

Choices (virsh's where it has one):
- the job id defaults to ``commit`` (``stream`` for a stream; one job per mount at a
  time, so a fixed name is unambiguous and easy to type: ``qcowfs cancel /mnt
  commit``); ``--job-id`` overrides;
- without ``--top`` the active image's backing file is committed (virsh), with
  ``--active`` the active image itself (QMP's default when `top` is absent);
- ``--wait`` follows the job's events to its end (progress bar on stderr when it is a
  terminal) and exits 0 only on success; an active commit with ``--wait`` but without
  ``--pivot`` returns once the job is READY (virsh), leaving it mirroring;
  ``--pivot`` (needs ``--active``, implies ``--wait``) sends block-job-complete on READY;
  Ctrl-C while waiting cancels the job (virsh); at the end one line says what the
  mount serves now (``--quiet`` drops it);
- ``wait`` attaches to a running job the same way, but Ctrl-C only detaches;
- ``cancel`` and ``complete`` wait for the job to end and exit 0 only if it ended as
  asked; ``pause`` and ``resume`` return at once. ``cancel`` on a ready active commit is
  QEMU's soft cancel: the job ends without a pivot, the chain unchanged.
"""

import json
import os
import sys

from qcow.errors import QcowError
from qcow.paths import absolute

from .mountrecord import socket_for
from .units import parse_rate

DEFAULT_JOB_ID = "commit"
DEFAULT_STREAM_JOB_ID = "stream"
POLL_INTERVAL = 0.25  # seconds between progress polls while waiting for events
REPLY_TIMEOUT = 300.0  # block-commit may scan guard directories before it answers


# --------------------------------------------------------------------------- helpers


def _connect(args, label):
    """A negotiated connection to the control socket of the mount at `label`."""
    from .qmp import QMPConnection  # here: an offline commit loads no QMP code

    path = socket_for(os.path.realpath(label), getattr(args, "control_socket", None))
    conn = QMPConnection(path, label=label, timeout=REPLY_TIMEOUT)
    conn.connect()
    return conn


def _find_job(conn, job_id):
    for info in conn.execute("query-block-jobs") or []:
        if info.get("device") == job_id:
            return info
    return None


def _human(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Progress:
    """A tqdm bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, desc):
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                return
            self.bar = tqdm(
                total=0,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, done, total):
        if self.bar is None:
            return
        total = max(int(total or 0), int(done or 0))
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = int(done or 0)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _event_job(ev):
    data = ev.get("data") or {}
    return data.get("device", data.get("id"))


# --------------------------------------------------------------------------- commit


def cmd_commit(args):
    target = args.target
    if os.path.isdir(target):
        return _live_commit(args)
    if os.path.exists(target):
        return _offline_commit(args)
    raise QcowError(target, "No such file or directory")


def _match_node(nodes, name, what, label):
    """A user's --top/--base -> the node it names, or None to let the server decide
    (it also knows the names written in the images' headers)."""
    if name is None:
        return None
    for node in nodes:
        if name in (node.get("node-name"), node.get("file")):
            return node
    if os.path.exists(name):
        real = os.path.realpath(name)
        for node in nodes:
            f = node.get("file")
            if f and os.path.exists(f) and os.path.samefile(f, real):
                return node
        raise QcowError(name, f"is not an image of the chain mounted at {label} (--{what})")
    return None


# virsh blockcommit refuses it too: folding the active image is another operation (a
# mirror, then a pivot), which a user asks for by name
ACTIVE_TOP = "is the active image: committing it is an active commit; add --active"


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _commit_arguments(args, nodes, label):
    """block-commit's arguments for the CLI's options."""
    if not nodes:
        raise QcowError(label, "the mount reports no images")
    active = nodes[0]
    arguments = {"job-id": args.job_id or DEFAULT_JOB_ID}
    if active.get("node-name"):
        arguments["device"] = active["node-name"]
    top_node = _match_node(nodes, args.top, "top", label)
    if args.active:
        if args.top is not None and top_node is not active:
            raise QcowError(
                args.top, "--active commits the active image; do not name another --top"
            )
        arguments["top"] = active["file"]
    elif args.top is None:
        if len(nodes) < 2:
            raise QcowError(label, "the chain has a single image: nothing to commit")
        if len(nodes) == 2:
            raise QcowError(
                label,
                f"nothing below the active image to commit (its "
                f"backing file {nodes[1].get('file')} is the base); "
                f"use --active",
            )
        arguments["top"] = nodes[1]["file"]
    elif top_node is active:
        raise QcowError(args.top, ACTIVE_TOP)
    elif top_node is not None:
        arguments["top"] = top_node["file"]
    else:
        arguments["top"] = args.top
    if args.base is not None:
        base_node = _match_node(nodes, args.base, "base", label)
        arguments["base"] = base_node["file"] if base_node is not None else args.base
    if args.speed:
        arguments["speed"] = parse_rate(args.speed)
    if args.mode and args.mode != "simple":
        arguments["x-mode"] = args.mode
    if args.delete:
        arguments["x-delete"] = True
    if getattr(args, "guard_dir", None):
        arguments["x-guard-dirs"] = [os.path.abspath(d) for d in args.guard_dir]
    if getattr(args, "force", False):
        arguments["x-force"] = True
    return arguments


def _live_commit(args):
    label = args.target
    mountpoint = os.path.realpath(args.target)
    if not args.control_socket and not os.path.ismount(mountpoint):
        raise QcowError(
            label,
            "is a directory but not a mountpoint (a live commit needs a qcowfs mount; "
            "an offline commit takes an image file)",
        )
    if args.pivot and not args.active:
        raise QcowError(label, "--pivot applies to an active commit: add --active")
    wait = args.wait or args.pivot
    conn = _connect(args, label)
    try:
        nodes = conn.execute("query-named-block-nodes")
        arguments = _commit_arguments(args, nodes, label)
        job_id = arguments["job-id"]
        conn.execute("block-commit", arguments)
        if not wait:
            print(job_id)
            return 0
        return _follow_and_say(
            conn, job_id, label, nodes, pivot=args.pivot, quiet=args.quiet, detach=False
        )
    finally:
        conn.close()


def _follow_and_say(conn, job_id, label, nodes_before, *, pivot, quiet, detach, what="Commit"):
    """Follow the job; once it ended well, one line on what the mount serves now."""
    end = _follow_commit(conn, job_id, pivot=pivot, label=label, detach=detach)
    if end == "done" and not quiet:
        nodes = conn.execute("query-named-block-nodes") or []
        files = [n.get("file", "?") for n in nodes]
        if nodes_before and files and files[0] != nodes_before[0].get("file"):
            print(f"Pivoted: {label} serves {files[0]}")
        else:
            print(f"{what} complete: {label} serves {' <- '.join(reversed(files))}")
    return 0


def _ready_note(label, job_id):
    print(
        f"qcowfs: {label}: job '{job_id}' is ready and keeps base in sync; "
        f"'qcowfs complete {label} {job_id}' pivots to base, "
        f"'qcowfs cancel {label} {job_id}' ends it and keeps the overlay",
        file=sys.stderr,
    )


def _job_updates(conn, job_id, label, timeout):
    """What happens to one job: (event name, data) for each of its events, or (None,
    its query-block-jobs entry, None once it is gone) when none came for `timeout`
    seconds. The mount shutting down raises."""
    while True:
        ev = conn.next_event(timeout=timeout)
        if ev is None:
            info = _find_job(conn, job_id)
            if not conn.has_pending_events:  # events that came before the reply say more
                yield None, info
            continue
        if ev.get("event") == "SHUTDOWN":
            raise QcowError(label, f"the mount shut down before job '{job_id}' ended")
        if _event_job(ev) == job_id:
            yield ev.get("event"), ev.get("data") or {}


def _follow_commit(conn, job_id, *, pivot, label, detach=False):
    """Follow a job's events to its end: "done", or "ready" (an active commit without
    pivot); a failure raises. Ctrl-C cancels the job, or with `detach` leaves it
    running."""
    bar = _Progress(job_id)
    completing = False
    try:
        for name, data in _job_updates(conn, job_id, label, POLL_INTERVAL):
            if name is None:
                info = data
                if info is None:
                    raise QcowError(label, f"job '{job_id}' disappeared before it finished")
                bar.update(info.get("offset", 0), info.get("len", 0))
                if info.get("status") == "concluded":  # auto-dismiss=false, end missed
                    if info.get("error"):
                        raise QcowError(label, f"job '{job_id}' failed: {info['error']}")
                    return "done"
                continue
            if name == "BLOCK_JOB_READY":
                bar.update(data.get("offset", 0), data.get("len", 0))
                if pivot:
                    if not completing:
                        completing = True
                        conn.execute("block-job-complete", {"device": job_id})
                    continue
                bar.close()
                _ready_note(label, job_id)
                return "ready"
            if name == "BLOCK_JOB_COMPLETED":
                bar.update(data.get("offset", 0), data.get("len", 0))
                if "error" in data:
                    raise QcowError(label, f"job '{job_id}' failed: {data['error']}")
                return "done"
            if name == "BLOCK_JOB_CANCELLED":
                raise QcowError(label, f"job '{job_id}' was cancelled")
            if name == "BLOCK_JOB_ERROR":
                continue  # BLOCK_JOB_COMPLETED with the error follows
    except KeyboardInterrupt:
        bar.close()
        if detach:
            print(
                f"qcowfs: {label}: detached; job '{job_id}' keeps running "
                f"('qcowfs wait {label} {job_id}' follows it again)",
                file=sys.stderr,
            )
            raise
        try:
            conn.execute("block-job-cancel", {"device": job_id, "force": True})
            print(f"qcowfs: {label}: interrupted: job '{job_id}' cancelled", file=sys.stderr)
        except QcowError:
            pass
        raise
    finally:
        bar.close()


def _offline_commit(args):
    image = args.target
    if args.pivot:
        raise QcowError(image, "--pivot applies to a live commit (TARGET must be a mountpoint)")
    from commit.engine import run_offline

    top = args.top
    if args.active and top is None:
        top = image
    elif not args.active and top is not None and _same_file(top, image):
        raise QcowError(top, ACTIVE_TOP)
    speed = parse_rate(args.speed) if args.speed else 0
    base = _offline_base(image, args.base) if args.active else None
    bar = _Progress(os.path.basename(image))
    try:
        dropped, stranded = run_offline(
            image,
            top=top,
            base=args.base,
            mode=args.mode,
            speed=speed,
            delete=args.delete,
            guard_dirs=list(getattr(args, "guard_dir", None) or []),
            force=bool(getattr(args, "force", False)),
            progress=bar.update,
        )
    finally:
        bar.close()
    if not args.quiet:
        print("Image committed.")
        if args.active and base is not None:
            print(
                f"Pivoted: the disk is now {base}; {image} is a leftover"
                + (" (deleted)" if args.delete else "")
            )
    for dep in stranded:
        print(f"qcowfs: warning: stranded (--force): {dep.message()}", file=sys.stderr)
    return 0


def _offline_base(image, base):
    """The file an offline active commit of `image` folds into (for the last line);
    None if it cannot tell (the commit itself then says why)."""
    import qcow
    from commit.target import find_layer

    try:
        with qcow.open_chain(image, image_locking=False, metadata_only=True) as chain:
            return (find_layer(chain, base) if base else chain.layers[-1]).path
    except QcowError:
        return None


# --------------------------------------------------------------------------- stream


def _live_target(args, label):
    """The mount at `label`: a qcowfs mountpoint (or any directory with --control-socket)."""
    if not args.control_socket and not os.path.ismount(os.path.realpath(label)):
        raise QcowError(label, "is not a mountpoint (this command works on a qcowfs mount)")


def cmd_stream(args):
    label = args.mountpoint
    _live_target(args, label)
    with _connect(args, label) as conn:
        nodes = conn.execute("query-named-block-nodes")
        job_id = args.job_id or DEFAULT_STREAM_JOB_ID
        arguments = {"job-id": job_id}
        if args.base is not None:
            node = _match_node(nodes, args.base, "base", label)
            arguments["base"] = node["file"] if node is not None else args.base
        if args.speed:
            arguments["speed"] = parse_rate(args.speed)
        if args.delete:
            arguments["x-delete"] = True
        if args.guard_dir:
            arguments["x-guard-dirs"] = [os.path.abspath(d) for d in args.guard_dir]
        if args.force:
            arguments["x-force"] = True
        conn.execute("block-stream", arguments)
        if not args.wait:
            print(job_id)
            return 0
        return _follow_and_say(
            conn, job_id, label, nodes, pivot=False, quiet=False, detach=False, what="Stream"
        )


# --------------------------------------------------------------------------- snapshot


def cmd_snapshot(args):
    label = args.mountpoint
    _live_target(args, label)
    new = absolute(args.new_image)
    if os.path.lexists(new):
        raise QcowError(args.new_image, "already exists; a snapshot creates a new image")
    with _connect(args, label) as conn:
        nodes = conn.execute("query-named-block-nodes")
        conn.execute(
            "blockdev-snapshot-sync",
            {"node-name": nodes[0]["node-name"], "snapshot-file": new, "format": "qcow2"},
        )
    return 0


# --------------------------------------------------------------------------- jobs


def cmd_jobs(args):
    label = args.mountpoint
    with _connect(args, label) as conn:
        jobs = conn.execute("query-block-jobs") or []
    if args.json:
        print(json.dumps(jobs, indent=4))
        return 0
    if not jobs:
        print("No jobs.")
        return 0
    rows = [("ID", "TYPE", "STATUS", "PROGRESS", "SPEED")]
    for j in jobs:
        length, offset = j.get("len", 0), j.get("offset", 0)
        pct = f" ({100 * offset // length}%)" if length else ""
        status = j.get("status", "?")
        if j.get("error"):
            status += f" ({j['error']})"
        speed = f"{_human(j['speed'])}/s" if j.get("speed") else "unlimited"
        rows.append(
            (
                j.get("device", "?"),
                j.get("type", "?"),
                status,
                f"{_human(offset)} / {_human(length)}{pct}",
                speed,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for j in jobs:
        if j.get("x-forced"):
            print(f"{j.get('device', '?')}: forced past the stranding guard; stranded:")
            for line in j.get("x-stranded", []):
                print(f"  {line}")
    return 0


def cmd_wait(args):
    label = args.mountpoint
    with _connect(args, label) as conn:
        jobs = conn.execute("query-block-jobs") or []
        job_id = args.job_id or _only_job(jobs, label)
        info = next((j for j in jobs if j.get("device") == job_id), None)
        if info is None:
            raise QcowError(label, f"no job '{job_id}' on this mount (see 'qcowfs jobs {label}')")
        if info.get("status") == "ready":
            _ready_note(label, job_id)
            return 0
        nodes = conn.execute("query-named-block-nodes")
        return _follow_and_say(
            conn,
            job_id,
            label,
            nodes,
            pivot=False,
            quiet=args.quiet,
            detach=True,
            what=str(info.get("type", "commit")).capitalize(),
        )


def _only_job(jobs, label):
    ids = [j.get("device", "?") for j in jobs if j.get("status") not in ("concluded", "null")]
    if not ids:
        raise QcowError(label, "no job is running on this mount")
    if len(ids) > 1:
        raise QcowError(label, f"several jobs run ({', '.join(ids)}); name one")
    return ids[0]


def cmd_set_speed(args):
    speed = parse_rate(args.speed, "RATE")
    with _connect(args, args.mountpoint) as conn:
        conn.execute("block-job-set-speed", {"device": args.job_id, "speed": speed})
    return 0


def cmd_job_verb(args):
    verb = args.command
    label = args.mountpoint
    job_id = args.job_id
    with _connect(args, label) as conn:
        if verb in ("pause", "resume"):
            conn.execute(f"block-job-{verb}", {"device": job_id})
            return 0
        if verb == "cancel":
            info = _find_job(conn, job_id)
            arguments = {"device": job_id}
            if info is not None and info.get("paused"):
                arguments["force"] = True  # QEMU refuses a soft cancel of a paused job
            conn.execute("block-job-cancel", arguments)
        elif verb == "complete":
            conn.execute("block-job-complete", {"device": job_id})
        else:  # pragma: no cover - argparse only routes the four verbs here
            raise QcowError(label, f"unknown job command {verb}")
        return _wait_end(conn, job_id, verb, label)


def _wait_end(conn, job_id, verb, label):
    """After cancel/complete: wait until the job ends; 0 if it ended as asked."""
    for name, data in _job_updates(conn, job_id, label, 1.0):
        if name is None:
            info = data
            if info is None:
                return 0  # gone without an event we saw (should not happen on one connection)
            if info.get("status") == "concluded":
                if info.get("error") and not (
                    verb == "cancel" and info["error"] == "Operation canceled"
                ):
                    raise QcowError(label, f"job '{job_id}' failed: {info['error']}")
                return 0
            continue
        if name == "BLOCK_JOB_CANCELLED":
            if verb == "cancel":
                return 0
            raise QcowError(label, f"job '{job_id}' was cancelled")
        if name == "BLOCK_JOB_COMPLETED":
            if "error" in data:
                raise QcowError(label, f"job '{job_id}' failed: {data['error']}")
            return 0


__all__ = [
    "cmd_commit",
    "cmd_stream",
    "cmd_snapshot",
    "cmd_jobs",
    "cmd_wait",
    "cmd_set_speed",
    "cmd_job_verb",
    "DEFAULT_JOB_ID",
]
