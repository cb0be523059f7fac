"""Section guard: how fast the stranding guard scans a directory of N small qcow2 files.

    python -m scripts.benchlib.guard [N]        (from the repository root; default 2000)

Builds, in a temporary directory, the chain base <- mid <- top <- active next to N
qcow2 clones of an unrelated golden image (made once with qemu-img, then copied
sparsely), a few of which are rebased (`qemu-img rebase -u`) onto mid so the scan has
something to find; then times `find_dependants` for a commit of top into base, as the
guard runs it before a commit (headers only, no locks; page cache warm). Prints the
best of a few runs and the first one. No import from the rest of the benchmark:
tests/test_guard.py loads this file on its own to build its big directory.
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from commit.guard import find_dependants

BLOCK = 4096


def _qemu_img(*args):
    subprocess.run(
        ["qemu-img", *map(str, args)], check=True, capture_output=True, stdin=subprocess.DEVNULL
    )


def _sparse_copier(template):
    """A function writing a sparse copy of `template` (only its non-zero blocks)."""
    data = Path(template).read_bytes()
    size = len(data)
    blocks = [
        (off, data[off : off + BLOCK])
        for off in range(0, size, BLOCK)
        if data[off : off + BLOCK].count(0) != len(data[off : off + BLOCK])
    ]

    def copy(dest):
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            for off, chunk in blocks:
                os.pwrite(fd, chunk, off)
        finally:
            os.close(fd)

    return copy


def build_bench_dir(directory, n=2000, dependants=5):
    """Build the benchmark directory. Returns (chain paths top first, the paths of the
    images that depend on mid). Of the N files, `dependants` are clones of mid, the rest
    clones of golden.qcow2; every 50th is a raw file and every 50th (offset by 25) a
    qcow2 without a backing file, for variety."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    base, mid, top, active = (d / f"{x}.qcow2" for x in ("base", "mid", "top", "active"))
    _qemu_img("create", "-q", "-f", "qcow2", base, "64M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid, "64M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "64M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", active, "64M")
    tmpl = d.parent / f".{d.name}-templates"
    tmpl.mkdir(exist_ok=True)
    golden = d / "golden.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", golden, "64M")
    clone_t, plain_t = tmpl / "clone.qcow2", tmpl / "plain.qcow2"
    # a clone of golden, as it would sit in d (relative name)
    _qemu_img("create", "-q", "-f", "qcow2", "-b", golden, "-F", "qcow2", clone_t, "64M")
    _qemu_img("rebase", "-u", "-b", "golden.qcow2", "-F", "qcow2", clone_t)
    _qemu_img("create", "-q", "-f", "qcow2", plain_t, "64M")
    copy_clone, copy_plain = _sparse_copier(clone_t), _sparse_copier(plain_t)
    expected = []
    step = max(1, n // max(1, dependants))
    for i in range(n):
        p = d / f"vm{i:05d}.qcow2"
        if i % 50 == 0:
            p = d / f"vm{i:05d}.raw"
            with open(p, "wb") as f:
                f.truncate(1 << 20)
        elif i % 50 == 25:
            copy_plain(p)
        else:
            copy_clone(p)
            if len(expected) < dependants and i % step == 1:
                _qemu_img("rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", p)
                expected.append(str(p))
    shutil.rmtree(tmpl)
    return [str(active), str(top), str(mid), str(base)], expected


def time_scan(chain, repeat=5):
    """(first, best) seconds for find_dependants of a commit of top into base."""
    times = []
    found = None
    for _ in range(repeat):
        t = time.perf_counter()
        found = find_dependants(chain, [chain[3]], chain[1:3], top=chain[1])
        times.append(time.perf_counter() - t)
    return times[0], min(times), found


def scan_benchmark(n=2000):
    with tempfile.TemporaryDirectory(prefix="qcowfs-bench-guard-") as tmp:
        t0 = time.perf_counter()
        chain, expected = build_bench_dir(Path(tmp) / "images", n)
        built = time.perf_counter() - t0
        first, best, found = time_scan(chain)
        got = sorted(d.path for d in found)
        ok = got == sorted(expected)
        files = len(os.listdir(Path(tmp) / "images"))
        print(
            f"stranding guard scan: {files} files ({n} small images + the chain): "
            f"best {best * 1000:.0f} ms, first {first * 1000:.0f} ms "
            f"({files / best:,.0f} files/s); built in {built:.1f} s; "
            f"found {len(got)} dependants, {'as expected' if ok else 'WRONG'}"
        )
        return best if ok else None


def section_guard(ctx, sec):
    n = 200 if ctx.quick else 2000
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        best = scan_benchmark(n)
    line = buf.getvalue().strip()
    sec.row(
        f"stranding guard scan of a directory of {n:,} small qcow2 files (best)",
        "ms",
        best * 1000 if best is not None else "n/a: the scan found the wrong dependants",
        None,
        better="lower",
        goal=("abs", 1000),
        note=line,
    )


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    sys.exit(0 if scan_benchmark(n) is not None else 1)
