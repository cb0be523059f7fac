"""Live commit of intermediate layers through a real mount.

A guest thread pwrite+fsyncs random blocks into MOUNT/disk.raw against a model while a
commit job runs; sampled reads during the job and a full read after must match the
model; after unmount qemu-img must agree. The job is driven with the real `qemu.qmp`
client and with `qcowfs commit`; the daemon is killed with SIGKILL at random points of
restartable commits, remounted, and the commit started again.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from mount_fixtures import pid_alive, read_file, wait_until
from qemu_helpers import apply_ops, convert_raw, create, qemu_info_chain
from test_commit_support import (
    Chain,
    K,
    M,
    SyncQMP,
    Writer,
    chain_files,
    check_images,
    flat,
    node_files,
    settle_pending_write,
)
from test_qmp_support import END_COMPLETED, START, statuses_only

CHUNK = 1 << 20  # the engine's copy chunk (commit.steps.CHUNK)


def build_live_chain(d, size=256 * M, scale=1):
    """base <- mid <- top <- active, `size` bytes, distinct patterns per layer: base
    data in the first half, mid and top scattered extents (overlapping, and zero
    clusters over lower data), a little in active."""
    d.mkdir(parents=True, exist_ok=True)
    base = create(str(d / "base.qcow2"), size)
    apply_ops(base, [("w", 0, size // 2, 0x11), ("w", size - M, M, 0x12)])
    mid = create(str(d / "mid.qcow2"), size, backing="base.qcow2")
    step = 4 * M * scale
    apply_ops(
        mid,
        [("w", o, M, 0x20 + (o // step) % 16) for o in range(0, size - M, step)]
        + [("z", 2 * M, 2 * M)],
    )
    top = create(str(d / "top.qcow2"), size, backing="mid.qcow2")
    step = 6 * M * scale
    apply_ops(
        top,
        [("w", o + 512 * K, M, 0x40 + (o // step) % 16) for o in range(0, size - 2 * M, step)]
        + [("z", size // 2 + 64 * K, M)],
    )
    active = create(str(d / "active.qcow2"), size, backing="top.qcow2")
    apply_ops(active, [("w", 3 * M, 64 * K, 0x61), ("w", size - 64 * K, 64 * K, 0x62)])
    return Chain(d, [base, mid, top, active], top, base)


def kill9(m):
    """SIGKILL the mount's daemon and wait until it has really exited (its files, and
    with them its image locks, are released only at the end of the exit)."""
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 30, f"daemon {pid} to exit")


def _commit_args(nodes, mode, speed, job_id="c1", **extra):
    args = {
        "job-id": job_id,
        "device": nodes[0]["node-name"],
        "top": nodes[1]["file"],
        "base": nodes[-1]["file"],
        "speed": speed,
    }
    if mode != "simple":
        args["x-mode"] = mode
    args.update(extra)
    return args


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["simple", "restartable"])
def test_live_commit_under_guest_writes(tmp_path, mounter, mode):
    c = build_live_chain(tmp_path / "img")
    model = bytearray(flat(c.active))
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        assert node_files(nodes) == ["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"]
        w = Writer(m.disk, model, seed=hash(mode) & 0xFFFF).start()
        time.sleep(0.3)
        qmp.execute("block-commit", _commit_args(nodes, mode, speed=48 * M))
        progress = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = qmp.execute("query-block-jobs")
            if not jobs:
                break
            (job,) = jobs
            assert job["device"] == "c1" and job["type"] == "commit"
            progress.append((job["offset"], job["len"]))
            assert w.error is None, w.error
            time.sleep(0.05)
        qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]
        assert "error" not in done, done
        assert qmp.statuses("c1") == statuses_only(START + END_COMPLETED)
        assert done["offset"] == done["len"] > 32 * M
        offsets = [o for o, _n in progress]
        assert offsets == sorted(offsets) and len(progress) > 5, progress
        time.sleep(0.3)  # the guest goes on after the commit
        w.stop()
        assert w.writes > 50 and w.samples > 50, (w.writes, w.samples)
        assert node_files(qmp.execute("query-named-block-nodes")) == ["active.qcow2", "base.qcow2"]
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(c.active) == model
    assert chain_files(c.active) == ["active.qcow2", "base.qcow2"]
    check_images(c.images)


@pytest.mark.slow
def test_live_commit_cli_wait_and_second_client(tmp_path, mounter):
    """`qcowfs commit MOUNT --top mid --wait --delete` while a qemu.qmp client listens (several
    clients at once, each gets every event) and the guest writes; then the rest."""
    c = build_live_chain(tmp_path / "img", size=64 * M)
    model = bytearray(flat(c.active))
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=7).start()
        cp = m.cli(
            "commit",
            "--top",
            "mid.qcow2",
            "--speed",
            str(32 * M),
            "--wait",
            "--delete",
            timeout=120,
        )
        assert cp.returncode == 0, (cp.stdout, cp.stderr, m.log())
        assert "Traceback" not in cp.stderr
        qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert node_files(qmp.execute("query-named-block-nodes")) == [
            "active.qcow2",
            "top.qcow2",
            "base.qcow2",
        ]
        assert not os.path.exists(c.images[1]), "--delete left mid.qcow2"
        cp = m.cli("commit", "--wait", "--delete", timeout=120)
        assert cp.returncode == 0, (cp.stdout, cp.stderr, m.log())
        w.stop()
        assert node_files(qmp.execute("query-named-block-nodes")) == ["active.qcow2", "base.qcow2"]
    assert read_file(m.disk, direct=True) == model
    assert not os.path.exists(c.images[2]), "--delete left top.qcow2"
    m.unmount()
    assert flat(c.active) == model
    check_images(c.existing())


# ---- restartable: kill -9 of the daemon at random points, remount, commit again ---------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_live_restartable_kill9_and_restart(tmp_path, mounter, seed):
    rnd = random.Random(seed)
    c = build_live_chain(tmp_path / "img", size=64 * M, scale=1)
    model = bytearray(flat(c.active))
    speed = 12 * M
    runs = []  # per run: [len at start, last offset seen before the kill]
    kills = 0
    finished = False
    for attempt in range(8):
        # restarted by hand here (test_resume.py covers the mount resuming it)
        m, cp = mounter.attempt(c.active, "--no-resume")
        assert cp.returncode == 0, (cp.stderr, m.log())
        assert attempt == 0 or "--no-resume" in cp.stderr, cp.stderr
        got = read_file(m.disk, direct=True)
        assert got == model, "after a kill -9 the remount lost fsync'd data"
        with SyncQMP(m.socket) as qmp:
            nodes = qmp.execute("query-named-block-nodes")
            if len(nodes) == 2:
                finished = True  # the last run dropped the last layer
                m.unmount()
                break
            w = Writer(m.disk, model, seed=seed * 100 + attempt).start()
            qmp.execute(
                "block-commit", _commit_args(nodes, "restartable", speed, job_id=f"r{attempt}")
            )
            run = [None, 0]
            runs.append(run)
            kill_at = time.monotonic() + rnd.uniform(0.15, 0.9) if attempt < 3 else None
            while True:
                jobs = qmp.execute("query-block-jobs")
                if jobs:
                    run[0] = max(run[0] or 0, jobs[0]["len"])
                    run[1] = jobs[0]["offset"]
                done = [e for e in qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"]
                if done:
                    assert "error" not in done[0]["data"], done
                    run[1] = done[0]["data"]["offset"]
                    run[0] = max(run[0] or 0, done[0]["data"]["len"])
                    finished = True
                    break
                if kill_at is not None and time.monotonic() >= kill_at:
                    kill9(m)
                    kills += 1
                    break
                time.sleep(0.02)
        if finished:
            w.stop()
            assert read_file(m.disk, direct=True) == model
            m.unmount()
            break
        w.stop(expect_error=True)
        m.cleanup()
        settle_pending_write(flat(c.active), model, w.pending)
        check_images(c.existing(), allow_leaks=True)
    assert finished, "the commit never finished"
    assert kills >= 1
    assert flat(c.active) == model
    assert chain_files(c.active) == ["active.qcow2", "base.qcow2"]
    check_images([c.base, c.active], allow_leaks=True)
    data = runs[0][0]
    assert data > 16 * M, runs
    copied = sum(r[1] for r in runs)
    assert copied <= data * 1.05 + kills * CHUNK, (
        f"{copied} bytes copied by {len(runs)} runs for {data} bytes of data: {runs}"
    )


@pytest.mark.parametrize("mode", ["simple", "restartable"])
def test_live_commit_short_mid_iotest274(tmp_path, mounter, mode):
    """base 2M of 0x01 <- mid 1M <- top 2M (mounted): live commit of mid into base. The
    guest keeps reading zeros on [1M, 2M) (QEMU 7.2's block-commit leaks base's 0x01
    there), and so does base afterwards."""
    from test_commit_offline import _chain_274

    c = _chain_274(tmp_path / "img", with_active=False)
    base, mid, top = c.images
    v0 = flat(top)
    m = mounter(top)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        qmp.execute("block-commit", _commit_args(nodes, mode, speed=0))
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)["data"]
        assert "error" not in done, done
        assert node_files(qmp.execute("query-named-block-nodes")) == ["top.qcow2", "base.qcow2"]
        assert read_file(m.disk, direct=True) == v0
    m.unmount()
    assert flat(top) == v0
    assert convert_raw(base) == v0
    check_images(c.images)


def test_live_commit_pause_resume_set_speed(tmp_path, mounter):
    c = build_live_chain(tmp_path / "img", size=64 * M)
    model = bytearray(flat(c.active))
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        qmp.execute("block-commit", _commit_args(nodes, "simple", speed=4 * M))
        time.sleep(0.5)
        qmp.execute("block-job-pause", {"device": "c1"})
        qmp.wait_event("JOB_STATUS_CHANGE", pred=lambda d: d["status"] == "paused")
        (job,) = qmp.execute("query-block-jobs")
        assert job["paused"] is True and job["status"] == "paused"
        time.sleep(0.3)
        (again,) = qmp.execute("query-block-jobs")
        assert again["offset"] == job["offset"], "a paused job went on copying"
        # the guest is not held up by a paused job
        with open(m.disk, "r+b", buffering=0) as f:
            f.seek(5 * M)
            f.write(b"\x77" * 4096)
            os.fsync(f.fileno())
        model[5 * M : 5 * M + 4096] = b"\x77" * 4096
        qmp.execute("block-job-set-speed", {"device": "c1", "speed": 0})
        qmp.execute("block-job-resume", {"device": "c1"})
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        assert "error" not in done and done["speed"] == 0, done
        assert qmp.statuses("c1")[:4] == ["created", "running", "paused", "running"]
        assert qmp.error_of("block-job-pause", {"device": "c1"})[0] == "DeviceNotActive"
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(c.active) == model
    check_images(c.images)


@pytest.mark.parametrize("mode", ["simple", "restartable"])
def test_live_cancel_then_commit_again(tmp_path, mounter, mode):
    """block-job-cancel midway: BLOCK_JOB_CANCELLED, the flat view is unchanged, a clean
    unmount leaves no leak. A new commit then finishes; in restartable mode it copies
    only what the cancelled run had not (never a cluster twice)."""
    c = build_live_chain(tmp_path / "img", size=64 * M)
    model = bytearray(flat(c.active))
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        w = Writer(m.disk, model, seed=5).start()
        nodes = qmp.execute("query-named-block-nodes")
        qmp.execute("block-commit", _commit_args(nodes, mode, speed=12 * M))
        first_len, first_offset = qmp.pause_midway("c1")
        qmp.execute("block-job-cancel", {"device": "c1", "force": True})
        ev = qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)["data"]
        assert ev["device"] == "c1"
        assert "BLOCK_JOB_COMPLETED" not in qmp.names()
        with w.quiesce():
            assert read_file(m.disk, direct=True) == model
        nodes = qmp.execute("query-named-block-nodes")
        if mode == "simple":
            assert node_files(nodes) == ["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"]
        w.stop()
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(c.active) == model
    check_images(c.images)  # clean: no leak after a cancel
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        qmp.execute("block-commit", _commit_args(nodes, mode, speed=0, job_id="c2"))
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        assert "error" not in done, done
        if mode == "simple":
            assert done["len"] == first_len  # starts over
        else:
            assert done["len"] <= first_len - first_offset, (done, first_len, first_offset)
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(c.active) == model
    assert chain_files(c.active) == ["active.qcow2", "base.qcow2"]
    check_images(c.images)


def test_unmount_during_a_job(tmp_path, mounter):
    """`qcowfs unmount` refuses while a job runs; `--cancel-jobs` cancels it and
    unmounts cleanly: the chain is unchanged and every image is clean."""
    c = build_live_chain(tmp_path / "img", size=64 * M)
    v0 = flat(c.active)
    m = mounter(c.active)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        qmp.execute("block-commit", _commit_args(nodes, "simple", speed=2 * M))
        time.sleep(0.3)
        cp = m.cli("unmount", timeout=60)
        assert cp.returncode != 0 and "Traceback" not in cp.stderr, cp
        assert len(cp.stderr.strip().splitlines()) == 1, cp.stderr
        assert qmp.execute("query-block-jobs"), "the refused unmount ended the job"
    m.unmount("--cancel-jobs")
    assert flat(c.active) == v0
    assert chain_files(c.active) == ["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"]
    check_images(c.images)


LIVE_ORACLE_CASES = [
    "scenario",
    "short_intermediate4",
    "raw_base",
    "compressed_mid",
    "extended_l2",
    "short_unaligned",
    "top_larger_095",
]


@pytest.mark.parametrize("mode", ["simple", "restartable"])
@pytest.mark.parametrize("case", LIVE_ORACLE_CASES)
def test_live_commit_matches_qemu_img_commit(tmp_path, mounter, case, mode):
    """The offline oracle, live: commit (base, top] inside the mount; the flat file
    never changes and the result equals QEMU's own commit of a copy of the chain."""
    from test_commit_support import build, qemu_reference_commit

    ours = build(case, tmp_path / "ours")
    ref = build(case, tmp_path / "qemu")
    v0 = flat(ours.active)
    qemu_view, _qemu_base = qemu_reference_commit(ref)
    m = mounter(ours.active)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        top = next(n for n in nodes if os.path.samefile(n["file"], ours.top))
        base = next(n for n in nodes if os.path.samefile(n["file"], ours.base))
        args = {"job-id": "c1", "top-node": top["node-name"], "base-node": base["node-name"]}
        if mode != "simple":
            args["x-mode"] = mode
        qmp.execute("block-commit", args)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        assert "error" not in done, done
        assert read_file(m.disk, direct=True) == v0
        above = ours.images[ours.images.index(ours.top) + 1 :]
        assert [os.path.realpath(n["file"]) for n in qmp.execute("query-named-block-nodes")] == [
            os.path.realpath(p) for p in above[::-1] + [ours.base]
        ]
    m.unmount()
    assert flat(ours.active) == v0 == qemu_view
    check_images(ours.existing())


