"""Every image a commit job reopened read-write goes back to read-only, with its locks as before,
however the job ends (QEMU's iotest 249 checks it for base): after a restartable commit is
cancelled, and after it fails on an I/O error, `qemu-img info` (without -U) opens base and the
intermediates of the live mount.
"""

from __future__ import annotations

import os
import subprocess
import threading

import pytest
from mount_fixtures import read_file, wait_until
from qemu_helpers import apply_ops, create, patch, qcow2_layout
from test_commit_support import SyncQMP, check_images, flat

M = 1 << 20


def build(d):
    """base <- mid1 <- mid2 <- top, 16 MiB: a restartable commit of mid2 into base
    reopens mid1 and mid2 read-write."""
    d.mkdir()
    base = create(str(d / "base.qcow2"), 16 * M)
    apply_ops(base, [("w", 0, 8 * M, 0x11)])
    mid1 = create(str(d / "mid1.qcow2"), 16 * M, backing="base.qcow2")
    apply_ops(mid1, [("w", o, M, 0x21) for o in range(0, 16 * M, 2 * M)])
    mid2 = create(str(d / "mid2.qcow2"), 16 * M, backing="mid1.qcow2")
    apply_ops(mid2, [("w", o + M, M // 2, 0x31) for o in range(0, 14 * M, 2 * M)])
    top = create(str(d / "top.qcow2"), 16 * M, backing="mid2.qcow2")
    apply_ops(top, [("w", 3 * M, 64 * 1024, 0x41)])
    return base, mid1, mid2, top


def qemu_info_ok(path):
    """`qemu-img info` without -U: fails while another process write-locks the image."""
    cp = subprocess.run(["qemu-img", "info", path], capture_output=True, text=True)
    return cp.returncode == 0, cp.stderr


def node(qmp, path):
    return next(n for n in qmp.execute("query-named-block-nodes") if n["file"] == path)


def assert_back_to_read_only(qmp, images):
    nodes = qmp.execute("query-named-block-nodes")
    assert [n["ro"] for n in nodes[1:]] == [True] * (len(nodes) - 1), nodes
    for path in images:
        if any(n["file"] == path for n in nodes):
            ok, err = qemu_info_ok(path)
            assert ok, (path, err)


def test_cancelled_restartable_commit_reopens_read_only(tmp_path, mounter):
    base, mid1, mid2, top = build(tmp_path / "img")
    want = flat(top)
    m = mounter(top)
    with SyncQMP(m.socket) as qmp:
        qmp.execute(
            "block-commit",
            {"job-id": "r", "top": mid2, "base": base, "x-mode": "restartable", "speed": 2 * M},
        )
        # its first step (after recording its intent) reopens the range for writing; mid2
        # stays in the chain until the end. Asked over QMP, not by probing with qemu-img:
        # a probe holds locks that the reopen has to wait out.
        wait_until(lambda: not node(qmp, mid2)["ro"], 30, "mid2 reopened read-write")
        ok, err = qemu_info_ok(mid2)
        assert not ok and "lock" in err, err
        qmp.execute("block-job-cancel", {"device": "r"})
        qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        assert_back_to_read_only(qmp, [base, mid1, mid2])
        assert read_file(m.disk) == want
    m.unmount()
    assert flat(top) == want
    check_images([base, mid1, mid2, top])


def test_failed_restartable_commit_reopens_read_only(tmp_path, mounter):
    """A bad L2 entry in mid1 (past the end of its file): the job fails on an I/O error,
    and base, mid1 and mid2 are read-only backing files again."""
    base, mid1, mid2, top = build(tmp_path / "img")
    lay = qcow2_layout(mid1)
    where, guest, entry = next(e for e in lay["data_entries"] if e[1] == 8 * M)
    patch(mid1, where, "Q", (entry & ~0x00FF_FFFF_FFFF_FE00) | (lay["file_size"] + (1 << 30)))
    m = mounter(top)
    with SyncQMP(m.socket) as qmp:
        qmp.execute(
            "block-commit", {"job-id": "r", "top": mid2, "base": base, "x-mode": "restartable"}
        )
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        assert done.get("error"), done
        assert_back_to_read_only(qmp, [base, mid1, mid2])
    m.unmount()
    check_images([base, mid2, top])


def test_reopen_waits_out_a_qemu_img_info(tmp_path, mounter):
    """`qemu-img info` without -U, run over and over on the range while the job starts
    (a monitoring tool would): the job's reopen for writing waits for the probe's locks
    to go instead of failing, and the commit completes."""
    base, mid1, mid2, top = build(tmp_path / "img")
    want = flat(top)
    m = mounter(top)
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            for p in (mid1, mid2):
                qemu_info_ok(p)

    probers = [threading.Thread(target=probe) for _ in range(3)]
    for t in probers:
        t.start()
    try:
        with SyncQMP(m.socket) as qmp:
            qmp.execute(
                "block-commit",
                {"job-id": "r", "top": mid2, "base": base, "x-mode": "restartable"},
            )
            done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
            assert not done.get("error"), done
            assert done["offset"] == done["len"] > 0, done
    finally:
        stop.set()
        for t in probers:
            t.join()
    assert read_file(m.disk) == want
    m.unmount()
    assert flat(top) == want


@pytest.mark.parametrize("how", ["cancel", "complete"])
def test_simple_commit_base_back_to_read_only(tmp_path, mounter, how):
    """The simple mode's base, cancelled or finished (iotest 249's case)."""
    base, mid1, mid2, top = build(tmp_path / "img")
    m = mounter(top)
    with SyncQMP(m.socket) as qmp:
        qmp.execute(
            "block-commit",
            {"job-id": "s", "top": mid2, "base": base, "speed": 2 * M if how == "cancel" else 0},
        )
        if how == "cancel":
            qmp.wait_event("JOB_STATUS_CHANGE", pred=lambda d: d["status"] == "running")
            qmp.execute("block-job-cancel", {"device": "s"})
            qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        else:
            qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert_back_to_read_only(qmp, [base, mid1, mid2])
    m.unmount()
    assert os.path.exists(base)
