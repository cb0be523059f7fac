"""Disk space reserved ahead: a file that must grow for new clusters grows by a larger
step (one fallocate per step, not per cluster). A clean unmount cuts the unused tail,
so the file ends where QEMU's image end offset says; a tail a crash leaves is accepted
by `qemu-img check` and reused by the next mount instead of growing the file again.
(That a full file system still fails the write needing space at once: test_enospc.)
"""

from __future__ import annotations

import mmap
import os
import signal

from mount_fixtures import pid_alive, wait_until
from qemu_helpers import K, M, apply_ops, convert_raw, create, qemu_check

CLUSTER = 64 * K


def _write_clusters(disk, clusters, fill):
    """One O_DIRECT 4 KiB write into each cluster (copy-on-write of the rest), fsync'd."""
    buf = mmap.mmap(-1, 4 * K)
    buf[:] = bytes([fill]) * (4 * K)
    fd = os.open(disk, os.O_WRONLY | os.O_DIRECT)
    try:
        for c in clusters:
            assert os.pwritev(fd, [buf], c * CLUSTER + 8 * K) == 4 * K
        os.fsync(fd)
    finally:
        os.close(fd)


def _end_offset(image, share=False):
    rc, rep = qemu_check(image, share=share)
    assert rc == 0 and not rep.get("corruptions") and not rep.get("leaks"), rep
    return rep["image-end-offset"]


def _expected(base_fill, writes):
    want = bytearray([base_fill]) * (16 * M)
    for clusters, fill in writes:
        for c in clusters:
            off = c * CLUSTER + 8 * K
            want[off : off + 4 * K] = bytes([fill]) * (4 * K)
    return bytes(want)


def test_reserved_tail_cut_at_unmount_and_reused_after_a_crash(tmp_path, mounter):
    base = create(str(tmp_path / "base.qcow2"), 16 * M)
    apply_ops(base, [("w", 0, 16 * M, 0x11)])
    active = create(str(tmp_path / "active.qcow2"), 16 * M, backing=base)
    first = [0, 7, 33, 100]

    m = mounter(active)
    _write_clusters(m.disk, first, 0xA1)
    # mounted: the file was grown ahead of what its clusters use
    assert os.stat(active).st_size > _end_offset(active, share=True)
    m.unmount()
    assert os.stat(active).st_size == _end_offset(active)
    assert convert_raw(active) == _expected(0x11, [(first, 0xA1)])

    # a crash leaves the reserved tail: zeros past the last cluster, which QEMU accepts
    second, third = [120, 121, 200], [3, 150]
    m = mounter(active)
    _write_clusters(m.disk, second, 0xB2)
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    # its files (and with them its image locks) are released only at the end of its exit
    wait_until(lambda: not pid_alive(pid), 30, "the killed daemon to exit")
    crashed_size = os.stat(active).st_size
    assert crashed_size > _end_offset(active)

    # the next mount allocates into that tail: the file does not grow
    m = mounter(active)
    _write_clusters(m.disk, third, 0xC3)
    m.unmount()
    assert os.stat(active).st_size == crashed_size
    assert _end_offset(active) <= crashed_size
    assert convert_raw(active) == _expected(0x11, [(first, 0xA1), (second, 0xB2), (third, 0xC3)])
