"""No write amplification from metadata: a restartable commit (`qcowfs commit --mode
restartable`) killed midway and run again makes base's file system receive little more
than the bytes committed, with 2 MiB clusters as with 64 KiB ones.

The count is taken where nothing can hide: base lives alone on an ext4 file system on a
loop device, and the loop device's "sectors written" counter (/sys/block/loopN/stat)
says what base's data, L2 tables, refcount blocks and header, and the file system's own
journal cost together. The intermediates live elsewhere (the restartable mode writes
them too, when it forgets what base holds). Before the table cache wrote back 4 KiB
slices, every per-chunk flush rewrote a whole L2 table and refcount block: 2.6x the
committed bytes with 2 MiB clusters.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu_helpers import apply_ops, create, qemu_check, qemu_img, qemu_io, qemu_map
from recording_io import Journal, recording_factory
from test_commit_support import Chain, K, M, check_images, qemu_reference_commit

from qcow.image import Qcow2Image

SIZE = 128 * M
MAX_RATIO = 1.1
KILL_AT = 0.45  # of the committed bytes on base's disk


class LoopFs:
    """A fresh ext4 file system on a loop device, mounted at `mnt`."""

    def __init__(self, image, mnt):
        self.mnt = str(mnt)
        # no lazy initialisation: the kernel would zero inode tables and the journal in
        # the background and those writes would count
        subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
            check=True,
        )
        self.dev = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.mounted = False

    def mount(self):
        os.makedirs(self.mnt, exist_ok=True)
        subprocess.run(["mount", "-o", "noatime", self.dev, self.mnt], check=True)
        self.mounted = True

    def bytes_written(self, sync=True):
        """Bytes the file system has written to its device so far (after a sync)."""
        if sync:
            subprocess.run(["sync", "-f", self.mnt], check=True)
        stat = Path(f"/sys/block/{os.path.basename(self.dev)}/stat").read_text().split()
        return int(stat[6]) * 512  # field 7: sectors written

    def cleanup(self):
        if self.mounted:
            subprocess.run(["umount", self.mnt], check=False)
        subprocess.run(["losetup", "-d", self.dev], check=False)


@pytest.fixture
def loop_fs(tmp_path):
    fs = LoopFs(tmp_path / "fs.img", tmp_path / "mnt")
    try:
        fs.mount()
        yield fs
    finally:
        fs.cleanup()


def _chain(fs, d, cs):
    """base (on the loop file system; its first 24 MiB already written, so its L2 table
    and refcount block exist) <- mid <- top <- active, 54 MiB to commit: mid's 2 MiB
    pieces partly over base's data (written in place), top's past it (allocated)."""
    d.mkdir()
    base = create(f"{fs.mnt}/base.qcow2", SIZE, cluster_size=cs)
    apply_ops(base, [("w", 0, 24 * M, 0x0B)])
    mid = create(str(d / "mid.qcow2"), SIZE, backing=base, cluster_size=cs)
    apply_ops(mid, [("w", o * M, 2 * M, ("rand", f"mid{o}")) for o in range(0, 64, 4)])
    top = create(str(d / "top.qcow2"), SIZE, backing=mid, cluster_size=cs)
    apply_ops(top, [("w", o * M, 2 * M, ("rand", f"top{o}")) for o in range(66, 128, 6)])
    active = create(str(d / "active.qcow2"), SIZE, backing=top, cluster_size=cs)
    return Chain(d, [base, mid, top, active], top, base)


def _pristine_copy(chain, d):
    """The chain copied to `d` with relative backing names, for QEMU's commit."""
    d.mkdir()
    images = []
    for path in chain.images:
        images.append(shutil.copy(path, d / Path(path).name))
    for below, image in zip(images, images[1:], strict=False):
        qemu_img("rebase", "-u", "-b", Path(below).name, "-F", "qcow2", image)
    return Chain(d, images, images[2], images[0])


