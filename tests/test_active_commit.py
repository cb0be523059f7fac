"""Active commit with pivot, driven with the real `qemu.qmp` client.

`block-commit` with top = the active image mirrors (base, active] into base while a
guest thread pwrite+fsyncs random blocks against a model; READY, then
`block-job-complete` pivots the mount onto base. Cancel after READY leaves the chain as
it was with base holding the flat view of that moment. kill -9 at random points:
remounting whichever chain the on-disk headers describe reads back every fsync'd byte.
"""

from __future__ import annotations

import errno
import random
import threading
import time

import pytest
from mount_fixtures import read_file
from qemu_helpers import apply_ops, convert_raw, create, qemu_check, qemu_info_chain
from test_commit_live import build_live_chain, kill9
from test_commit_support import (
    M,
    SyncQMP,
    Writer,
    chain_files,
    chain_names,
    check_images,
    compare_with_pending,
    flat,
    node_files,
)
from test_qmp_support import END_COMPLETED, READY, START, statuses_only

from commit.completion import pivot
from commit.engine import start_commit
from commit.steps import Ready
from qcow.chain import open_chain
from qcow.header import read_backing_info
from qcow.image import Qcow2Image

SIZE = 64 * M


def _active_commit(qmp, job_id="ac", speed=0, **extra):
    nodes = qmp.execute("query-named-block-nodes")
    args = {"job-id": job_id, "device": nodes[0]["node-name"], "top": nodes[0]["file"]}
    if speed:
        args["speed"] = speed
    args.update(extra)
    qmp.execute("block-commit", args)
    return nodes


def test_active_commit_pivot_under_guest_writes(tmp_path, mounter):
    c = build_live_chain(tmp_path / "img", size=SIZE)
    base, mid, top, active = c.images
    model = bytearray(flat(active))
    m = mounter(active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=1).start()
        time.sleep(0.3)  # before
        before = _active_commit(qmp, speed=32 * M)
        assert node_files(before) == ["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"]
        ready = qmp.wait_event("BLOCK_JOB_READY", timeout=60)["data"]  # during
        assert ready["device"] == "ac" and ready["type"] == "commit"
        assert qmp.statuses("ac") == ["created", "running", "ready"]
        (job,) = qmp.execute("query-block-jobs")
        assert job["ready"] is True and job["status"] == "ready"
        assert job["offset"] == job["len"] > 0, job
        writes_at_ready = w.writes
        time.sleep(0.5)  # in sync, still writing
        assert w.writes > writes_at_ready, "the guest made no progress while READY"
        assert w.error is None, w.error
        qmp.execute("block-job-complete", {"device": "ac"})
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)["data"]
        assert "error" not in done, done
        qmp.wait_event("JOB_STATUS_CHANGE", pred=lambda d: d["status"] == "null")
        assert qmp.statuses("ac") == statuses_only(START + READY + END_COMPLETED)
        after = qmp.execute("query-named-block-nodes")
        assert node_files(after) == ["base.qcow2"]
        assert after[0]["virtual-size"] == SIZE
        assert qmp.execute("query-block-jobs") == []
        writes_at_pivot = w.writes
        time.sleep(0.5)  # after: writes go to base
        w.stop()
        assert w.writes > writes_at_pivot + 5 and w.samples > 20
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    # base alone is the disk now (the pivot rewrites no header, as in QEMU)
    assert convert_raw(base) == model
    assert chain_files(base) == ["base.qcow2"]
    check_images([base])
    # the old active image is left intact: still names top, still a valid image
    assert chain_names(active)[0][1] == "top.qcow2"
    check_images([active, top, mid])


