"""Sections commit and active.

commit: offline `qcowfs commit active.qcow2` vs `qemu-img commit -b base top` (the same
work: (base, top] into base); live block-commit of top into base over our control
socket vs QSD's QMP, idle and under a 4 KiB random-write load: time, guest write IOPS
during the job vs idle, longest guest write stall, guest read latency, the longest wait
for query-block-jobs.

active: active commit (top = the active image): time to READY and to COMPLETED
(block-job-complete sent at READY), idle and under load, ours vs QSD; longest write
stall around the pivot."""

import json
import shutil
import time

from .chains import chain_stats, copy_chain, pristine
from .harness import (
    NA,
    OURS,
    QSD,
    ROOT,
    M,
    Notes,
    fmt_num,
    last_line,
    median,
    na_text,
    qemu_img,
    say,
    timed,
)
from .load import Load, QueryProbe, latencies, longest_gap, percentile, rate
from .servers import QMP, QMPError, mount

JOB = "c"  # job id used for every block-commit
FIGURES = (
    "ready",
    "done",
    "iops_idle",
    "iops_job",
    "stall_job",
    "stall_idle",
    "write_p999",
    "stall_pivot",
    "iops_sync",
    "len",
    "query_max",
    "read_p99",
    "read_max",
)


# ----------------------------------------------------------------------------- offline


def section_commit(ctx, sec):
    notes = Notes(sec)
    s, na = _offline_runs(ctx, notes)
    imports = []
    for _ in range(3):
        try:
            w, _, _, _ = timed(
                ctx,
                [ctx.python, "-c", "import commit.engine, fusefs.cli, qcow"],
                cpu=ctx.server_cpu,
                cwd=ROOT,
            )
            imports.append(w)
        except NA:
            break
    st = chain_stats(ctx.size)
    sec.row(
        "offline commit of (base, top] into base",
        "s",
        na_text(na["ours"]) if "ours" in na else median(s["ours"]),
        na_text(na["qemu"]) if "qemu" in na else median(s["qemu"]),
        better="lower",
        goal=("rel", 1),
        note=f"`qcowfs commit active.qcow2` vs `qemu-img commit -b base.qcow2 top.qcow2`, "
        f"whole processes; {st['to_commit'] / M:.0f} MiB allocated in (base, top]; of "
        f"ours, starting Python and importing the project takes "
        f"{fmt_num(median(imports))} s",
        samples=s,
    )
    live_rows(ctx, sec, notes, active=False)


def _offline_runs(ctx, notes):
    """Offline commits on fresh copies of the chain, alternating who goes first;
    (seconds per who, what could not run)."""
    d = pristine(ctx)
    cpu = ctx.server_cpu
    runs = ctx.tmp / "commit"
    s = {"ours": [], "qemu": []}
    na = {}
    say("commit: offline")
    for r in range(ctx.commit_rounds):
        a, b = runs / "off-ours", runs / "off-qemu"
        copy_chain(d, a)
        copy_chain(d, b)
        order = ("ours", "qemu") if r % 2 == 0 else ("qemu", "ours")
        for who in order:
            if who in na:
                continue
            try:
                if who == "ours":
                    wall, _, _, _ = timed(ctx, [*ctx.qcowfs, "commit", a / "active.qcow2"], cpu=cpu)
                else:
                    wall, _, _, _ = timed(
                        ctx,
                        ["qemu-img", "commit", "-q", "-b", "base.qcow2", b / "top.qcow2"],
                        cpu=cpu,
                        cwd=b,
                    )
                s[who].append(wall)
            except NA as e:
                na[who] = str(e)
        if r == 0 and not na:
            _check_offline(a, b, notes)
        shutil.rmtree(a)
        shutil.rmtree(b)
    return s, na


def _check_offline(a, b, notes):
    """Base after our commit (in a) against base after qemu-img's (in b)."""
    cp = qemu_img(
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        a / "base.qcow2",
        b / "base.qcow2",
        check=False,
    )
    notes.add(
        "offline: base after our commit "
        + ("equals" if cp.returncode == 0 else "DIFFERS FROM")
        + " base after qemu-img's (qemu-img compare)"
    )
    cp = qemu_img("check", "-q", a / "base.qcow2", check=False)
    if cp.returncode != 0:
        notes.add(f"offline: qemu-img check of our base: exit {cp.returncode}")


# ----------------------------------------------------------------------------- one live run