def test_live_commit_io_error_stops_the_job(tmp_path, mounter):
    """A bad L2 entry in mid (pointing past the end of its file): the job fails with
    BLOCK_JOB_ERROR and BLOCK_JOB_COMPLETED{error}, the chain stays as it was, and the
    flat file keeps serving everything else correctly (the bad cluster: EIO)."""
    import errno

    from qemu_helpers import patch, qcow2_layout

    c = build_live_chain(tmp_path / "img", size=16 * M)
    base, mid, top, active = c.images
    v0 = flat(active)
    lay = qcow2_layout(mid)
    # a data cluster of mid that no upper layer shadows (top writes [6.5M, 7.5M) and
    # [12.5M, 13.5M); mid holds [8M, 9M))
    where, guest, entry = next(e for e in lay["data_entries"] if e[1] == 8 * M)
    patch(mid, where, "Q", (entry & ~0x00FF_FFFF_FFFF_FE00) | (lay["file_size"] + (1 << 30)))
    cs = lay["cluster_size"]
    m = mounter(active)
    with SyncQMP(m.socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        qmp.execute("block-commit", _commit_args(nodes, "simple", speed=0))
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        assert done.get("error"), done
        error = qmp.wait_event("BLOCK_JOB_ERROR", timeout=1)["data"]
        assert error == {"device": "c1", "operation": "read", "action": "report"}
        assert node_files(qmp.execute("query-named-block-nodes")) == node_files(nodes)
        fd = os.open(m.disk, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 4096)
            with pytest.raises(OSError) as e:
                os.preadv(fd, [buf], guest)
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        got = bytearray(read_file_skipping(m.disk, guest, cs))
        want = bytearray(v0)
        want[guest : guest + cs] = bytes(cs)
        assert got == want
    m.unmount()
    check_images([base, top, active])


def read_file_skipping(path, bad_off, bad_len):
    """The whole file, reading around [bad_off, bad_off+bad_len) (zeros there)."""
    size = os.stat(path).st_size
    out = bytearray(size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    import mmap

    buf = mmap.mmap(-1, 64 * 1024)
    try:
        off = 0
        while off < size:
            n = min(64 * 1024, size - off)
            if off + n > bad_off and off < bad_off + bad_len:
                off += n
                continue
            k = os.preadv(fd, [buf], off)
            out[off : off + k] = buf[:k]
            off += n
    finally:
        os.close(fd)
    return bytes(out)


def test_block_commit_backing_file_is_written_as_given(tmp_path, mounter):
    """block-commit's backing-file (what libvirt sends for --keep-relative): the string
    top's overlay gets for base, written as given. One that does not lead to base from
    the overlay's directory is refused before anything changes (QEMU would write it and
    break the chain), and so is one for an active commit (no overlay). filter-node-name
    is accepted (qcowfs puts no filter node in the graph)."""
    c = build_live_chain(tmp_path / "img", size=16 * M)
    base, mid, top, active = c.images
    want = flat(active)
    m = mounter(active)
    with SyncQMP(m.socket) as qmp:
        for args in (
            {"top": top, "base": base, "backing-file": "nope.qcow2"},
            {"top": active, "base": base, "backing-file": "base.qcow2"},
        ):
            cls, desc = qmp.error_of("block-commit", {"job-id": "c", **args})
            assert cls == "GenericError" and "backing-file" in desc, desc
        assert len(qmp.execute("query-named-block-nodes")) == 4, "a refusal changed the chain"
        start = len(qmp.events)
        qmp.execute(
            "block-commit",
            {
                "job-id": "c",
                "top": top,
                "base": base,
                "backing-file": "./base.qcow2",
                "filter-node-name": "commit-filter",
            },
        )
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, start=start)["data"]
        assert "error" not in done, done
    assert read_file(m.disk) == want
    m.unmount()
    info = qemu_info_chain(active)
    assert info[0]["backing-filename"] == "./base.qcow2"
    assert [os.path.basename(i["filename"]) for i in info] == ["active.qcow2", "base.qcow2"]
    assert convert_raw(active) == want
    check_images([active])