def test_active_commit_cancel_after_ready_then_commit_again(tmp_path, mounter):
    c = build_live_chain(tmp_path / "img", size=SIZE)
    base, mid, top, active = c.images
    model = bytearray(flat(active))
    m = mounter(active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=2).start()
        before = _active_commit(qmp, job_id="ac1")
        qmp.wait_event("BLOCK_JOB_READY", timeout=60)
        time.sleep(0.3)
        with w.quiesce():
            at_cancel = bytes(model)
            n = len(qmp.events)
            qmp.execute("block-job-cancel", {"device": "ac1"})
            ev = qmp.wait_event("JOB_STATUS_CHANGE", start=n, pred=lambda d: d["status"] == "null")
            assert ev
            names = qmp.names()[n:]
            # a soft cancel of a ready job completes without a pivot (QEMU)
            assert "BLOCK_JOB_COMPLETED" in names and "BLOCK_JOB_CANCELLED" not in names, names
            assert node_files(qmp.execute("query-named-block-nodes")) == node_files(before)
            # base holds what the flat view held at the cancel
            base_view = convert_raw(base, share=True)
            assert len(base_view) == SIZE
            assert base_view == at_cancel
            assert read_file(m.disk, direct=True) == at_cancel
        time.sleep(0.3)
        assert w.error is None, w.error
        # a later commit succeeds
        _active_commit(qmp, job_id="ac2")
        qmp.wait_event("BLOCK_JOB_READY", timeout=60, pred=lambda d: d["device"] == "ac2")
        qmp.execute("block-job-complete", {"device": "ac2"})
        qmp.wait_event("BLOCK_JOB_COMPLETED", pred=lambda d: d["device"] == "ac2")
        assert node_files(qmp.execute("query-named-block-nodes")) == ["base.qcow2"]
        time.sleep(0.2)
        w.stop()
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert convert_raw(base) == model
    check_images([base, active, top, mid])


def test_active_commit_events_and_errors(tmp_path, mounter):
    """QEMU's error classes and refusals around an active job."""
    c = build_live_chain(tmp_path / "img", size=16 * M)
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        assert qmp.error_of("block-job-complete", {"device": "nosuch"})[0] == "DeviceNotActive"
        _active_commit(qmp, job_id="ac", speed=4 * M)
        # complete before READY is refused; so is a second job on the chain
        cls, desc = qmp.error_of("block-job-complete", {"device": "ac"})
        assert cls == "GenericError", (cls, desc)
        cls, desc = qmp.error_of("block-commit", {"job-id": "other", "top": "top.qcow2"})
        assert cls == "GenericError" and desc, desc
        qmp.execute("block-job-set-speed", {"device": "ac", "speed": 0})
        qmp.wait_event("BLOCK_JOB_READY", timeout=60)
        qmp.execute("block-job-complete", {"device": "ac"})
        qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert node_files(qmp.execute("query-named-block-nodes")) == ["base.qcow2"]
    m.unmount()
    check_images([c.base])


# ---- kill -9 at random points of an active commit -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["before_ready", "after_ready", "after_pivot"])
@pytest.mark.parametrize("seed", [21, 22])
def test_active_commit_kill9(tmp_path, mounter, phase, seed):
    rnd = random.Random(f"{seed}-{phase}")
    c = build_live_chain(tmp_path / "img", size=SIZE)
    base, mid, top, active = c.images
    model = bytearray(flat(active))
    m = mounter(active)
    pivoted = False
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=seed).start()
        time.sleep(0.2)
        _active_commit(qmp, speed=16 * M if phase == "before_ready" else 0)
        if phase == "before_ready":
            time.sleep(rnd.uniform(0.1, 1.0))
            assert "BLOCK_JOB_READY" not in qmp.names(), "READY came too early"
        else:
            qmp.wait_event("BLOCK_JOB_READY", timeout=60)
            if phase == "after_pivot":
                qmp.execute("block-job-complete", {"device": "ac"})
                qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
                pivoted = True
            time.sleep(rnd.uniform(0.05, 0.6))
        assert w.error is None, w.error
        kill9(m)
    w.stop(expect_error=True)
    m.cleanup()
    # the chain the on-disk headers describe: base alone after the pivot, else active's
    image = base if pivoted else active
    got = flat(image)
    compare_with_pending(got, model, w.pending)
    check_images([base, active, top, mid], allow_leaks=True)
    m2 = mounter(image)
    assert read_file(m2.disk, direct=True) == got
    m2.unmount()
    if pivoted:
        assert chain_files(base) == ["base.qcow2"]
    else:
        assert len(qemu_info_chain(active)) == 4


