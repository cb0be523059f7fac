"""Interrupted commits resume themselves on the next mount.

A commit records its intent in the overlay of its top before its first write; after a
kill -9 (or a power cut at any flush barrier) the next `qcowfs mount` says so in one
line and resumes it, which the log and `query-block-jobs` show. A restartable commit
resumed this way copies again no more than the chunks in flight at each kill.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mount_fixtures import read_file, wait_until
from qemu_helpers import K, apply_ops, create, run_qcowfs
from test_commit_live import CHUNK, build_live_chain, kill9
from test_commit_offline import _count_barriers, _run_script
from test_commit_support import (
    Chain,
    M,
    SyncQMP,
    Writer,
    chain_files,
    check_images,
    crash_script,
    flat,
    node_files,
    offline_script,
    settle_pending_write,
)

import qcow


def _mount_noting(mounter, image, *args):
    """Mount through the CLI; returns (Mount, its stderr lines)."""
    m, cp = mounter.attempt(image, *args)
    assert cp.returncode == 0, (cp.stderr, m.log())
    assert "Traceback" not in cp.stderr
    return m, cp.stderr.strip().splitlines()


def _pending(image):
    """The commit records in IMAGE's chain, as `qcowfs info --json` shows them."""
    info = json.loads(run_qcowfs("info", "--json", image, check=True).stdout)
    return [d["x-pending-commit"] for d in info if "x-pending-commit" in d]


def _pending_fast(image):
    """The same, read in this process (the power-cut sweep runs it many times)."""
    with qcow.open_chain(image, image_locking=False, metadata_only=True) as chain:
        return [
            layer.header.pending_commit
            for layer in chain.layers
            if layer.format == "qcow2" and layer.header.pending_commit
        ]


def _completed_in_log(m):
    """The data of the BLOCK_JOB_COMPLETED event the daemon logged, or None."""
    for line in m.log().splitlines():
        if "job event BLOCK_JOB_COMPLETED " in line:
            return ast.literal_eval(line.split("BLOCK_JOB_COMPLETED ", 1)[1])
    return None


