"""Live external snapshot (QMP `blockdev-snapshot-sync`, `qcowfs snapshot`) and the
backup cycle through a real mount: snapshot, copy the frozen image with
`qemu-img convert` while the guest writes, active commit with pivot back into it.
"""

from __future__ import annotations

import os
import time

from mount_fixtures import read_file
from qemu_helpers import convert_raw, qemu_img, qemu_info_chain
from test_commit_live import build_live_chain
from test_commit_support import (
    M,
    SyncQMP,
    Writer,
    chain_files,
    check_images,
    flat,
    node_files,
)


def _commit_back(qmp, base, job_id, **extra):
    """Active commit of the active layer into `base`, then the pivot (virsh blockcommit
    --active --pivot)."""
    nodes = qmp.execute("query-named-block-nodes")
    start = len(qmp.events)
    qmp.execute(
        "block-commit",
        {
            "job-id": job_id,
            "device": nodes[0]["node-name"],
            "top": nodes[0]["file"],
            "base": base,
            **extra,
        },
    )
    qmp.wait_event("BLOCK_JOB_READY", timeout=60, start=start)
    qmp.execute("block-job-complete", {"device": job_id})
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, start=start)["data"]
    assert "error" not in done, done
    qmp.wait_event(
        "JOB_STATUS_CHANGE", start=start, pred=lambda d: d["id"] == job_id and d["status"] == "null"
    )


def test_backup_cycle_under_guest_writes(tmp_path, mounter):
    c = build_live_chain(tmp_path / "img", size=64 * M)
    base, mid, top, active = c.images
    new = str(tmp_path / "img" / "overlay.qcow2")
    model = bytearray(flat(active))
    m = mounter(active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=14).start()
        time.sleep(0.3)
        with w.quiesce():  # the snapshot moment, as the guest saw it
            cp = m.cli("snapshot", new)
            at_snapshot = bytes(model)
        assert cp.returncode == 0 and cp.stderr == "", (cp.stderr, m.log())
        nodes = qmp.execute("query-named-block-nodes")
        assert node_files(nodes) == [
            "overlay.qcow2",
            "active.qcow2",
            "top.qcow2",
            "mid.qcow2",
            "base.qcow2",
        ]
        assert nodes[1]["ro"] is True and nodes[0]["ro"] is False
        # QEMU's locks: the new image is taken for writing, the old one is a backing
        # file that other readers may open (no -U needed) while the guest writes on
        assert qemu_img("info", new, check=False).returncode != 0
        backup = tmp_path / "backup.qcow2"
        qemu_img("convert", "-O", "qcow2", active, str(backup))
        assert convert_raw(str(backup)) == at_snapshot
        assert w.writes > 0
        time.sleep(0.3)
        _commit_back(qmp, active, "pivot")
        assert node_files(qmp.execute("query-named-block-nodes")) == [
            "active.qcow2",
            "top.qcow2",
            "mid.qcow2",
            "base.qcow2",
        ]
        time.sleep(0.3)  # the guest writes into the old active again
        w.stop()
        assert w.writes > 20 and w.samples > 20, (w.writes, w.samples)
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(active) == model
    assert convert_raw(str(backup)) == at_snapshot
    assert chain_files(active) == ["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"]
    check_images(c.images + [new])
    info = qemu_info_chain(new)
    assert info[0]["backing-filename"] == "active.qcow2"  # same folder: relative


def test_snapshot_and_commit_twenty_times(tmp_path, mounter):
    c = build_live_chain(tmp_path / "img", size=16 * M)
    active = c.active
    model = bytearray(flat(active))
    m = mounter(active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=20, pause=0.005).start()
        for i in range(20):
            new = str(tmp_path / "img" / f"snap{i}.qcow2")
            nodes = qmp.execute("query-named-block-nodes")
            qmp.execute(
                "blockdev-snapshot-sync",
                {"node-name": nodes[0]["node-name"], "snapshot-file": new, "format": "qcow2"},
            )
            assert node_files(qmp.execute("query-named-block-nodes"))[:2] == [
                f"snap{i}.qcow2",
                "active.qcow2",
            ]
            _commit_back(qmp, active, f"c{i}", **{"x-delete": True})  # virsh --delete
            assert node_files(qmp.execute("query-named-block-nodes"))[0] == "active.qcow2"
            assert not os.path.exists(new)
            assert w.error is None, w.error
        w.stop()
        assert w.writes > 20, w.writes
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(active) == model
    check_images(c.images)