def live_commit_run(ctx, kind, chain_dir, work, *, active, load, notes):
    """One live commit on a mount of chain_dir; a dict of figures (seconds, IOPS)."""
    res = {}
    # QEMU 7.2's writable FUSE export holds the RESIZE permission for good, and the
    # mirror job of an active commit unshares it: QSD can active-commit only under a
    # read-only export (enough when idle).
    writable = not (active and kind == QSD and not load)
    with mount(ctx, kind, chain_dir / "active.qcow2", work, notes, writable) as m:
        q = QMP(m.qmp)
        guest = reader = probe = None
        try:
            if load:
                guest = Load(ctx, m.file, ctx.size, work)
                if not active:
                    reader = Load(ctx, m.file, ctx.size, work, mode="read")
                time.sleep(1.2)
            args = _commit_args(kind, m, chain_dir, active)
            q.clear()
            t0 = time.monotonic()
            _block_commit(q, kind, active, args)
            if reader is not None:
                probe = QueryProbe(m.probe)
            t_ready = t_cs = None
            if active:
                _, t_ready = q.wait_event({"BLOCK_JOB_READY"}, JOB)
                t_cs = time.monotonic()
                q.cmd("block-job-complete", {"device": JOB})
                res["ready"] = t_ready - t0
            ev, t1 = q.wait_event({"BLOCK_JOB_COMPLETED"}, JOB)
            if (ev.get("data") or {}).get("error"):
                raise NA(f"job failed: {ev['data']['error']}")
            res["done"] = t1 - t0
            res["len"] = (ev.get("data") or {}).get("len")
            if probe is not None:
                res["query_max"] = probe.finish()
                probe = None
            if reader is not None:
                rts, summary = reader.finish()
                reader = None
                res.update(_reader_figures(kind, rts, summary, t0, t1, notes))
            if guest is not None:
                time.sleep(0.3)
                ts, summary = guest.finish()
                guest = None
                res.update(_writer_figures(kind, ts, summary, (t0, t_ready, t_cs, t1), notes))
            _check_nodes(q, kind, active, notes)
        finally:
            for p in (guest, reader):
                if p is not None:
                    p.kill()
            if probe is not None:
                probe.finish()
            q.close()
    return res


def _commit_args(kind, m, chain_dir, active):
    base, top, act = (str(chain_dir / n) for n in ("base.qcow2", "top.qcow2", "active.qcow2"))
    args = {"job-id": JOB, "base": base}
    if m.device:
        args["device"] = m.device
    if not active:
        args["top"] = top
    elif kind == OURS:
        args["top"] = act
    return args


def _block_commit(q, kind, active, args):
    try:
        q.cmd("block-commit", args)
    except QMPError as e:
        if kind == QSD and active and "Permission conflict" in str(e) and "resize" in str(e):
            raise NA(
                "QEMU 7.2 cannot: its writable FUSE export holds the RESIZE "
                "permission, which the active commit's mirror job unshares "
                "(block-commit: Permission conflict ... 'resize')"
            ) from None
        raise


def _note_errors(notes, kind, who, what, summary):
    if summary["errors"]:
        notes.add(
            f"{kind}: the guest {who} saw {summary['errors']} {what} errors "
            f"({summary['last_error']})"
        )


def _reader_figures(kind, rts, summary, t0, t1, notes):
    _note_errors(notes, kind, "reader", "read", summary)
    lat = latencies(rts, t0, t1)
    return {"read_p99": percentile(lat, 99), "read_max": lat[-1] if lat else None}


def _writer_figures(kind, ts, summary, times, notes):
    """Figures of the guest writer; times: block-commit sent, READY arrived and
    block-job-complete sent (active commit only, else None), COMPLETED arrived."""
    t0, t_ready, t_cs, t1 = times
    _note_errors(notes, kind, "writer", "write", summary)
    idle_a, idle_b = t0 - 1.0, t0
    res = {
        "iops_idle": rate(ts, idle_a, idle_b),
        "iops_job": rate(ts, t0, t1),
        "stall_job": longest_gap(ts, t0, t1),
        "stall_idle": longest_gap(ts, idle_a + 0.05, idle_b - 0.05),
        "write_p999": percentile(latencies(ts, t0, t1), 99.9),
    }
    if t_ready is not None:
        res["stall_pivot"] = longest_gap(ts, t_cs, t1)
        res["iops_sync"] = rate(ts, t0, t_ready)
    return res


