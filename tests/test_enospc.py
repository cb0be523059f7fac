"""A full file system: the active overlay lives on a small
loop-mounted ext4 and the guest writes until ENOSPC. Space for new metadata (L2
tables, refcount blocks) is reserved when it is allocated, so the write that cannot
get its space fails at once, and everything acknowledged before it survives: it can
be fsync'd, a reader's close reports nothing, `unmount` succeeds with the space still
exhausted, and qemu-img finds every acknowledged write and no corruption.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess

import pytest
from qemu_helpers import apply_ops, convert_raw, create, qemu_check

M = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB ext4 on a loop device, mounted at tmp_path/fs; torn down even on
    failure."""
    img, mnt = tmp_path / "fs.img", tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mounted = False
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        mounted = True
        yield mnt
    finally:
        if mounted and subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
        subprocess.run(["losetup", "-d", dev])


def pattern(i):
    return bytes([(i * 7 + 1) & 0xFF]) * (M - 16) + i.to_bytes(16, "big")


def test_write_until_enospc_keeps_every_acknowledged_write(tmp_path, small_fs, mounter):
    base = create(str(tmp_path / "base.qcow2"), 128 * M)
    apply_ops(base, [("w", 0, 128 * M, 0x11)])
    active = create(str(small_fs / "active.qcow2"), 128 * M, backing=base)
    m = mounter(active)
    reader = os.open(m.disk, os.O_RDONLY)
    fd = os.open(m.disk, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, M)
    acked, failed = [], 0
    try:
        for i in range(128):
            buf[:] = pattern(i)
            try:
                assert os.pwritev(fd, [buf], i * M) == M
                acked.append(i)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                failed += 1
                if failed == 3:
                    break
        assert failed == 3 and len(acked) > 20, (acked, failed)
        os.fsync(fd)  # what was acknowledged can be made durable
    finally:
        os.close(fd)
    os.close(reader)  # a reader's close has nothing to report
    st = os.statvfs(small_fs)
    assert st.f_bavail * st.f_frsize < 2 * M, "the file system is not full"
    m.unmount()
    st = os.statvfs(small_fs)
    assert st.f_bavail * st.f_frsize < 2 * M, "space came back before the check"
    rc, rep = qemu_check(active)
    assert not rep.get("corruptions") and not rep.get("check-errors"), rep
    assert not rep.get("leaks"), rep
    flat = convert_raw(active)
    for i in acked:
        assert flat[i * M : (i + 1) * M] == pattern(i), i
    # and what failed left the rest as it was or as written, never something else
    for i in range(128):
        if i not in acked:
            got = flat[i * M : (i + 1) * M]
            assert got.count(0x11) + got.count((i * 7 + 1) & 0xFF) >= M - 16, i
