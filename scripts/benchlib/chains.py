"""The test chains, deterministic and built with qemu-img and qemu-io: the measured
chain base <- mid <- top <- active (built once per run), the 1 TiB sparse chain, fresh
overlays and copies for the tests that write."""

import os
import random
import shutil
import time
from pathlib import Path

from .harness import CLUSTER, G, M, T, qemu_img, qemu_io, run, say

RUN_LENGTHS = (1, 2, 4, 8, 16, 32)  # clusters per allocation run in the test chain
CHAIN = ("base.qcow2", "mid.qcow2", "top.qcow2", "active.qcow2")


def plan_chain(size, seed=0x9C0F5):
    """Allocation runs of the deterministic chain: (first cluster, clusters, layer, mid
    also under top?). Runs of 1..32 clusters; 30% of runs top, 22% mid, 48% base only."""
    rng = random.Random(seed)
    n = size // CLUSTER
    runs, c = [], 0
    while c < n:
        length = min(rng.choice(RUN_LENGTHS), n - c)
        r = rng.random()
        layer = "top" if r < 0.30 else "mid" if r < 0.52 else "base"
        under = layer == "top" and rng.random() < 0.5
        runs.append((c, length, layer, under))
        c += length
    return runs


def chain_stats(size):
    n = size // CLUSTER
    top = mid_vis = mid_all = 0
    for _, length, layer, under in plan_chain(size):
        if layer == "top":
            top += length
            mid_all += length if under else 0
        elif layer == "mid":
            mid_vis += length
            mid_all += length
    return {
        "clusters": n,
        "top": top / n,
        "mid": mid_vis / n,
        "base": (n - top - mid_vis) / n,
        "mid_allocated": mid_all * CLUSTER,
        "top_allocated": top * CLUSTER,
        "to_commit": (top + mid_vis) * CLUSTER,
    }


def _create(img, size=None, backing=None, cwd=None):
    """A qcow2 image with 64 KiB clusters, over `backing` (a name relative to cwd) if
    given; the size defaults to the backing file's."""
    back = ["-b", backing, "-F", "qcow2"] if backing else []
    sized = [str(size)] if size is not None else []
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", *back, img, *sized, cwd=cwd
    )


def build_chain(d, size):
    """base <- mid <- top <- active in d (relative backing names, 64 KiB clusters)."""
    d.mkdir(parents=True, exist_ok=True)
    _create(d / "base.qcow2", size)
    step = 64 * M
    qemu_io(
        d / "base.qcow2",
        [f"write -q -P 0x11 {o} {min(step, size - o)}" for o in range(0, size, step)],
    )
    mid_cmds, top_cmds = [], []
    for k, (c, length, layer, under) in enumerate(plan_chain(size)):
        off, n = c * CLUSTER, length * CLUSTER
        if layer == "top":
            top_cmds.append(f"write -q -P {0x80 | (k & 0x3F)} {off} {n}")
            if under:
                mid_cmds.append(f"write -q -P {0x40 | (k & 0x3F)} {off} {n}")
        elif layer == "mid":
            mid_cmds.append(f"write -q -P {0x40 | (k & 0x3F)} {off} {n}")
    for name, back, cmds in (
        ("mid", "base", mid_cmds),
        ("top", "mid", top_cmds),
        ("active", "top", []),
    ):
        img = d / f"{name}.qcow2"
        _create(img, size, f"{back}.qcow2", cwd=d)
        if cmds:
            qemu_io(img, cmds)
    return d


def build_big(d):
    """A 1 TiB sparse chain base <- top <- active with an L2 table in every 512 MiB of
    base and of top (2,048 each): random reads touch far more tables than any cache
    holds."""
    d.mkdir(parents=True, exist_ok=True)
    span = 512 * M
    _create(d / "base.qcow2", T)
    qemu_io(d / "base.qcow2", [f"write -q -P 0x11 {o} 65536" for o in range(0, T, span)])
    _create(d / "top.qcow2", T, "base.qcow2", cwd=d)
    qemu_io(d / "top.qcow2", [f"write -q -P 0x22 {o + span // 2} 65536" for o in range(0, T, span)])
    _create(d / "active.qcow2", T, "top.qcow2", cwd=d)
    return d


def pristine(ctx):
    """The measured chain of this run (built on first use)."""
    if ctx._pristine is None:
        t = time.monotonic()
        say(f"building the {ctx.size / G:g} GiB test chain ...")
        ctx._pristine = build_chain(ctx.tmp / "pristine", ctx.size)
        say(f"  built in {time.monotonic() - t:.1f} s")
    return ctx._pristine


def big(ctx):
    """The 1 TiB sparse chain of this run (built on first use)."""
    if ctx._big is None:
        t = time.monotonic()
        say("building the 1 TiB sparse chain ...")
        ctx._big = build_big(ctx.tmp / "big")
        say(f"  built in {time.monotonic() - t:.1f} s")
    return ctx._big


def new_overlay(path, backing):
    """A fresh, empty qcow2 overlay at path over backing (absolute name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    _create(path, backing=str(Path(backing).resolve()))
    return path


def copy_chain(src, dst):
    """A full copy of the chain (relative names stay valid), flushed to disk so no
    timed fdatasync pays for the copy's dirty pages."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    run(["cp", "--sparse=always", *[src / n for n in CHAIN], dst])
    os.sync()
    return dst