def _check_nodes(q, kind, active, notes):
    """Ours: the mount reports the reduced chain after the job."""
    nodes = q.cmd("query-named-block-nodes") if kind == OURS else None
    if nodes is not None:
        want = 1 if active else 2
        if len(nodes) != want:
            notes.add(f"ours: after the job the mount reports {len(nodes)} images, expected {want}")


def _check_after(kind, chain_dir, active, notes):
    """After the first idle run: the reduced chain and a clean qemu-img check."""
    img = chain_dir / ("base.qcow2" if active else "active.qcow2")
    cp = qemu_img("info", "-U", "--backing-chain", "--output=json", img, check=False)
    if cp.returncode == 0:
        n = len(json.loads(cp.stdout))
        want = 1 if active else 2
        if n != want:
            notes.add(f"{kind}: after the job, {img.name}'s chain has {n} images, expected {want}")
    for name in ("base.qcow2", "active.qcow2"):
        cp = qemu_img("check", "-q", chain_dir / name, check=False)
        if cp.returncode != 0:
            notes.add(
                f"{kind}: qemu-img check {name} after the job: exit {cp.returncode} "
                f"{last_line(cp.stderr or cp.stdout)}"
            )


# ----------------------------------------------------------------------------- the rounds


class _Live:
    """Samples of the live runs per (server, under load?) and figure, and what could
    not run; medians of them as table cells."""

    def __init__(self):
        self.s = {
            (kind, load): {f: [] for f in FIGURES} for kind in (OURS, QSD) for load in (False, True)
        }
        self.na = {}

    def v(self, kind, load, f, scale=1.0):
        if (kind, load) in self.na:
            return na_text(self.na[(kind, load)])
        m = median(self.s[(kind, load)][f])
        return m * scale if m is not None else None

    def both(self, f, load, scale=1.0):
        return self.v(OURS, load, f, scale), self.v(QSD, load, f, scale)

    def pct(self, kind, load, f="iops_job"):
        if (kind, load) in self.na:
            return na_text(self.na[(kind, load)])
        s = self.s[(kind, load)]
        xs = [j / i for j, i in zip(s[f], s["iops_idle"], strict=True) if i and j is not None]
        return 100 * median(xs) if xs else None

    def samples(self, f, load):
        return {OURS: self.s[(OURS, load)][f], QSD: self.s[(QSD, load)][f]}


def _live_runs(ctx, notes, active):
    """The live commits of a section: rounds alternating who goes first, idle then
    under load, each on a fresh copy of the chain."""
    d = pristine(ctx)
    runs = ctx.tmp / ("active" if active else "commit")
    label = "active" if active else "live"
    live = _Live()
    for r in range(ctx.commit_rounds):
        order = (OURS, QSD) if r % 2 == 0 else (QSD, OURS)
        for load in (False, True):
            say(
                f"{label} commit: round {r + 1}/{ctx.commit_rounds}, "
                f"{'under load' if load else 'idle'} ({' then '.join(order)})"
            )
            for kind in order:
                key = (kind, load)
                if key in live.na:
                    continue
                chain_dir = copy_chain(d, runs / kind / "chain")
                try:
                    res = live_commit_run(
                        ctx,
                        kind,
                        chain_dir,
                        runs / kind / "run",
                        active=active,
                        load=load,
                        notes=notes,
                    )
                    for f, v in res.items():
                        live.s[key][f].append(v)
                    if r == 0 and not load:
                        _check_after(kind, chain_dir, active, notes)
                except NA as e:
                    live.na[key] = str(e)
                    say(f"  {kind} {'load' if load else 'idle'}: n/a: {e}")
                finally:
                    shutil.rmtree(chain_dir, ignore_errors=True)
    return live


def _ms(figure, key, goal=("abs", 10), samples=True):
    """A row of a guest latency under load, in ms, lower better."""
    return (figure, "ms", key, True, 1000, "lower", goal, samples)