def _start(qmp, c, job_id, speed):
    nodes = qmp.execute("query-named-block-nodes")
    qmp.execute(
        "block-commit",
        {
            "job-id": job_id,
            "top": nodes[1]["file"],
            "base": nodes[-1]["file"],
            "x-mode": "restartable",
            "speed": speed,
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [31, 32])
def test_kill9_then_mount_resumes(tmp_path, mounter, seed):
    rnd = random.Random(seed)
    c = build_live_chain(tmp_path / "img", size=64 * M)
    model = bytearray(flat(c.active))
    m = mounter(c.active)
    runs = []  # per run: [len, last offset seen]
    kills = seen_resumed = 0
    with SyncQMP(m.socket) as qmp:
        _start(qmp, c, "backup", 12 * M)
        w = Writer(m.disk, model, seed=seed).start()
        first = True
        while True:
            run = [0, 0]
            runs.append(run)
            done = None
            if not first:
                # the resumed job, under the id the record kept (a short rest may have
                # finished before this client connected: the log then says so)
                wait_until(
                    lambda qmp=qmp, m=m: qmp.execute("query-block-jobs") or _completed_in_log(m),
                    30,
                    "the resumed job",
                )
                if qmp.execute("query-block-jobs"):
                    seen_resumed += 1
                else:
                    done = _completed_in_log(m)
            first = False
            kill_at = time.monotonic() + rnd.uniform(0.2, 0.8) if kills < 3 else None
            while done is None:
                for job in qmp.execute("query-block-jobs"):
                    assert job["device"] == "backup" and job["type"] == "commit", job
                    run[0], run[1] = max(run[0], job["len"]), job["offset"]
                ev = [e for e in qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"]
                if ev:
                    done = ev[0]["data"]
                    break
                if kill_at is not None and time.monotonic() >= kill_at:
                    break
                time.sleep(0.02)
            if done is not None:
                assert "error" not in done, done
                run[0], run[1] = max(run[0], done["len"]), done["offset"]
                break
            kill9(m)
            kills += 1
            w.stop(expect_error=True)
            qmp.close()
            m.cleanup()
            settle_pending_write(flat(c.active), model, w.pending)
            check_images(c.existing(), allow_leaks=True)
            assert len(_pending(c.active)) == 1
            m, notes = _mount_noting(mounter, c.active)
            assert len(notes) == 1 and "backup" in notes[0], notes
            assert read_file(m.disk, direct=True) == model
            qmp = SyncQMP(m.socket)
            w = Writer(m.disk, model, seed=seed + kills).start()
            if "had finished; its record is removed" in notes[0]:
                # killed after its top left the chain, before its record was removed
                run[1] = run[0]
                break
            assert "resuming" in notes[0] and "resuming" in m.log(), notes
        w.stop()
        qmp.close()
    assert kills >= 1 and seen_resumed >= 1, (kills, seen_resumed)
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(c.active) == model
    assert chain_files(c.active) == ["active.qcow2", "base.qcow2"]
    assert _pending(c.active) == []
    check_images([c.base, c.active], allow_leaks=True)
    data = runs[0][0]
    copied = sum(r[1] for r in runs)
    # only the chunk in flight at each kill is copied twice (the restartable mode)
    assert copied <= data + kills * CHUNK, (copied, data, kills, runs)


def test_no_resume_read_only_and_cancel(tmp_path, mounter):
    """An interrupted offline commit: `info` shows it; `--read-only` and `--no-resume`
    mounts say so and leave it (nothing on disk changes); a resumed job that is cancelled
    removes the record; `qemu-img check` is clean at every point."""
    c = build_live_chain(tmp_path / "img", size=32 * M)
    v0 = flat(c.active)
    _run_script(
        offline_script(c.active, tmp_path / "p", kill_after=2 * M, mode="restartable", speed=4 * M),
        expect_kill=True,
    )
    check_images(c.images, allow_leaks=True)
    for p in c.images:  # leaks after a kill -9 are allowed
        run_qcowfs("check", "--repair", p, check=False)
    check_images(c.images)
    (rec,) = _pending(c.active)
    assert rec["mode"] == "restartable" and rec["job-id"] == "commit"
    assert rec["speed"] == 4 * M  # the resumed job keeps the speed limit
    assert os.path.samefile(rec["top"], c.images[2]) and os.path.samefile(rec["base"], c.base)
    cp = run_qcowfs("info", c.active)
    assert "pending commit" in cp.stdout
    before = {p: Path(p).read_bytes() for p in c.existing()}
    for args, word in ((["--read-only"], "read-only"), (["--no-resume"], "--no-resume")):
        m, notes = _mount_noting(mounter, c.active, *args)
        assert len(notes) == 1 and word in notes[0], notes
        with SyncQMP(m.socket) as qmp:
            assert qmp.execute("query-block-jobs") == []
        assert read_file(m.disk) == v0
        m.unmount()
        if args == ["--read-only"]:
            assert {p: Path(p).read_bytes() for p in c.existing()} == before
    assert len(_pending(c.active)) == 1
    check_images(c.existing())
    m, notes = _mount_noting(mounter, c.active)
    assert len(notes) == 1 and "resuming" in notes[0]
    with SyncQMP(m.socket) as qmp:
        wait_until(lambda: qmp.execute("query-block-jobs"), 30, "the resumed job")
        qmp.execute("block-job-cancel", {"device": "commit", "force": True})
        qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
    m.unmount()
    assert _pending(c.active) == []
    assert flat(c.active) == v0
    check_images(c.existing())
    m, notes = _mount_noting(mounter, c.active)
    assert notes == []
    m.unmount()


def _small_chain(d):
    """base <- mid <- top <- active, a little data in each intermediate (case 3 and 4
    clusters, a zero cluster, mid shorter than top): every barrier of a restartable
    commit of top into base, in a few dozen."""
    d.mkdir(parents=True)
    base = create(str(d / "base.qcow2"), 4 * M)
    apply_ops(base, [("w", 0, 4 * M, 0x11)])
    mid = create(str(d / "mid.qcow2"), 3 * M, backing="base.qcow2")
    apply_ops(mid, [("w", 64 * K, 128 * K, 0x22), ("z", M, 64 * K)])
    top = create(str(d / "top.qcow2"), 4 * M, backing="mid.qcow2")
    apply_ops(top, [("w", 128 * K, 128 * K, 0x33), ("w", 2 * M, 64 * K, 0x34)])
    active = create(str(d / "active.qcow2"), 4 * M, backing="top.qcow2")
    apply_ops(active, [("w", 0, 4 * K, 0x41)])
    return Chain(d, [base, mid, top, active], top, base)


@pytest.mark.slow
def test_power_cut_at_every_barrier_then_mount_resumes(tmp_path, mounter):
    """An offline restartable commit with a power cut at the k-th flush barrier of any image
    (writes since each file's last barrier lost, or a random part of them kept): the
    next mount reads the same view, resumes the commit if its record survived, and ends
    with the reduced chain, every image free of corruption."""
    pristine = _small_chain(tmp_path / "pristine")
    v0 = flat(pristine.active)
    count_file = tmp_path / "count"
    barriers = _count_barriers(pristine, tmp_path, count_file, "powercut", "restartable")
    assert barriers >= 5
    failures = []
    resumed = 0
    points = range(1, barriers + 1)  # every barrier of the run
    for k in points:
        d = tmp_path / f"crash{k}"
        shutil.copytree(pristine.directory, d)
        active = str(d / "active.qcow2")
        _run_script(
            crash_script(
                active, tmp_path / f"p{k}", k, "powercut", k, count_file, mode="restartable"
            ),
            expect_kill=True,
        )
        try:
            pending = _pending_fast(active)
            m, notes = _mount_noting(mounter, active)
            assert len(notes) == len(pending), (notes, pending)
            with SyncQMP(m.socket) as qmp:
                if pending:
                    resumed += 1
                    assert "resuming" in notes[0] or "finished" in notes[0], notes
                    wait_until(
                        lambda: (
                            not qmp.execute("query-block-jobs")
                            and len(qmp.execute("query-named-block-nodes")) == 2
                        ),
                        60,
                        "the resumed commit to finish",
                    )
                assert read_file(m.disk, direct=True) == v0
            m.unmount()
            assert flat(active) == v0
            if pending:
                assert chain_files(active) == ["active.qcow2", "base.qcow2"]
            assert _pending_fast(active) == []
            check_images([str(p) for p in d.glob("*.qcow2")], allow_leaks=True)
        except AssertionError as e:
            failures.append(
                f"power cut at barrier {k}/{barriers}: "
                f"{(str(e).splitlines() or [repr(e)])[0][:300]}"
            )
        finally:
            mounter.cleanup()
    assert not failures, "\n".join(failures)
    assert resumed >= len(points) // 2, (resumed, points)


def test_mount_cli_has_no_resume():
    cp = subprocess.run(
        [sys.executable, "-m", "fusefs", "mount", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--no-resume" in cp.stdout


def test_simple_commit_resumes_from_scratch(tmp_path, mounter):
    """A simple-mode commit killed midway: the mount resumes it from the start (len is
    the whole range again), it finishes, the record is gone and the chain reduced."""
    c = build_live_chain(tmp_path / "img", size=32 * M)
    v0 = flat(c.active)
    _run_script(
        offline_script(c.active, tmp_path / "p", kill_after=2 * M, mode="simple", speed=8 * M),
        expect_kill=True,
    )
    (rec,) = _pending(c.active)
    assert rec["mode"] == "simple"
    first_len = int((tmp_path / "p").read_text().split()[-1])
    m, notes = _mount_noting(mounter, c.active)
    assert len(notes) == 1 and "resuming" in notes[0] and "simple" in notes[0], notes
    with SyncQMP(m.socket) as qmp:
        wait_until(lambda: _completed_in_log(m), 60, "the resumed commit")
        assert node_files(qmp.execute("query-named-block-nodes")) == ["active.qcow2", "base.qcow2"]
    done = _completed_in_log(m)
    assert done["device"] == "commit" and done["len"] == first_len, (done, first_len)
    assert read_file(m.disk, direct=True) == v0
    m.unmount()
    assert flat(c.active) == v0 and _pending(c.active) == []
    check_images([c.base, c.active], allow_leaks=True)