def test_active_commit_into_short_intermediate_iotest274(tmp_path, mounter):
    """iotest 274's QMP case: base 2M of 0x01 <- mid 1M <- top 2M (mounted); active
    commit of top into mid (base-node=mid), complete: mid grows to 2M and reads zeros on
    [1M, 2M), the flat view is unchanged."""
    from test_commit_offline import _chain_274

    c = _chain_274(tmp_path / "img", with_active=False)
    base, mid, top = c.images
    v0 = flat(top)
    m = mounter(top)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        qmp.execute(
            "block-commit",
            {
                "job-id": "ac",
                "device": nodes[0]["node-name"],
                "top": nodes[0]["file"],
                "base-node": nodes[1]["node-name"],
            },
        )
        qmp.wait_event("BLOCK_JOB_READY", timeout=30)
        qmp.execute("block-job-complete", {"device": "ac"})
        qmp.wait_event("BLOCK_JOB_COMPLETED")
        after = qmp.execute("query-named-block-nodes")
        assert node_files(after) == ["mid.qcow2", "base.qcow2"]
        assert after[0]["virtual-size"] == 2 * M
        assert read_file(m.disk, direct=True) == v0
    m.unmount()
    assert flat(mid) == v0
    assert [(n, s) for n, _b, s in chain_names(mid)] == [
        ("mid.qcow2", 2 * M),
        ("base.qcow2", 2 * M),
    ]
    check_images([base, mid, top])


def test_active_commit_of_the_design_discussion_chain(tmp_path, mounter):
    """base[1M] <- mid[2M] <- top[3M] <- active[3M] (short layers, base smaller than
    the disk): an active commit with pivot leaves base alone holding the flat view."""
    from test_commit_support import build

    c = build("scenario", tmp_path / "img")
    base = c.images[0]
    model = bytearray(flat(c.active))
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=9, block_sizes=(4096, 8192)).start()
        _active_commit(qmp)
        qmp.wait_event("BLOCK_JOB_READY", timeout=60)
        qmp.execute("block-job-complete", {"device": "ac"})
        qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        time.sleep(0.2)
        w.stop()
        assert node_files(qmp.execute("query-named-block-nodes")) == ["base.qcow2"]
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert convert_raw(base) == model
    check_images(c.images)


def test_active_commit_cancel_before_ready(tmp_path, mounter):
    c = build_live_chain(tmp_path / "img", size=SIZE)
    model = bytearray(flat(c.active))
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=4).start()
        before = _active_commit(qmp, speed=4 * M)
        time.sleep(0.5)
        qmp.execute("block-job-cancel", {"device": "ac"})
        qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        assert "BLOCK_JOB_READY" not in qmp.names()
        assert node_files(qmp.execute("query-named-block-nodes")) == node_files(before)
        time.sleep(0.2)
        w.stop()
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(c.active) == model
    check_images(c.images)


@pytest.fixture
def opened_for_pivot(tmp_path):
    """base <- active (256 KiB written), opened writable with base reopened read-write
    as a job does: (chain, base layer, old active layer, base path, active path)."""
    base = create(tmp_path / "base.qcow2", 4 * M)
    active = create(tmp_path / "active.qcow2", 4 * M, backing=base)
    apply_ops(active, [("w", 0, 256 << 10, 0x5A)])
    chain = open_chain(active, writable=True)
    try:
        base_layer = chain.reopen(chain.layers[1], True)
        yield chain, base_layer, chain.layers[0], base, active
    finally:
        chain.close()