def _committed_bytes(chain):
    """Data bytes allocated in (base, top], as `qemu-img map` of top reports them."""
    return sum(e["length"] for e in qemu_map(chain.top) if e["data"] and e["depth"] < 2)


def _commit_killed_then_finished(fs, chain, committed):
    """Run the restartable commit, kill -9 it once ~45% of the committed bytes reached
    base's disk (rate-limited, so it is still running then), then run it to the end."""
    cmd = [sys.executable, "-m", "fusefs", "commit", chain.active]
    cmd += ["--top", chain.top, "--base", chain.base, "--mode", "restartable"]
    start = fs.bytes_written()
    proc = subprocess.Popen(
        [*cmd, "--speed", "16M"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if fs.bytes_written(sync=False) - start >= KILL_AT * committed:
                break
            time.sleep(0.01)
    finally:
        proc.kill()  # no-op if it has ended
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the commit ended before the kill: {err}"
    killed_at = fs.bytes_written() - start
    assert killed_at < committed, "the killed commit had written everything already"
    cp = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    return fs.bytes_written() - start


@pytest.mark.slow
@pytest.mark.parametrize("cs", [2 * M, 64 * K], ids=["2M-clusters", "64K-clusters"])
def test_restartable_commit_writes_little_more_than_the_data(tmp_path, loop_fs, cs):
    chain = _chain(loop_fs, tmp_path / "img", cs)
    pristine = _pristine_copy(chain, tmp_path / "pristine")
    committed = _committed_bytes(chain)
    assert committed == 54 * M

    written = _commit_killed_then_finished(loop_fs, chain, committed)

    ratio = written / committed
    print(f"{cs >> 10} KiB clusters: {written} bytes written for {committed} ({ratio:.3f}x)")
    assert ratio <= MAX_RATIO, (
        f"base's file system received {written} bytes for {committed} bytes committed "
        f"({ratio:.2f}x) with {cs >> 10} KiB clusters"
    )
    # the result is QEMU's: same base, same guest view, images clean
    qemu_reference_commit(pristine)
    check_images([chain.base, chain.active], allow_leaks=True)
    qemu_img("compare", "-q", pristine.base, chain.base)
    qemu_img("compare", "-q", pristine.active, chain.active)
    names = qemu_img("info", "--backing-chain", chain.active).stdout
    assert "top.qcow2" not in names and "mid.qcow2" not in names, names


def test_flush_writes_only_the_changed_slices_of_tables(tmp_path):
    """In-process count: two clusters allocated far apart under one existing 2 MiB L2
    table (entries in its 4 KiB slices 0 and 3) and one refcount block. The flush writes
    each changed slice alone (4 KiB, not the table, not the span between them)."""
    cs = 2 * M
    path = create(str(tmp_path / "img.qcow2"), 4 << 30, cluster_size=cs)
    apply_ops(path, [("w", 0, cs, 0x0B)])
    journal = Journal(Path(path).read_bytes())
    img = Qcow2Image(path, writable=True, rawio_factory=recording_factory(journal))
    try:
        for guest in (cs, 3 << 30):  # L2 entries 1 and 1536: slices 0 and 3
            img.write(guest, b"\x5a" * cs, None)
        img.flush()
    finally:
        img.close()
    writes = [(off, len(data)) for _w, off, data, *_ in journal.writes()]
    data = [w for w in writes if w[1] == cs]
    metadata = sorted(w for w in writes if w[1] != cs)
    assert len(data) == 2, writes
    assert all(n <= 4 * K for _off, n in metadata), metadata
    # L2 slices 0 and 3 apart, and the refcount block's first slice
    assert len(metadata) == 3 and sum(n for _o, n in metadata) == 12 * K, metadata
    rc, report = qemu_check(path)
    assert rc == 0, report
    for guest in (cs, 3 << 30):
        qemu_io(path, f"read -q -P 0x5a {guest} {cs}")
