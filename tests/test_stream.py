"""Stream (pull, QMP `block-stream`, `qcowfs stream`) through a real mount.

The reference is QEMU's offline pull: `qemu-img rebase` in safe mode of a copy of the
chain onto the same base (or onto nothing). The flat view never changes, the active
image names base afterwards and the intermediates leave the chain; a guest writing
while the job runs always wins; cancel and kill -9 leave a valid chain with the same
view, and a new run finishes.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from mount_fixtures import read_file
from qemu_helpers import apply_ops, create, qemu_img, qemu_info_chain, qemu_map
from test_commit_live import build_live_chain, kill9
from test_commit_support import (
    K,
    M,
    SyncQMP,
    Writer,
    build,
    chain_files,
    chain_names,
    check_images,
    flat,
    node_files,
    settle_pending_write,
)
from test_qmp_support import END_COMPLETED, START, statuses_only


def _qemu_rebase(active, base):
    """QEMU's offline pull of the same chain: a safe-mode rebase onto base (or none)."""
    if base is None:
        qemu_img("rebase", "-q", "-b", "", active)
    else:
        fmt = qemu_info_chain(base)[0]["format"]
        qemu_img(
            "rebase", "-q", "-b", os.path.relpath(base, os.path.dirname(active)), "-F", fmt, active
        )
    return flat(active)


# four-layer chains (base <- mid <- top <- active) are also streamed down to mid
DEEP_CASES = ["scenario", "short_intermediate4", "mixed_clusters", "extended_l2", "compressed_mid"]
STREAM_CASES = DEEP_CASES + [
    "extended_l2_top",
    "raw_base",
    "short_unaligned",
    "top_larger_095",
    "backing_larger",
    "compat010",
]
STREAM_MATRIX = [(case, to) for case in STREAM_CASES for to in ("base", "none")] + [
    (case, "mid") for case in DEEP_CASES
]


@pytest.mark.parametrize("case,to", STREAM_MATRIX)
def test_stream_matches_qemu_img_rebase(tmp_path, mounter, case, to):
    """block-stream over the matrix (short backing files, mixed cluster sizes, extended
    L2, compressed and raw layers) equals `qemu-img rebase` of a copy: same view, same
    backing file, every image clean."""
    ours = build(case, tmp_path / "ours")
    ref = build(case, tmp_path / "qemu")
    v0 = flat(ours.active)
    assert to != "mid" or len(ours.images) == 4
    pick = {"base": 0, "mid": 1, "none": None}[to]
    base = ours.images[pick] if pick is not None else None
    qemu_view = _qemu_rebase(ref.active, ref.images[pick] if pick is not None else None)
    assert qemu_view == v0
    m = mounter(ours.active)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        args = {"job-id": "s1", "device": nodes[0]["node-name"]}
        if base is not None:
            args["base-node"] = next(
                n["node-name"] for n in nodes if os.path.samefile(n["file"], base)
            )
        qmp.execute("block-stream", args)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        assert "error" not in done, done
        assert done["type"] == "stream" and done["offset"] == done["len"], done
        qmp.wait_event("JOB_STATUS_CHANGE", pred=lambda d: d["status"] == "null")
        assert qmp.statuses("s1") == statuses_only(START + END_COMPLETED)
        after = node_files(qmp.execute("query-named-block-nodes"))
        kept = ours.images[: pick + 1][::-1] if pick is not None else []
        want = [os.path.basename(p) for p in [ours.active] + kept]
        assert after == want
        assert read_file(m.disk, direct=True) == v0
    m.unmount()
    assert flat(ours.active) == v0
    assert [(n, b) for n, b, _s in chain_names(ours.active)] == [
        (n, b) for n, b, _s in chain_names(ref.active)
    ]
    check_images(ours.images)


@pytest.mark.slow
def test_stream_under_guest_writes(tmp_path, mounter):
    """A guest writes (and reads back samples) all through the job: its writes win over
    the copied data, the model holds during and after, and the result is what
    `qemu-img rebase` makes of the final chain."""
    c = build_live_chain(tmp_path / "img", size=64 * M)
    base, mid, top, active = c.images
    model = bytearray(flat(active))
    m = mounter(active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=3, pause=0.001).start()
        time.sleep(0.2)
        qmp.execute("block-stream", {"job-id": "s1", "base": base, "speed": 24 * M})
        progress = []
        while not any(e["event"] == "BLOCK_JOB_COMPLETED" for e in qmp.events):
            for job in qmp.execute("query-block-jobs"):
                assert job["device"] == "s1" and job["type"] == "stream", job
                progress.append(job["offset"])
            assert w.error is None, w.error
            time.sleep(0.05)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]
        assert "error" not in done, done
        assert done["len"] > 16 * M and progress == sorted(progress) and len(progress) > 5
        time.sleep(0.2)
        w.stop()
        assert w.writes > 50 and w.samples > 50, (w.writes, w.samples)
        assert node_files(qmp.execute("query-named-block-nodes")) == ["active.qcow2", "base.qcow2"]
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(active) == model
    assert [(n, b) for n, b, _s in chain_names(active)] == [
        ("active.qcow2", "base.qcow2"),
        ("base.qcow2", None),
    ]
    check_images([base, active])
    # the intermediates are untouched and still valid images
    check_images([mid, top])