def test_pivot_syncs_nothing_under_the_lock_and_the_next_flush_makes_its_mark_durable(
    opened_for_pivot,
):
    """The pivot writes the old active image's leftover mark under the chain's lock but
    does not sync it there (a fdatasync would stall every guest request); the next
    flush of the chain, before the job's own clean-up, syncs it."""
    chain, base_layer, old, base, active = opened_for_pivot
    syncs = []
    real_sync = old.io.sync
    old.io.sync = lambda: (syncs.append(old.io.unsynced), real_sync())
    with chain.lock:
        dropped = pivot(chain, base_layer)
    assert dropped == [old] and chain.layers == [base_layer]
    assert syncs == [] and old.io.unsynced, "the mark was synced under the chain's lock"
    chain.flush()  # a guest's fsync, before the job releases the old active image
    assert syncs == [True] and not old.io.unsynced
    assert Qcow2Image(str(active)).header.drained_into == base_layer.path
    chain.release_dropped(dropped)
    chain.close()
    for img in (base, active):
        assert qemu_check(img)[0] == 0


def test_a_layer_that_left_closes_in_the_job_thread_after_older_reads(opened_for_pivot):
    """After a pivot the old active image closes only once the reads that began before
    it left are done, and it is the job's thread that closes it (waiting for them), never
    the thread of the guest's read: closing flushes and syncs."""
    chain, base_layer, old, _base, _active = opened_for_pivot
    closed_by = []
    real_close = old.close
    old.close = lambda: (closed_by.append(threading.get_ident()), real_close())
    with chain.lock:
        older_read = chain._read_begins()  # a guest read planned on the old layers
        dropped = pivot(chain, base_layer)
    assert len(chain.read(0, 4096)) == 4096  # a read begun since: it does not hold the close
    job = threading.Thread(target=chain.release_dropped, args=(dropped,))
    job.start()
    job.join(0.2)
    assert job.is_alive() and closed_by == [] and old.io.fd >= 0
    chain._read_done(older_read)  # the guest's read ends: it closes nothing itself
    job.join(10)
    assert not job.is_alive() and closed_by == [job.ident] and old.io.fd < 0


def test_a_cancel_after_going_round_past_the_marks_unmarks_the_intermediates(tmp_path):
    """`complete` marks the intermediates leftovers before the pivot. When a mirrored
    write failed meanwhile, the job copies again and asks again; cancelled then, the
    chain stays as it was, and its intermediates must not stay marked: the stranding
    guard and a later commit would take them for leftovers of a commit that never
    happened."""
    base = create(tmp_path / "base.qcow2", 4 * M)
    mid = create(tmp_path / "mid.qcow2", 4 * M, backing=base)
    active = create(tmp_path / "active.qcow2", 4 * M, backing=mid)
    apply_ops(mid, [("w", 0, 256 << 10, 0x11)])
    apply_ops(active, [("w", 1 * M, 256 << 10, 0x22)])
    chain = open_chain(active, writable=True)
    try:
        _target, _stranded, steps = start_commit(chain, active=True)
        step = next(steps)
        while not isinstance(step, Ready):
            step = steps.send(None)
        base_layer = chain.layers[2]
        real_write = base_layer.write

        def fails_once(*args):
            base_layer.write = real_write
            raise OSError(errno.EIO, "injected: the mirrored write into base fails")

        base_layer.write = fails_once
        chain.write(2 * M, b"\x33" * 4096)  # acknowledged; its chunk is dirty again
        step = steps.send("complete")
        assert read_backing_info(mid).drained_into == str(base), "complete marks mid"
        while not isinstance(step, Ready):  # went round: the failed chunk copied again
            step = steps.send(None)
        with pytest.raises(StopIteration) as stop:
            steps.send("cancel")
        assert stop.value.value == [] and [layer.path for layer in chain.layers] == [
            str(active),
            str(mid),
            str(base),
        ]
        assert read_backing_info(mid).drained_into is None, "mid is still marked a leftover"
        assert chain.read(2 * M, 4096) == b"\x33" * 4096
    finally:
        chain.close()
    assert read_backing_info(mid).drained_into is None
    for img in (base, mid, active):
        assert qemu_check(img)[0] == 0
    assert convert_raw(base) == convert_raw(active), "base holds the disk of the cancel"