# The rows of the two sections: (figure, unit, figure key ("pct": IOPS during the job
# as a share of idle), under load?, scale, better, goal, with samples?)
WRITE_P999_ROW = _ms("guest 4 KiB write latency during the job, p99.9", "write_p999")
STALL_IDLE_ROW = _ms(
    "  longest write stall in the idle second before (noise floor)", "stall_idle", (), samples=False
)
IOPS_IDLE_ROW = (
    "guest 4 KiB write IOPS, idle (the second before the job)",
    "IOPS",
    "iops_idle",
    True,
    1,
    "higher",
    (),
    True,
)
COMMIT_ROWS = (
    ("live commit (base, top] into base, idle", "s", "done", False, 1, "lower", ("rel", 1), True),
    ("live commit, under 4 KiB random-write load", "s", "done", True, 1, "lower", ("rel", 1), True),
    IOPS_IDLE_ROW,
    (
        "guest 4 KiB write IOPS during the job",
        "IOPS",
        "iops_job",
        True,
        1,
        "higher",
        ("rel", 1),
        True,
    ),
    ("  during the job / idle", "%", "pct", True, 1, "higher", ("abs", 70), False),
    _ms("longest guest write stall during the job (switch-over included)", "stall_job"),
    WRITE_P999_ROW,
    STALL_IDLE_ROW,
    _ms("guest 4 KiB read latency during the job, p99", "read_p99", ("rel", 1)),
    _ms("guest 4 KiB read latency during the job, max", "read_max", ("rel", 1)),
    _ms("longest wait for query-block-jobs during the job", "query_max", ("abs", 1000)),
)
ACTIVE_ROWS = (
    (
        "active commit: block-commit to READY, idle",
        "s",
        "ready",
        False,
        1,
        "lower",
        ("rel", 1),
        True,
    ),
    (
        "active commit: block-commit to COMPLETED, idle",
        "s",
        "done",
        False,
        1,
        "lower",
        ("rel", 1),
        True,
    ),
    (
        "active commit: to READY under 4 KiB random-write load",
        "s",
        "ready",
        True,
        1,
        "lower",
        ("rel", 1),
        True,
    ),
    ("active commit: to COMPLETED under load", "s", "done", True, 1, "lower", ("rel", 1), True),
    IOPS_IDLE_ROW,
    ("guest write IOPS during the job", "IOPS", "iops_job", True, 1, "higher", ("rel", 1), True),
    ("  during the job / idle", "%", "pct", True, 1, "higher", ("rel", 1), False),
    _ms("longest write stall around the pivot (complete to COMPLETED)", "stall_pivot"),
    _ms("longest write stall during the whole job", "stall_job"),
    WRITE_P999_ROW,
    STALL_IDLE_ROW,
)


def live_rows(ctx, sec, notes, *, active):
    live = _live_runs(ctx, notes, active)
    for figure, unit, f, load, scale, better, goal, with_samples in (
        ACTIVE_ROWS if active else COMMIT_ROWS
    ):
        cells = (
            (live.pct(OURS, load), live.pct(QSD, load)) if f == "pct" else live.both(f, load, scale)
        )
        sec.row(
            figure,
            unit,
            *cells,
            better=better,
            goal=goal,
            samples=live.samples(f, load) if with_samples else {},
        )
    lens = {kind: median(live.s[(kind, False)]["len"]) for kind in (OURS, QSD)}
    sec.notes.append(
        f"{ctx.commit_rounds} rounds alternating who goes first, a fresh copy of the chain "
        f"(then sync) per run; block-commit over QMP with the same client (qemu.qmp) for "
        f"both; times from sending block-commit to the event's arrival"
        + ("; block-job-complete sent as soon as BLOCK_JOB_READY arrives" if active else "")
        + f"; job len: ours {fmt_num(lens[OURS] / M if lens[OURS] else None)} MiB, QSD "
        f"{fmt_num(lens[QSD] / M if lens[QSD] else None)} MiB"
    )
    if active:
        sec.notes.append(
            "QSD's idle active commit runs under a read-only FUSE export (QEMU "
            "7.2 refuses the mirror job under a writable one, see its n/a)"
        )
    sec.notes.append(
        f"guest load: Python, 4 KiB O_DIRECT random pwrite at QD1 on CPU "
        f"{ctx.client_cpu} (servers on CPU {ctx.server_cpu}), started 1.2 s "
        "before the job; stall = longest gap between two write completions "
        "overlapping the window"
        + (
            ""
            if active
            else "; beside it a 4 KiB O_DIRECT random reader at "
            "QD1 (read latency = gap between its completions) and a second "
            "QMP client asking query-block-jobs every 20 ms"
        )
    )


def section_active(ctx, sec):
    live_rows(ctx, sec, Notes(sec), active=True)
