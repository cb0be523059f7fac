"""Guest I/O and a commit job at the same moment, over layouts off the happy path.

Each case mounts a chain, runs a guest on disk.raw (O_DIRECT 4 KiB random reads and
writes with some large reads, plus a buffered writer; every read checked against a
model while the job runs) and a commit job in every mode (simple, restartable, active
with pivot). A hang becomes a failure with the daemon's thread dump: a guest request
in flight over a minute, `query-block-jobs` slower than 1 s, or a job that does not end.
The daemons run with the lock-order checker on (scripts/test.sh sets QCOWFS_LOCKDEP),
and the mount fixture fails a test whose daemon reported an inversion.

The layouts are those that make a commit write partial clusters of base or walk the
unusual paths: base clusters larger than the upper layers', extended L2 with subcluster
writes, short layers, compressed clusters, 512-byte clusters.
"""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest
from mount_fixtures import read_file
from qemu_helpers import apply_ops, create, run_qcowfs
from stress_support import GuestLoad, HangWatch, dump_daemon, scattered_chain
from test_commit_support import SyncQMP, check_images, flat

K, M = 1 << 10, 1 << 20
SIZE = 32 * M
JOB_LIMIT = 180.0


def _scatter(rnd, count, size, length, align, pattern, end=None):
    end = end or size
    return [
        ("w", rnd.randrange(0, (end - length) // align) * align, length, pattern + i % 7)
        for i in range(count)
    ]


def base64k_under_4k(d, rnd):
    base = create(str(d / "base.qcow2"), SIZE, cluster_size=64 * K)
    apply_ops(base, [("w", 0, 24 * M, 0x11)])
    mid = create(str(d / "mid.qcow2"), SIZE, backing="base.qcow2", cluster_size=4 * K)
    apply_ops(mid, _scatter(rnd, 400, SIZE, 4 * K, 4 * K, 0x20))
    top = create(str(d / "top.qcow2"), SIZE, backing="mid.qcow2", cluster_size=4 * K)
    apply_ops(top, _scatter(rnd, 400, SIZE, 4 * K, 4 * K, 0x30))
    return [base, mid, top]


def base2m_under_64k(d, rnd):
    base = create(str(d / "base.qcow2"), SIZE, cluster_size=2 * M)
    apply_ops(base, [("w", 0, 20 * M, 0x12)])
    mid = create(str(d / "mid.qcow2"), SIZE, backing="base.qcow2")
    apply_ops(
        mid,
        _scatter(rnd, 80, SIZE, 64 * K, 64 * K, 0x20) + _scatter(rnd, 40, SIZE, 4 * K, 512, 0x28),
    )
    top = create(str(d / "top.qcow2"), SIZE, backing="mid.qcow2")
    apply_ops(top, _scatter(rnd, 80, SIZE, 64 * K, 64 * K, 0x30))
    return [base, mid, top]


def extended_l2(d, rnd):
    base = create(str(d / "base.qcow2"), SIZE, cluster_size=64 * K, extended_l2="on")
    apply_ops(base, [("w", 0, 16 * M, 0x13)] + _scatter(rnd, 50, SIZE, 2 * K, 2 * K, 0x18))
    mid = create(
        str(d / "mid.qcow2"), SIZE, backing="base.qcow2", cluster_size=64 * K, extended_l2="on"
    )
    apply_ops(
        mid,
        _scatter(rnd, 300, SIZE, 2 * K, 2 * K, 0x20)
        + [("z", o, 2 * K) for o in range(M, 2 * M, 128 * K)],
    )
    top = create(
        str(d / "top.qcow2"), SIZE, backing="mid.qcow2", cluster_size=32 * K, extended_l2="on"
    )
    apply_ops(top, _scatter(rnd, 300, SIZE, 1 * K, 1 * K, 0x30))
    return [base, mid, top]


def short_layers(d, rnd):
    """base 32M <- mid 8M (short intermediate) <- top 16M (short top) <- active 32M."""
    base = create(str(d / "base.qcow2"), SIZE)
    apply_ops(base, [("w", 0, SIZE, 0x14)])
    mid = create(str(d / "mid.qcow2"), 8 * M, backing="base.qcow2")
    apply_ops(mid, _scatter(rnd, 60, 8 * M, 16 * K, 4 * K, 0x20))
    top = create(str(d / "top.qcow2"), 16 * M, backing="mid.qcow2")
    apply_ops(
        top, _scatter(rnd, 60, 16 * M, 16 * K, 4 * K, 0x30) + [("w", 16 * M - 6 * K, 6 * K, 0x3F)]
    )
    return [base, mid, top]


def compressed(d, rnd):
    base = create(str(d / "base.qcow2"), SIZE)
    apply_ops(base, [("w", 0, 16 * M, 0x15)])
    mid = create(str(d / "mid.qcow2"), SIZE, backing="base.qcow2", compression_type="zstd")
    apply_ops(mid, [("c", o, 64 * K, 0x20 + o // M % 7) for o in range(0, SIZE, 512 * K)])
    top = create(str(d / "top.qcow2"), SIZE, backing="mid.qcow2")
    apply_ops(
        top,
        [("c", o, 128 * K, 0x30) for o in range(256 * K, SIZE, 2 * M)]
        + _scatter(rnd, 60, SIZE, 3 * K, 512, 0x38),
    )
    return [base, mid, top]


def clusters_512(d, rnd):
    base = create(str(d / "base.qcow2"), SIZE)
    apply_ops(base, [("w", 0, 8 * M, 0x16)])
    mid = create(str(d / "mid.qcow2"), SIZE, backing="base.qcow2", cluster_size=512)
    apply_ops(mid, _scatter(rnd, 300, SIZE, 1536, 512, 0x20))
    top = create(str(d / "top.qcow2"), SIZE, backing="mid.qcow2", cluster_size=512)
    apply_ops(top, _scatter(rnd, 300, SIZE, 4 * K, 512, 0x30))
    return [base, mid, top]


LAYOUTS = {
    "base64k-under-4k": base64k_under_4k,
    "base2m-under-64k": base2m_under_64k,
    "extended-l2": extended_l2,
    "short-layers": short_layers,
    "compressed": compressed,
    "clusters-512": clusters_512,
}
MODES = ["simple", "restartable", "active"]


def _build(d, layout):
    rnd = random.Random(layout)
    base, mid, top = LAYOUTS[layout](d, rnd)
    active = create(str(d / "active.qcow2"), SIZE, backing="top.qcow2")
    apply_ops(active, [("w", 5 * M, 64 * K, 0x41), ("w", SIZE - 8 * K, 8 * K, 0x42)])
    return [base, mid, top, active]


def _wait_job(qmp, watch, event, job_id, limit=JOB_LIMIT):
    """Wait for EVENT of JOB_ID, failing with the daemon's stacks on a hang."""
    deadline = time.monotonic() + limit
    while True:
        assert watch.failure is None, watch.failure
        try:
            return qmp.wait_event(
                event, timeout=0.5, pred=lambda data: data.get("device") == job_id
            )
        except AssertionError:
            if time.monotonic() > deadline:
                watch.fail(f"job {job_id} did not reach {event} within {limit:.0f} s")
                raise AssertionError(watch.failure) from None


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_commit_under_guest_load(tmp_path, mounter, layout, mode):
    images = _build(tmp_path, layout)
    base, active = images[0], images[-1]
    model = bytearray(flat(active))
    m = mounter(active)
    load = GuestLoad(m.disk, model, seed=hash((layout, mode)) & 0xFFFF)
    watch = HangWatch(m, lambda: SyncQMP(m.socket), load)
    try:
        with SyncQMP(m.socket) as qmp:
            load.start()
            watch.start()
            time.sleep(0.5)
            args = {"job-id": "j", "speed": 16 * M, "base": "base.qcow2"}
            if mode == "active":
                args["top"] = active
            else:
                args["top"] = "top.qcow2"
                args["x-mode"] = mode
            qmp.execute("block-commit", args)
            if mode == "active":
                _wait_job(qmp, watch, "BLOCK_JOB_READY", "j")
                time.sleep(0.5)  # stays in sync under the load
                qmp.execute("block-job-complete", {"device": "j"})
            done = _wait_job(qmp, watch, "BLOCK_JOB_COMPLETED", "j")["data"]
            assert "error" not in done, done
            time.sleep(0.5)  # the guest goes on after the job
            counts = load.stop()
            watch.stop()
            assert watch.failure is None, watch.failure
            assert watch.queries > 5 and watch.max_query < 1.0, watch.max_query
            assert counts["reads"] > 20 and counts["writes"] > 20, counts
            nodes = [os.path.basename(n["file"]) for n in qmp.execute("query-named-block-nodes")]
            assert nodes == (["base.qcow2"] if mode == "active" else ["active.qcow2", "base.qcow2"])
        assert read_file(m.disk, direct=True) == model
        m.unmount()
    finally:
        load.stop_flag.set()
        watch.stop()
    final = base if mode == "active" else active
    assert flat(final) == model
    check_images(images)


@pytest.mark.slow
def test_issue_reproduction_fio_randread_during_commit(tmp_path, mounter):
    """The report: base with 64 KiB clusters (192 MiB written), an overlay with 4 KiB
    clusters holding 6,000 scattered 4 KiB writes, an empty active overlay; fio 4 KiB
    O_DIRECT random reads with 4 jobs on disk.raw while `qcowfs commit MNT --top
    top.qcow2 --wait` runs. It used to deadlock (chain lock vs base's lock)."""
    base, _top, active = scattered_chain(tmp_path, 256 * M, 192 * M, 6000, seed=6000)
    model = flat(active)
    m = mounter(active)
    fio = subprocess.Popen(
        [
            "fio",
            "--name=rr",
            f"--filename={m.disk}",
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--numjobs=4",
            "--ioengine=psync",
            "--time_based",
            "--runtime=300",
            "--group_reporting",
            "--output-format=terse",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)
        assert fio.poll() is None, fio.communicate()
        try:
            cp = run_qcowfs(
                "commit",
                str(m.mountpoint),
                "--top",
                "top.qcow2",
                "--wait",
                "--control-socket",
                str(m.socket),
                timeout=JOB_LIMIT,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError("the commit hung under fio\n" + dump_daemon(m)) from None
        assert cp.returncode == 0, (cp.stderr, m.log()[-4000:])
        assert fio.poll() is None, "fio stopped during the commit"
    finally:
        fio.terminate()  # fio's exit status after SIGTERM is not 0
        out, err = fio.communicate(timeout=60)
    assert b"error" not in err.lower() and b"error" not in out.lower(), (out, err)
    assert read_file(m.disk, direct=True) == model
    m.unmount()
    assert flat(active) == model
    check_images([base, active])
