"""Section writer: sequential 1 MiB `chain.write` into an empty active layer vs
`qemu-img bench -w -s 1M -t writeback` on the same kind of image."""

import os

from .chains import new_overlay, pristine
from .harness import M, attempt, median, na_text, py_json, qemu_img_bench, say


def section_writer(ctx, sec):
    top = pristine(ctx) / "top.qcow2"
    total = min(256 * M, ctx.size) if not ctx.quick else min(64 * M, ctx.size)
    work = ctx.tmp / "writer"
    cpu = ctx.server_cpu
    s = {"ours": [], "ours_loop": [], "qemu": [], "qemu_self": []}
    na = {}

    def ours():
        img = new_overlay(work / "w-ours.qcow2", top)
        os.sync()
        r, _, _ = py_json(ctx, "seq_write", img, total, M, 0x5A, cpu=cpu)
        s["ours"].append(r["total"])
        s["ours_loop"].append(r["loop"])

    def qemu():
        img = new_overlay(work / "w-qemu.qcow2", top)
        os.sync()
        opts = ("-w", "-s", "1M", "-c", total // M, "-t", "writeback", "--pattern=0x5a")
        wall, own = qemu_img_bench(ctx, img, *opts, cpu=cpu)
        s["qemu"].append(wall)
        s["qemu_self"].append(own)

    tests = {"ours": ours, "qemu": qemu}
    for r in range(ctx.rounds + 1):  # round 0: warm-up, not counted
        say(f"writer: round {r}/{ctx.rounds}" + (" (warm-up)" if r == 0 else ""))
        for name in tests if r % 2 == 0 else reversed(list(tests)):
            if name not in na:
                attempt(tests[name], na, name)
        if r == 0:
            for k in s:
                s[k].clear()

    def mibs(key, who):
        if who in na:
            return na_text(na[who])
        t = median(s[key])
        return total / M / t if t else None

    sec.row(
        f"{total // M} MiB of sequential 1 MiB writes into an empty active layer, "
        "with the final flush and close",
        "MiB/s",
        mibs("ours", "ours"),
        mibs("qemu", "qemu"),
        goal=("rel", 1),
        note="ours: open_chain(writable) + chain.write loop + close (flush, fdatasync), "
        "one thread; qemu-img bench -w -s 1M -t writeback (64 requests in flight): "
        "its whole process",
        samples=s,
    )
    sec.row(
        "  writes only (before the final flush)",
        "MiB/s",
        mibs("ours_loop", "ours"),
        mibs("qemu_self", "qemu"),
        goal=(),
        note="qemu: the 'Run completed in' time qemu-img bench prints",
    )