def test_snapshot_refusals(tmp_path, mounter):
    """One line, non-zero exit, nothing changed: NEW exists, a job runs, a read-only
    mount; QMP errors for a node that is not the active one and a format we cannot
    make."""
    c = build_live_chain(tmp_path / "img", size=16 * M)
    taken = tmp_path / "img" / "taken.qcow2"
    taken.write_bytes(b"precious")
    new = tmp_path / "img" / "new.qcow2"
    m = mounter(c.active)

    def refused(cp, word):
        assert cp.returncode != 0 and "Traceback" not in cp.stderr, cp
        assert len(cp.stderr.strip().splitlines()) == 1 and word in cp.stderr, cp.stderr

    refused(m.cli("snapshot", taken), "exists")
    assert taken.read_bytes() == b"precious"
    # names inside the mount itself: the daemon must not look them up on the thread
    # that answers its own mount's requests (it hung there); refused, the mount serves on
    inside = os.path.join(m.mountpoint, "new.qcow2")
    refused(m.cli("snapshot", inside, timeout=30), "inside the mount")
    with SyncQMP(m.socket) as qmp:
        for command, args in (
            ("blockdev-snapshot-sync", {"node-name": inside, "snapshot-file": str(new)}),
            ("block-stream", {"device": inside}),
            ("block-commit", {"device": inside, "job-id": "j"}),
            ("block-commit", {"device": "no-such-drive", "job-id": "j"}),
        ):
            cls, desc = qmp.error_of(command, args)
            assert cls == "GenericError" and "not an image of this chain" in desc, (command, desc)
    assert len(read_file(m.disk, direct=True)) == 16 * M
    with SyncQMP(m.socket) as qmp:
        assert (
            qmp.error_of("blockdev-snapshot-sync", {"snapshot-file": str(taken)})[0]
            == "GenericError"
        )
        nodes = qmp.execute("query-named-block-nodes")
        cls, desc = qmp.error_of(
            "blockdev-snapshot-sync",
            {"node-name": nodes[1]["node-name"], "snapshot-file": str(new)},
        )
        assert cls == "GenericError" and "active" in desc
        cls, desc = qmp.error_of(
            "blockdev-snapshot-sync", {"snapshot-file": str(new), "format": "raw"}
        )
        assert "raw" in desc
        assert qmp.error_of("blockdev-snapshot-sync", {"snapshot-file": 5})[0] == "GenericError"
        qmp.execute("block-commit", {"job-id": "slow", "top": nodes[1]["file"], "speed": 1 * M})
        refused(m.cli("snapshot", new), "slow")
        qmp.execute("block-job-cancel", {"device": "slow", "force": True})
        qmp.wait_event("BLOCK_JOB_CANCELLED")
        assert node_files(qmp.execute("query-named-block-nodes")) == [
            "active.qcow2",
            "top.qcow2",
            "mid.qcow2",
            "base.qcow2",
        ]
    assert not new.exists()
    # another folder: the new image names the active image by its absolute path
    other = tmp_path / "elsewhere" / "o.qcow2"
    other.parent.mkdir()
    cp = m.cli("snapshot", other)
    assert cp.returncode == 0, (cp.stderr, m.log())
    assert qemu_info_chain(str(other), share=True)[0]["backing-filename"] == c.active
    said = m.unmount().stdout
    assert f"the disk is now {other} (a snapshot put it above {c.active})" in said, said
    check_images([str(other)])
    m = mounter(c.active, "--read-only")
    refused(m.cli("snapshot", new), "read-only")
    assert not new.exists()
    m.unmount()
    check_images(c.images)


def test_node_names_stay_with_their_images(tmp_path, mounter):
    """QEMU's node names do not move when the chain changes: a name a client read before
    a snapshot still means that image after it (positional names made `top-node=node0`
    an active commit of the new overlay). The snapshot takes the name asked for
    (snapshot-node-name), else the next nodeN never given; a commit by the old names
    commits what they named."""
    c = build_live_chain(tmp_path / "img", size=16 * M)
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        before = {n["node-name"]: n["file"] for n in qmp.execute("query-named-block-nodes")}
        assert list(before) == ["node0", "node1", "node2", "node3"]
        new = str(tmp_path / "img" / "snap.qcow2")
        for bad in ("node1", "1st", "x" * 32):
            cls, desc = qmp.error_of(
                "blockdev-snapshot-sync", {"snapshot-file": new, "snapshot-node-name": bad}
            )
            assert cls == "GenericError" and bad in desc, desc
        assert not os.path.exists(new)
        qmp.execute("blockdev-snapshot-sync", {"snapshot-file": new, "snapshot-node-name": "snap0"})
        after = {n["node-name"]: n["file"] for n in qmp.execute("query-named-block-nodes")}
        assert after == {"snap0": new, **before}
        other = str(tmp_path / "img" / "snap2.qcow2")
        qmp.execute("blockdev-snapshot-sync", {"snapshot-file": other})
        names = [n["node-name"] for n in qmp.execute("query-named-block-nodes")]
        assert names == ["node4", "snap0", "node0", "node1", "node2", "node3"]
        # mid (node2) and top (node1) into base (node3), by the names read at the start
        start = len(qmp.events)
        qmp.execute("block-commit", {"job-id": "c", "top-node": "node1", "base-node": "node3"})
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, start=start)["data"]
        assert "error" not in done, done
        nodes = qmp.execute("query-named-block-nodes")
        assert [(n["node-name"], n["file"]) for n in nodes] == [
            ("node4", other),
            ("snap0", new),
            ("node0", before["node0"]),
            ("node3", before["node3"]),
        ]
    m.unmount()
    check_images([other])