def test_stream_cancel_then_again(tmp_path, mounter):
    """A cancelled stream leaves the chain as it was (same view, clean images); the next
    run copies only what the first had not."""
    c = build_live_chain(tmp_path / "img", size=64 * M)
    model = bytearray(flat(c.active))
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=4).start()
        qmp.execute("block-stream", {"job-id": "s1", "speed": 8 * M})
        first_len, first_offset = qmp.pause_midway("s1")
        qmp.execute("block-job-cancel", {"device": "s1", "force": True})
        qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        assert "BLOCK_JOB_COMPLETED" not in qmp.names()
        assert node_files(qmp.execute("query-named-block-nodes")) == [
            "active.qcow2",
            "top.qcow2",
            "mid.qcow2",
            "base.qcow2",
        ]
        w.stop()
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(c.active) == model
    check_images(c.images)
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        qmp.execute("block-stream", {"job-id": "s2"})
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        assert "error" not in done, done
        # what the cancelled run copied stayed copied
        assert done["len"] <= first_len - first_offset, (done, first_len, first_offset)
        assert node_files(qmp.execute("query-named-block-nodes")) == ["active.qcow2"]
    m.unmount()
    assert flat(c.active) == model
    assert chain_names(c.active) == [("active.qcow2", None, 64 * M)]
    check_images(c.images)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22])
def test_stream_kill9_then_again(tmp_path, mounter, seed):
    """kill -9 of the daemon at a random point of a stream under guest writes: the
    remount reads every fsync'd byte, the images have no corruption, and a new stream
    finishes with the same view."""
    rnd = random.Random(seed)
    c = build_live_chain(tmp_path / "img", size=64 * M)
    model = bytearray(flat(c.active))
    lens = []
    for attempt in range(2):
        m = mounter(c.active)
        assert read_file(m.disk, direct=True) == model
        with SyncQMP(m.socket) as qmp:
            w = Writer(m.disk, model, seed=seed * 10 + attempt).start()
            qmp.execute("block-stream", {"job-id": f"s{attempt}", "speed": 16 * M})
            time.sleep(rnd.uniform(0.3, 1.2))
            (job,) = qmp.execute("query-block-jobs")
            lens.append((job["len"], job["offset"]))
            kill9(m)
        w.stop(expect_error=True)
        m.cleanup()
        settle_pending_write(flat(c.active), model, w.pending)
        check_images(c.images, allow_leaks=True)
        assert chain_files(c.active) == ["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"]
    # each run started with less to pull: what the killed runs copied stayed copied
    assert lens[1][0] < lens[0][0], lens
    qemu_img("check", "-q", "-r", "leaks", c.active)
    m = mounter(c.active)
    cp = m.cli("stream", "--wait", "--base", c.base)
    assert cp.returncode == 0, (cp.stderr, m.log())
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(c.active) == model
    check_images([c.base, c.active])


def test_stream_cli_delete_and_guard(tmp_path, mounter):
    """`stream --delete` removes the dropped images, unless an image outside the chain
    reads through one of them: then one line per dependant and nothing happens."""
    c = build_live_chain(tmp_path / "img", size=16 * M)
    base, mid, top, active = c.images
    model = flat(active)
    other = create(str(tmp_path / "img" / "other.qcow2"), 16 * M, backing="mid.qcow2")
    apply_ops(other, [("w", 0, 64 * K, 0x77)])
    m = mounter(active)
    cp = m.cli("stream", "--wait", "--delete")
    assert cp.returncode != 0 and "Traceback" not in cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 2 and "other.qcow2" in lines[1] and "mid.qcow2" in lines[1], lines
    cp = m.cli("stream", "--wait", "--delete", "--base", "nosuch.qcow2")
    assert cp.returncode != 0 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert "nosuch.qcow2" in cp.stderr
    os.unlink(other)
    cp = m.cli("stream", "--wait", "--delete", "--base", "base.qcow2")
    assert cp.returncode == 0, (cp.stderr, m.log())
    assert not os.path.exists(mid) and not os.path.exists(top)
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(active) == model
    check_images([base, active])


def test_stream_nothing_to_do_and_read_only(tmp_path, mounter):
    """Streaming onto the active image's own backing file completes at once and changes
    nothing; a read-only mount refuses with one line."""
    c = build_live_chain(tmp_path / "img", size=16 * M)
    before = {p: open(p, "rb").read() for p in c.images}
    m = mounter(c.active, "--read-only")
    cp = m.cli("stream", "--wait")
    assert cp.returncode != 0 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert "read-only" in cp.stderr
    m.unmount()
    assert {p: open(p, "rb").read() for p in c.images} == before
    m = mounter(c.active)
    cp = m.cli("stream", "--wait", "--base", c.images[2])
    assert cp.returncode == 0, (cp.stderr, m.log())
    m.unmount()
    assert chain_files(c.active) == ["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"]
    check_images(c.images)


def test_stream_keeps_a_large_disk_sparse(tmp_path, mounter):
    """A 64 GiB active image over a 4 MiB backing file that has a zero cluster over
    base data: streaming writes the data and that zero cluster, not 64 GiB of zeros
    past the backing file's end (which reads as zeros without it too)."""
    d = tmp_path / "img"
    d.mkdir()
    base = create(str(d / "base.qcow2"), 4 * M)
    apply_ops(base, [("w", 0, 4 * M, 0x11)])
    mid = create(str(d / "mid.qcow2"), 4 * M, backing="base.qcow2")
    apply_ops(mid, [("w", M, 64 * K, 0x22), ("z", 2 * M, 64 * K)])
    active = create(str(d / "active.qcow2"), 64 << 30, backing="mid.qcow2")
    head = flat(mid)
    m = mounter(active)
    cp = m.cli("stream", "--wait")
    assert cp.returncode == 0, (cp.stderr, m.log())
    with open(m.disk, "rb") as f:
        assert f.read(4 * M) == head
        f.seek(40 << 30)
        assert f.read(M) == bytes(M)
    m.unmount()
    assert chain_names(active) == [("active.qcow2", None, 64 << 30)]
    ext = [e for e in qemu_map(active) if e["data"] or e.get("offset")]
    assert sum(e["length"] for e in ext) <= 4 * M, ext
    check_images([active])
