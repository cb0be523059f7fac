"""A real guest on the mount while the chain is committed live.

A Linux VM (QEMU TCG, Debian's cloud kernel, a busybox initramfs: tests/guest_vm.py,
scripts/guest/) boots with MNT/disk.raw as its virtio disk and runs ext4 on it: rounds of
rewrites, in-place overwrites (buffered and O_DIRECT), renames over old files, sync, drop
caches, verify every file. Meanwhile the chain base <- mid <- top <- active is committed
live (`commit --top top.qcow2 --wait`), then active-committed with a pivot; once with
64 KiB clusters everywhere (QEMU's aio=threads), once with mixed cluster sizes
(aio=native). Then: the
guest saw no error and every file verified; `e2fsck -fn` of the final image (base) is
clean; QEMU's own qcow2 driver boots base and verifies every file; `qemu-img check` is
clean. Every wait has a limit; a hang fails with the daemon's threads and log.
"""

from __future__ import annotations

import subprocess

import pytest
from guest_vm import FS_BLOCK, GUEST_FILES, Guest, Watchdog, build_fs_chain, drive, fsck
from mount_fixtures import check_clean
from qemu_helpers import M, qemu_img, run_qcowfs

LAYOUTS = {  # the chain's (name, qemu-img -o options), bottom first; QEMU's aio= mode
    "uniform64k": (
        [
            ("base", "cluster_size=64k"),
            ("mid", "cluster_size=64k"),
            ("top", "cluster_size=64k"),
            ("active", "cluster_size=64k"),
        ],
        "threads",
    ),
    # base clusters larger than the upper layers', 4 KiB and extended-L2 layers: the
    # commits write parts of base clusters that base does not hold yet
    "mixed": (
        [
            ("base", "cluster_size=2M"),
            ("mid", "cluster_size=4k"),
            ("top", "cluster_size=64k,extended_l2=on"),
            ("active", "cluster_size=64k"),
        ],
        "native",
    ),
}
# bytes/s: each commit spans several guest rounds (the active one has the journal to copy)
LIVE_SPEED, ACTIVE_SPEED = 1 * M, 4 * M
BOOT = 90  # seconds, each limit generous for TCG on a busy 2-core machine
ROUND = 60
COMMIT = 120
RESULT = 90
ROUND_LINE = r"^GUEST: round (\d+) bad=(\d+) ioerrors=(\d+)"
RESULT_LINE = r"^GUEST: RESULT (PASS|FAIL)(.*)"


@pytest.fixture
def guests(mounter):
    """Starts guests; kills every one at the end, the mounts' daemons too if a guest
    hangs in a FUSE request that only the daemon's death ends."""
    started: list[Guest] = []

    def start(*args, **kwargs) -> Guest:
        started.append(Guest(*args, **kwargs))
        return started[-1]

    yield start
    for g in started:
        if not g.close(10):
            mounter.cleanup()
            g.close(30)


def _commit(dog: Watchdog, m, what: str, speed: int, *args):
    try:
        cp = run_qcowfs(
            "commit",
            str(m.mountpoint),
            "--control-socket",
            str(m.socket),
            "--speed",
            str(speed),
            "--wait",
            *args,
            timeout=COMMIT,
        )
    except subprocess.TimeoutExpired:  # the job or the mount hangs
        cp = None
    if cp is None:
        dog.fail(f"{what} did not finish within {COMMIT} s")
    assert cp.returncode == 0, (what, cp.stderr, m.log())


def _next_round(dog: Watchdog, guest: Guest, after: int, what: str) -> int:
    """Waits for a round that started after console line AFTER ended; its line index."""
    found = guest.wait_for(ROUND_LINE, ROUND, after + 1)
    if found is None:
        dog.fail(f"the guest finished no round within {ROUND} s {what}")
    match, index = found
    assert match.group(2) == "0" and match.group(3) == "0", guest.console()
    found = guest.wait_for(ROUND_LINE, ROUND, index + 1)
    if found is None:
        dog.fail(f"the guest finished no round within {ROUND} s {what}")
    return found[1]


def _result(dog: Watchdog, guest: Guest, what: str) -> str:
    found = guest.wait_for(RESULT_LINE, RESULT)
    if found is None:
        dog.fail(f"the guest printed no RESULT within {RESULT} s ({what})")
    if guest.wait_exit(30) is None:
        dog.fail(f"QEMU did not exit within 30 s of the guest's RESULT ({what})")
    match, _ = found
    assert match.group(1) == "PASS", f"{what}: {match.group(0)}\n{guest.console(200)}"
    assert guest.io_errors() == [], guest.console(200)
    assert guest.complaints() == [], guest.console(200)
    return match.group(2)


@pytest.mark.slow
@pytest.mark.timeout(900)  # above the sum of the limits: the watchdog reports first
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_guest_on_mount_through_live_and_active_commit(
    tmp_path,
    mounter,
    guests,
    layout,
):
    layers, aio = LAYOUTS[layout]
    (base, mid, top, active), host_files = build_fs_chain(tmp_path / "img", layers)
    m = mounter(active)
    dog = Watchdog(m)
    guest = dog.guest = guests(
        drive(m.disk, "raw", f"cache=none,aio={aio}"), "workload", tmp_path / "console-workload.log"
    )

    found = guest.wait_for(ROUND_LINE, BOOT)
    if found is None:
        dog.fail(f"the guest did not finish its first round within {BOOT} s")
    mark = found[1]
    _commit(dog, m, "commit --top top.qcow2", LIVE_SPEED, "--top", str(top))
    mark = _next_round(dog, guest, mark, "after the live commit")
    _commit(dog, m, "commit --active --pivot", ACTIVE_SPEED, "--active", "--pivot")
    _next_round(dog, guest, mark, "after the pivot")
    guest.send("stop")
    summary = _result(dog, guest, "workload")
    assert "stopped=yes" in summary, summary

    m.unmount()
    # after the pivot base alone is the disk; the old active image is consistent too
    check_clean(base)
    check_clean(active)
    flat = tmp_path / "final.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", base, flat)
    fsck(flat)
    flat.unlink()

    # QEMU's own qcow2 driver reads every file back from base
    verify = dog.guest = guests(drive(base, "qcow2"), "verify", tmp_path / "console-verify.log")
    summary = _result(dog, verify, "verify-only boot of base.qcow2")
    assert f"verified={GUEST_FILES + host_files} " in summary, summary


def test_guest_verify_detects_a_corrupt_file(tmp_path, guests):
    """The guest's verification can fail: one byte changed in one file's data
    (debugfs, no mount) makes the verify-only boot print FAIL."""
    (base,), _ = build_fs_chain(tmp_path / "img", [("base", "cluster_size=64k")])
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", base, raw)
    _corrupt_first_block(raw, "h/g0-0")
    guest = guests(drive(raw, "raw"), "verify", tmp_path / "console.log")
    found = guest.wait_for(RESULT_LINE, RESULT)
    assert found is not None, guest.console()
    assert found[0].group(1) == "FAIL" and "bad=1" in found[0].group(2), found[0].group(0)


def _corrupt_first_block(raw, path):
    cp = subprocess.run(
        ["debugfs", "-R", f"bmap {path} 0", str(raw)], capture_output=True, text=True, check=True
    )
    block = int(cp.stdout.split()[0])
    with open(raw, "r+b") as f:
        f.seek(block * FS_BLOCK + 10)
        byte = f.read(1)
        f.seek(block * FS_BLOCK + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
