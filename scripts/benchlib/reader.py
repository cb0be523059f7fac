"""Section reader: sequential `chain.read` in 1 MiB pieces vs `qemu-img convert -O raw`
(and `qemu-img bench` reading); opening a 1 TiB sparse chain; peak RSS after random
4 KiB reads of a 1 TiB sparse chain vs `qemu-io` doing the same."""

import random

from .chains import big, pristine
from .harness import (
    NA,
    OURS,
    QSD,
    M,
    T,
    attempt,
    fs_type,
    median,
    ms,
    na_text,
    py_json,
    qemu_img_bench,
    say,
    timed,
)


def section_reader(ctx, sec):
    _sequential(ctx, sec)
    _open_time(ctx, sec)
    _random_reads(ctx, sec)


def _sequential(ctx, sec):
    active = pristine(ctx) / "active.qcow2"
    size = ctx.size
    out = ctx.tmp / "convert.raw"
    cpu = ctx.server_cpu
    s = {"ours": [], "convert": [], "unsafe": [], "bench": [], "bench_self": []}
    na = {}

    def ours():
        r, _, _ = py_json(ctx, "seq_read", active, M, cpu=cpu)
        s["ours"].append(r["seconds"])

    def convert(unsafe):
        out.unlink(missing_ok=True)
        argv = (
            ["qemu-img", "convert", "-O", "raw"]
            + (["-t", "unsafe"] if unsafe else [])
            + [active, out]
        )
        wall, _, _, _ = timed(ctx, argv, cpu=cpu)
        out.unlink(missing_ok=True)
        s["unsafe" if unsafe else "convert"].append(wall)

    def bench():
        wall, own = qemu_img_bench(ctx, active, "-d", "1", "-s", "1M", "-c", size // M, cpu=cpu)
        s["bench"].append(wall)
        s["bench_self"].append(own)

    tests = {
        "ours": ours,
        "convert": lambda: convert(False),
        "unsafe": lambda: convert(True),
        "bench": bench,
    }
    say("reader: warm-up")
    for name, fn in tests.items():  # page cache warm for everyone
        attempt(fn, na, name)
    for k in s:
        s[k].clear()
    for r in range(ctx.rounds):
        say(f"reader: round {r + 1}/{ctx.rounds}")
        names = list(tests) if r % 2 == 0 else list(reversed(tests))
        for name in names:
            if name not in na:
                attempt(tests[name], na, name)

    _sequential_rows(ctx, sec, s, na)


def _sequential_rows(ctx, sec, s, na):
    size = ctx.size

    def mibs(key):
        if key in na:
            return na_text(na[key])
        t = median(s[key])
        return size / M / t if t else None

    sec.row(
        "sequential read, 1 MiB pieces vs qemu-img convert -O raw (to a file)",
        "MiB/s",
        mibs("ours"),
        mibs("convert"),
        goal=("rel", 1),
        note="convert writes a raw file on the same file system "
        f"({fs_type(ctx.tmp)}) with its default cache (fdatasync at the end); "
        "ours is chain.read in a loop (open to close), interpreter start excluded",
        samples={k: s[k] for k in ("ours", "convert")},
    )
    sec.row(
        "  same, vs qemu-img convert -t unsafe (no final flush)",
        "MiB/s",
        mibs("ours"),
        mibs("unsafe"),
        better="higher",
        goal=(),
        samples={"unsafe": s["unsafe"]},
    )
    bench_self = median(s["bench_self"])
    sec.row(
        "  same, vs qemu-img bench -d 1 -s 1M (read, QD1, wall)",
        "MiB/s",
        mibs("ours"),
        mibs("bench"),
        goal=(),
        note=(
            f"qemu-img bench's own loop time: {size / M / bench_self:,.0f} MiB/s"
            if bench_self
            else ""
        ),
        samples={"bench": s["bench"], "bench_self": s["bench_self"]},
    )


def _open_time(ctx, sec):
    """Open time of a 1 TiB sparse chain."""
    bactive = big(ctx) / "active.qcow2"
    cpu = ctx.server_cpu
    opens, qopens, ona = [], [], {}

    def ours():
        res, _, _ = py_json(ctx, "open_time", bactive, 3, cpu=cpu)
        opens.append(median(res["times"]))

    def qemu():
        wall, _, _, _ = timed(
            ctx,
            ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -q {T - 4096} 4096", bactive],
            cpu=cpu,
        )
        qopens.append(wall)

    for r in range(max(ctx.rounds, 3)):
        for who in (OURS, QSD) if r % 2 == 0 else (QSD, OURS):
            if who == OURS and "o" not in ona:
                attempt(ours, ona, "o")
            elif who == QSD and "q" not in ona:
                attempt(qemu, ona, "q")
    sec.row(
        "open a 1 TiB sparse 3-layer chain (+ one 4 KiB read)",
        "ms",
        na_text(ona["o"]) if "o" in ona else ms(median(opens)),
        na_text(ona["q"]) if "q" in ona else ms(median(qopens)),
        better="lower",
        goal=("abs", 1000),
        note="ours: open_chain + read + close in-process; qemu-io: the whole process",
        samples={"ours": opens, "qemu": qopens},
    )


def _random_reads(ctx, sec):
    """RSS after random reads of the 1 TiB chain."""
    bactive = big(ctx) / "active.qcow2"
    cpu = ctx.server_cpu
    nreads = 5000 if ctx.quick else 20000
    rng = random.Random(1234)
    offs = [rng.randrange(T // 4096) * 4096 for _ in range(nreads)]
    offfile = ctx.tmp / "offsets.txt"
    offfile.write_text("\n".join(map(str, offs)))
    rss_ours = rss_q = None
    note = ""
    try:
        res, _, peak = py_json(ctx, "random_reads", bactive, offfile, cpu=cpu)
        rss_ours = peak / M
        note = (
            f"ours: RSS {res['before'] / M:.0f} MiB after open, {res['after'] / M:.0f} MiB "
            f"after the reads; peak of the whole Python process shown"
        )
    except NA as e:
        rss_ours = na_text(e)
    try:
        argv = ["qemu-io", "-r", "-f", "qcow2"]
        for o in offs:
            argv += ["-c", f"read -q {o} 4096"]
        _, peak, _, _ = timed(ctx, argv + [bactive], cpu=cpu)
        rss_q = peak / M
    except NA as e:
        rss_q = na_text(e)
    sec.row(
        f"peak RSS after {nreads // 1000}k random 4 KiB reads, 1 TiB chain",
        "MiB",
        rss_ours,
        rss_q,
        better="lower",
        goal=("abs", 64),
        note=note,
    )
