"""Section mount: `qcowfs mount` vs qemu-storage-daemon's FUSE export of the same chain:
fio (psync, one job, O_DIRECT) sequential 1 MiB read, 4 KiB random read, sequential
1 MiB write and 4 KiB random write, each into an empty overlay and into allocated
clusters; the server's CPU time per request beside each (steadier than throughput on
a busy machine); the same patterns on the floor of any pyfuse3 server; time to mount
(until the first 4 KiB read returns) and unmount; time to a usable `qcowfs info` beside
`qemu-img info`; the daemon's peak RSS after random reads of a 1 TiB chain."""

import json
import os
import time

from .chains import CHAIN, big, new_overlay, pristine
from .harness import (
    NA,
    OURS,
    QSD,
    M,
    Notes,
    T,
    fmt_num,
    median,
    ms,
    na_text,
    proc_status,
    qemu_img,
    say,
    timed,
)
from .servers import FLOOR, mount, mount_floor

MOUNT_GOAL_MS = 250  # or, on a slow machine, the bare imports of a mount plus MOUNT_SLACK_MS
MOUNT_SLACK_MS = 80
INFO_GOAL_MS = 150

# name: (fio --rw, --bs, time-based (else one pass over the file), the figure kept, row)
FIO_TESTS = {
    "seqread": ("read", "1M", True, "bw", "O_DIRECT sequential read, 1 MiB"),
    "randread": ("randread", "4k", True, "iops", "4 KiB random read, QD1"),
    "seqwrite": ("write", "1M", False, "bw", "sequential write 1 MiB into an empty overlay"),
    "seqwrite_alloc": (
        "write",
        "1M",
        False,
        "bw",
        "sequential write 1 MiB into allocated clusters",
    ),
    "randwrite": ("randwrite", "4k", True, "iops", "4 KiB random write into an empty overlay, QD1"),
    "randwrite_alloc": (
        "randwrite",
        "4k",
        True,
        "iops",
        "4 KiB random write into allocated clusters, QD1",
    ),
}
# the tests sharing one mount, in order: reads; a pass of sequential writes into the
# empty overlay, after which every cluster of it is allocated for the next two; random
# writes into another empty overlay
MOUNTS = (
    ("seqread", "randread"),
    ("seqwrite", "seqwrite_alloc", "randwrite_alloc"),
    ("randwrite",),
)
# the tests also run on the floor of a pyfuse3 server (a raw copy of the flat view served
# with one os.pread/os.pwrite per request): what any pyfuse3 server can reach here
FLOOR_TESTS = ("seqread", "randread", "seqwrite", "randwrite")


