"""BLOCK_JOB_ERROR names the side of the copy that failed, as QEMU's does: "write" when
the image the job writes into (base of a commit, the active image of a stream) runs out
of space. That image lives on a small tmpfs; everything else on the test's disk. The
job ends with the error, and the chain keeps reading as before. (The "read" side, a
source layer whose data cluster points past its file's end, is in test_commit_live.py.)
"""

from __future__ import annotations

import os
import subprocess

import pytest
from qemu_helpers import apply_ops, create
from test_commit_support import M, SyncQMP, check_images, flat

SIZE = 32 * M
FS_SIZE = 4 * M  # far less than the 16 MiB the job has to write


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs at tmp_path/fs, unmounted even on failure."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])


def _chain(tmp_path, small_fs, full):
    """base <- mid <- active; mid holds 16 MiB of data, active a little. The image named
    `full` ('base' or 'active') is created on the small file system."""
    where = {name: (small_fs if name == full else tmp_path) for name in ("base", "mid", "active")}
    base = create(str(where["base"] / "base.qcow2"), SIZE)
    apply_ops(base, [("w", 0, M, 0x11)])
    mid = create(str(where["mid"] / "mid.qcow2"), SIZE, backing=base)
    apply_ops(mid, [("w", 8 * M, 16 * M, 0x22)])
    active = create(str(where["active"] / "active.qcow2"), SIZE, backing=mid)
    apply_ops(active, [("w", 2 * M, 64 * 1024, 0x33)])
    return base, mid, active


def _start(qmp, kind, nodes):
    if kind == "stream":
        qmp.execute("block-stream", {"job-id": "j1"})
        return
    args = {"job-id": "j1", "device": nodes[0]["node-name"], "base": nodes[-1]["file"]}
    if kind == "active":
        args["top"] = nodes[0]["file"]
    else:
        args["top"] = nodes[1]["file"]
        args["x-mode"] = kind
    qmp.execute("block-commit", args)


@pytest.mark.parametrize("kind", ["simple", "restartable", "active", "stream"])
def test_enospc_in_the_target_is_a_write_error(tmp_path, small_fs, mounter, kind):
    base, mid, active = _chain(tmp_path, small_fs, "active" if kind == "stream" else "base")
    v0 = flat(active)
    m = mounter(active)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        _start(qmp, kind, nodes)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        assert done["error"] == "No space left on device", done
        error = qmp.wait_event("BLOCK_JOB_ERROR", timeout=1)["data"]
        assert error == {"device": "j1", "operation": "write", "action": "report"}
        assert qmp.names().count("BLOCK_JOB_ERROR") == 1
        assert [n["file"] for n in qmp.execute("query-named-block-nodes")] == [
            n["file"] for n in nodes
        ]
        with open(m.disk, "rb") as f:
            assert f.read() == v0
    m.unmount()
    assert flat(active) == v0
    check_images([mid, active] if kind == "stream" else [mid, active, base], allow_leaks=True)
    assert os.path.exists(base) and os.path.exists(mid)