def fio(ctx, path, rw, bs, size, *, runtime=None, number_ios=None, direct=True):
    argv = [
        "fio",
        "--name=bench",
        f"--filename={path}",
        "--ioengine=psync",
        "--iodepth=1",
        "--numjobs=1",
        f"--direct={int(direct)}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--size={size}",
        "--fallocate=none",
        "--randrepeat=1",
        "--output-format=json",
    ]
    if runtime:
        argv += ["--time_based", f"--runtime={runtime}"]
    if number_ios:
        argv += [f"--number_ios={number_ios}"]
    _, _, so, _ = timed(ctx, argv, cpu=ctx.client_cpu, timeout=900)
    data = json.loads(so[so.index("{") :])
    job = data["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    if job.get("error"):
        raise NA(f"fio: error {job['error']}")
    return {
        "bw": side["bw_bytes"] / M,
        "iops": side["iops"],
        "ios": side["total_ios"],
        "clat_max_ms": side.get("clat_ns", {}).get("max", 0) / 1e6,
    }


def section_mount(ctx, sec):
    d = pristine(ctx)
    notes = Notes(sec)
    before = {n: os.stat(d / n).st_mtime_ns for n in CHAIN[:3]}
    floor = _start_rows(ctx, sec, d / "top.qcow2")
    _fio_rows(ctx, sec, notes, d / "top.qcow2", floor)
    _daemon_memory(ctx, sec, notes)
    after = {n: os.stat(d / n).st_mtime_ns for n in CHAIN[:3]}
    if after != before:
        notes.add("WARNING: a backing file of the chain was modified by a mount")
    sec.notes.append(
        f"fio psync, one job, O_DIRECT; servers on CPU {ctx.server_cpu}, fio on "
        f"CPU {ctx.client_cpu}; {ctx.rounds} rounds alternating who goes first; "
        f"random tests and sequential reads run {ctx.runtime} s; sequential write one "
        f"pass over {ctx.size // M} MiB; the write tests into an empty overlay each on a "
        "fresh empty active layer over the same read-only chain, those into allocated "
        "clusters after the sequential pass over it; server CPU per request: its "
        "user + system time over the run / fio's requests; the floor: "
        "scripts/benchlib/programs/pyfuse3_floor.py, one os.pread/os.pwrite per request "
        "into a raw copy of the flat view (its writes land in allocated blocks), pinned "
        "like the servers, once per round"
    )


class _Samples:
    """The samples of the mount section, per figure and server, and what could not run."""

    def __init__(self):
        keys = ("mount", *FIO_TESTS, "unmount")
        self.s = {k: {OURS: [], QSD: []} for k in keys}
        self.na = {OURS: {}, QSD: {}}
        self.clat_max = {OURS: [], QSD: []}  # of randwrite, ms
        self.cpu = {k: {OURS: [], QSD: []} for k in FIO_TESTS}  # server CPU us/request
        self.floor = {k: [] for k in FLOOR_TESTS}
        self.floor_cpu = {k: [] for k in FLOOR_TESTS}
        self.floor_na = None

    def val(self, key, kind):
        if key in self.na[kind]:
            return na_text(self.na[kind][key])
        if "mount" in self.na[kind] and not self.s[key][kind]:
            return na_text(self.na[kind]["mount"])
        return median(self.s[key][kind])


def _one_mount(ctx, kind, tests, top, notes, smp):
    """Mount a fresh overlay over top with `kind`, run the fio tests on it, unmount."""
    work = ctx.tmp / "mount" / kind
    active = new_overlay(work / "active.qcow2", top)
    # no write-back of an earlier test's writes (up to 1 GiB) may run during this one
    os.sync()
    with mount(ctx, kind, active, work, notes) as m:
        smp.s["mount"][kind].append(m.mount_time)
        for name in tests:
            try:
                r, cpu = _fio_test(ctx, m, name)
            except NA as e:
                smp.na[kind][name] = str(e)
                say(f"  {kind} {name}: n/a: {e}")
                continue
            smp.s[name][kind].append(r[FIO_TESTS[name][3]])
            if cpu is not None:
                smp.cpu[name][kind].append(cpu)
            if name == "randwrite":
                smp.clat_max[kind].append(r["clat_max_ms"])
        t_unmount = time.perf_counter()
    smp.s["unmount"][kind].append(time.perf_counter() - t_unmount)


def _floor_round(ctx, top, smp):
    """The FLOOR_TESTS on the floor server, one mount."""
    work = ctx.tmp / "mount" / FLOOR
    raw = work / "flat.raw"
    if not raw.exists():
        work.mkdir(parents=True, exist_ok=True)
        qemu_img("convert", "-O", "raw", top, raw)
        os.sync()
    with mount_floor(ctx, raw, work) as m:
        for name in FLOOR_TESTS:
            r, cpu = _fio_test(ctx, m, name)
            smp.floor[name].append(r[FIO_TESTS[name][3]])
            if cpu is not None:
                smp.floor_cpu[name].append(cpu)


def _fio_test(ctx, m, name):
    """Run FIO_TESTS[name] on the mounted file: (fio's results, the server's CPU time
    per request in us, or None when it could not be read)."""
    rw, bs, time_based, _figure, _row = FIO_TESTS[name]
    cpu0 = _cpu_seconds(m.pid)
    r = fio(ctx, m.file, rw, bs, ctx.size, runtime=ctx.runtime if time_based else None)
    cpu1 = _cpu_seconds(m.pid)
    if cpu0 is None or cpu1 is None or not r["ios"]:
        return r, None
    return r, (cpu1 - cpu0) / r["ios"] * 1e6


def _start_rows(ctx, sec, top):
    """`qcowfs info` beside `qemu-img info --backing-chain` of the chain, alternating who
    goes first, and the floor of a mount: a bare interpreter importing what a daemon
    cannot do without (pyfuse3, qcow). Returns that floor (s)."""
    argv = {
        OURS: [*ctx.qcowfs, "info", top],
        QSD: ["qemu-img", "info", "--backing-chain", top],
    }
    info = {OURS: [], QSD: []}
    floor = []
    for r in range(max(ctx.rounds, 5)):
        for kind in (OURS, QSD) if r % 2 == 0 else (QSD, OURS):
            info[kind].append(timed(ctx, argv[kind], cpu=ctx.server_cpu)[0])
        bare = [ctx.python, "-c", "import pyfuse3, qcow"]
        floor.append(timed(ctx, bare, cpu=ctx.server_cpu)[0])
    sec.row(
        "time to a usable `qcowfs info` (vs `qemu-img info --backing-chain`)",
        "ms",
        ms(median(info[OURS])),
        ms(median(info[QSD])),
        better="lower",
        goal=("abs", INFO_GOAL_MS),
        samples=info,
    )
    sec.row(
        "bare `python -c 'import pyfuse3, qcow'` (the floor of a mount)",
        "ms",
        ms(median(floor)),
        None,
        better="",
        samples={OURS: floor},
    )
    return median(floor)


def _fio_rows(ctx, sec, notes, top, floor):
    smp = _Samples()
    for r in range(ctx.rounds):
        order = (OURS, QSD) if r % 2 == 0 else (QSD, OURS)
        say(f"mount: round {r + 1}/{ctx.rounds} ({' then '.join(order)})")
        for kind in order:
            for tests in MOUNTS:
                if all(t in smp.na[kind] for t in tests) or "mount" in smp.na[kind]:
                    continue
                try:
                    _one_mount(ctx, kind, tests, top, notes, smp)
                except NA as e:
                    smp.na[kind]["mount"] = str(e)
                    say(f"  {kind}: n/a: {e}")
        if smp.floor_na is None:
            try:
                _floor_round(ctx, top, smp)
            except NA as e:
                smp.floor_na = str(e)
                say(f"  {FLOOR}: n/a: {e}")
    s, val = smp.s, smp.val
    sec.row(
        "time to mount (command start to file serving)",
        "ms",
        ms(val("mount", OURS)),
        ms(val("mount", QSD)),
        better="lower",
        goal=("abs", round(max(MOUNT_GOAL_MS, ms(floor) + MOUNT_SLACK_MS))),
        note="ours: `qcowfs mount` returns (it waits for the daemon); QSD: process start "
        "until its export file stats with the virtual size; then both read the first "
        f"4 KiB. Goal: {MOUNT_GOAL_MS} ms, or the bare imports plus {MOUNT_SLACK_MS} ms",
        samples=s["mount"],
    )
    for name, (*_, figure, title) in FIO_TESTS.items():
        note = ""
        if name == "randwrite":
            note = (
                "fio clat max (ms), median of rounds: ours "
                f"{fmt_num(median(smp.clat_max[OURS]))}, QSD "
                f"{fmt_num(median(smp.clat_max[QSD]))}"
            )
        sec.row(
            title,
            "MiB/s" if figure == "bw" else "IOPS",
            val(name, OURS),
            val(name, QSD),
            goal=("rel", 1),
            samples=s[name],
            note=note,
        )
        sec.row(
            "  server CPU per request",
            "us",
            median(smp.cpu[name][OURS]),
            median(smp.cpu[name][QSD]),
            better="lower",
            goal=(),
            samples=smp.cpu[name],
        )
        if name in FLOOR_TESTS:
            sec.row(
                "  the floor: a minimal pyfuse3 server of a raw file",
                "MiB/s" if figure == "bw" else "IOPS",
                na_text(smp.floor_na) if smp.floor_na else median(smp.floor[name]),
                val(name, QSD),
                goal=(),
                samples={OURS: smp.floor[name]},
                note=f"its CPU per request: {fmt_num(median(smp.floor_cpu[name]))} us",
            )
    sec.row(
        "time to unmount (after the last request)",
        "ms",
        ms(median(s["unmount"][OURS])),
        ms(median(s["unmount"][QSD])),
        better="lower",
        goal=(),
        samples=s["unmount"],
    )


def _cpu_seconds(pid):
    """User + system CPU time of a process and all its threads so far, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon_memory(ctx, sec, notes):
    """Memory of the daemon: the 1 TiB chain read at random through the mount."""
    b = big(ctx)
    nreads = 5000 if ctx.quick else 20000
    mem = {}
    for kind in (OURS, QSD):
        work = ctx.tmp / "mount-big" / kind
        try:
            active = new_overlay(work / "active.qcow2", b / "top.qcow2")
            with mount(ctx, kind, active, work, notes) as m:
                st0 = proc_status(m.pid)
                fio(ctx, m.file, "randread", "4k", T, number_ios=nreads)
                st = proc_status(m.pid)
                mem[kind] = st.get("VmHWM", 0) / M
                if kind == OURS:
                    notes.add(
                        f"ours: daemon RSS {st0.get('VmRSS', 0) / M:.0f} MiB after mount, "
                        f"{st.get('VmRSS', 0) / M:.0f} MiB after the reads"
                    )
        except NA as e:
            mem[kind] = na_text(e)
    sec.row(
        f"daemon peak RSS after {nreads // 1000}k random 4 KiB reads, 1 TiB chain",
        "MiB",
        mem.get(OURS),
        mem.get(QSD),
        better="lower",
        goal=("abs", 64),
    )
