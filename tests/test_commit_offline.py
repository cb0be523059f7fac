"""Offline commit: `commit.engine.run_offline` and `qcowfs commit IMAGE`.

Every chain is built with qemu-img/qemu-io, and judged with qemu-img: the guest view
(`qemu-img convert -O raw` of the active image) must be the same before, during (after
an interruption) and after a commit; `qemu-img check` must stay clean; QEMU's own
`qemu-img commit` of a copy of the chain is a second oracle.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu_helpers import (
    apply_ops,
    convert_raw,
    create,
    qemu_img,
    qemu_info_chain,
    sha256_tree,
)
from test_commit_support import (
    BUILDERS,
    Chain,
    K,
    M,
    assert_clean,
    build,
    chain_files,
    chain_names,
    check_images,
    commit_cli,
    crash_script,
    flat,
    offline_script,
    qemu_reference_commit,
)

from commit.engine import run_offline
from qcow.chain import open_chain
from qcow.errors import QcowError

REPO = Path(__file__).resolve().parent.parent


LATE = 576 * K  # of the scenario's 640 KiB: after top's data past 2M was copied


def _env():
    """The environment of the child processes: the repository importable."""
    extra = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + ([extra] if extra else [])))


def _run_script(script, expect_kill):
    """Run an offline_script or crash_script in a child process; it must die of SIGKILL
    (expect_kill True) or exit 0 (False), or either (None)."""
    cp = subprocess.run(
        [sys.executable, "-c", script],
        cwd=str(REPO),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if expect_kill is None:
        pass
    elif expect_kill:
        assert cp.returncode == -signal.SIGKILL, (cp.returncode, cp.stderr[-2000:])
    else:
        assert cp.returncode == 0, cp.stderr[-2000:]
    return cp


def _count_barriers(pristine, tmp_path, count_file, how, mode):
    """The number of flush barriers a commit of a copy of `pristine` passes (crash_script's
    counting run: crash_at 0 never crashes)."""
    probe = tmp_path / "probe"
    shutil.copytree(pristine.directory, probe)
    _run_script(
        crash_script(probe / "active.qcow2", tmp_path / "p0", 0, how, 0, count_file, mode=mode),
        expect_kill=False,
    )
    return int(count_file.read_text())


class Interrupt(Exception):
    pass


def interrupt_after(nbytes):
    """A progress callback that stops the commit once `nbytes` have been copied."""
    seen = []

    def progress(offset, length):
        seen.append((offset, length))
        if offset >= nbytes:
            raise Interrupt(offset)

    progress.seen = seen
    return progress


# ---- the 2012 design discussion, step by step ---------------------------------------------


@pytest.mark.parametrize("mode", ["simple", "restartable"])
def test_design_discussion_scenario(tmp_path, mode):
    """base[1M] <- mid[2M] <- top[3M] <- active[3M]: commit top into base, interrupted
    twice (the second time after data past mid's end reached the grown base), then
    commit mid into base, then the full commit. The guest view never changes."""
    c = build("scenario", tmp_path / "img")
    base, mid, top, active = c.images
    v0 = flat(active)
    assert v0[M : 2 * M] != bytes(M) and v0[2 * M :] != bytes(M)
    assert_clean(c)

    def after_step(expected_chain):
        assert flat(active) == v0
        assert_clean(c)
        assert chain_files(active) == expected_chain

    # 1. top into base, stopped early: the chain is unchanged, base has grown to 3M
    with pytest.raises(Interrupt):
        run_offline(
            active, top=top, base=base, mode=mode, speed=4 * M, progress=interrupt_after(64 * K)
        )
    after_step(["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"])
    assert chain_names(active)[-1][2] == 3 * M, "base was not grown to top's size"

    # 1b. again, stopped late: base now holds top's data past mid's end (the design
    # discussion's question: base has data past 2M under the 2M mid). (Restartable mode
    # would have drained mid and dropped it from the chain by then.)
    if mode == "simple":
        with pytest.raises(Interrupt):
            run_offline(active, top=top, base=base, mode=mode, progress=interrupt_after(LATE))
        after_step(["active.qcow2", "top.qcow2", "mid.qcow2", "base.qcow2"])
        base_view = convert_raw(base)
        past = slice(2 * M + 4 * K, 2 * M + 16 * K)  # top's data (active's ends at +4K)
        assert base_view[past] == v0[past], (
            "the interrupted run did not get past 2M; the scenario is not exercised"
        )

    # 2. mid into base (mid is shorter than top: top must keep reading zeros past 2M)
    run_offline(active, top=mid, base=base, mode=mode, delete=True)
    assert not os.path.exists(mid)
    after_step(["active.qcow2", "top.qcow2", "base.qcow2"])
    assert chain_names(active)[1][1] == "base.qcow2"

    # 3. the full commit (defaults: top = active's backing file, base = the bottom)
    run_offline(active, mode=mode, delete=True)
    assert not os.path.exists(top)
    after_step(["active.qcow2", "base.qcow2"])
    info = qemu_info_chain(active)
    assert info[0]["backing-filename"] == "base.qcow2"  # relative stays relative
    assert info[0]["backing-filename-format"] == "qcow2"
    assert info[1]["virtual-size"] == 3 * M


def test_offline_speed_limit(tmp_path):
    """--speed limits the bytes copied into base per second."""
    c = build("scenario", tmp_path / "img")
    v0 = flat(c.active)
    seen = []
    t0 = time.monotonic()
    run_offline(c.active, speed=256 * K, progress=lambda o, n: seen.append((o, n)))
    elapsed = time.monotonic() - t0
    copied = seen[-1][0]
    assert copied >= 512 * K
    assert elapsed >= 0.8 * (copied - 64 * K) / (256 * K), (elapsed, copied)
    assert flat(c.active) == v0


def test_design_discussion_scenario_cli_interrupted(tmp_path):
    """The same story through `qcowfs commit IMAGE`: a rate-limited commit interrupted
    by SIGINT exits non-zero without a traceback and changes no guest byte; then the
    commits of mid and of the rest."""
    c = build("scenario", tmp_path / "img")
    base, mid, top, active = c.images
    v0 = flat(active)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fusefs",
            "commit",
            active,
            "--top",
            top,
            "--base",
            base,
            "--speed",
            str(64 * K),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert flat(active) == v0
    assert_clean(c)
    assert len(chain_names(active)) == 4

    cp = commit_cli(active, "--top", "mid.qcow2", "--base", base, "--delete")
    assert cp.returncode == 0, cp.stderr
    assert flat(active) == v0
    cp = commit_cli(active)
    assert cp.returncode == 0, cp.stderr
    assert flat(active) == v0
    assert chain_files(active) == ["active.qcow2", "base.qcow2"]
    check_images([base, active, top])


# ---- QEMU as a second oracle ----------------------------------------------------------------

ORACLE_CASES = list(BUILDERS)


@pytest.mark.parametrize("mode", ["simple", "restartable"])
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_commit_matches_qemu_img_commit(tmp_path, case, mode):
    ours = build(case, tmp_path / "ours")
    ref = build(case, tmp_path / "qemu")
    v0 = flat(ours.active)
    assert flat(ref.active) == v0, "the builder is not deterministic"
    top_size = chain_names(ours.top)[0][2]
    overlay_name = chain_names(ours.overlay)[0][1]
    above = [os.path.basename(p) for p in ours.images[ours.images.index(ours.top) + 1 :]]

    qemu_view, qemu_base = qemu_reference_commit(ref)

    dropped, _stranded = run_offline(ours.active, top=ours.top, base=ours.base, mode=mode)
    assert sorted(dropped) == sorted(
        ours.images[ours.images.index(ours.base) + 1 : ours.images.index(ours.top) + 1]
    )
    ours_view = flat(ours.active)
    assert ours_view == v0, "our commit changed the guest view"
    assert ours_view == qemu_view, "our guest view differs from QEMU's"
    ours_base = (
        convert_raw(ours.base) if ours.base.endswith(".qcow2") else Path(ours.base).read_bytes()
    )
    assert ours_base[:top_size] == qemu_base[:top_size], "base differs from QEMU's base"
    assert len(ours_base) == len(qemu_base)
    # the chain is reduced: what was above top, then base; relative names stay relative
    names = chain_names(ours.active)
    assert [n for n, _b, _s in names] == above[::-1] + [os.path.basename(ours.base)]
    new_name = names[len(above) - 1][1]
    assert os.path.isabs(new_name) == os.path.isabs(overlay_name), (overlay_name, new_name)
    assert_clean(ours)


def test_commit_into_an_empty_base(tmp_path):
    """Minimal repro: the first multi-cluster write into a fresh base allocates an L2
    table past the end of the file; the next cluster of the same write must not take
    that (cached, not yet written) table for a corrupt L1 entry (EIO)."""
    c = build("empty_base", tmp_path / "img")
    v0 = flat(c.active)
    run_offline(c.active)
    assert flat(c.active) == v0
    assert_clean(c)


# ---- short layers (QEMU iotest 274, and a short top) ---------------------------------------


def _chain_274(d, with_active):
    d.mkdir(parents=True, exist_ok=True)
    base = create(str(d / "base.qcow2"), 2 * M)
    mid = create(str(d / "mid.qcow2"), M, backing="base.qcow2")
    top = create(str(d / "top.qcow2"), 2 * M, backing="mid.qcow2")
    apply_ops(base, [("w", 0, 2 * M, 0x01)])
    images = [base, mid, top]
    if with_active:
        images.append(create(str(d / "active.qcow2"), 2 * M, backing="top.qcow2"))
    return Chain(d, images, mid, base)


@pytest.mark.parametrize("mode", ["simple", "restartable"])
def test_iotest274_commit_short_mid(tmp_path, mode):
    """base 2M of 0x01 <- mid 1M <- top 2M; commit mid into base: top still reads zeros
    on [1M, 2M), and so does base (QEMU 7.2's commit of a short top-node leaks 0x01)."""
    c = _chain_274(tmp_path / "img", with_active=False)
    base, mid, top = c.images
    v0 = flat(top)
    assert v0 == b"\x01" * M + bytes(M)
    run_offline(top, top=mid, base=base, mode=mode)
    assert flat(top) == v0
    assert convert_raw(base) == v0
    assert chain_files(top) == ["top.qcow2", "base.qcow2"]
    assert_clean(c)
    # QEMU's whole-chain commit of a copy agrees with us
    ref = _chain_274(tmp_path / "qemu", with_active=False)
    from qemu_helpers import qemu_img

    qemu_img("commit", "-q", "-b", ref.base, ref.active)
    assert convert_raw(ref.base) == v0


@pytest.mark.parametrize("mode", ["simple", "restartable"])
def test_iotest274_commit_top_over_short_mid(tmp_path, mode):
    """base 2M of 0x01 <- mid 1M <- top 2M <- active 2M; commit top (and mid) into base:
    base reads zeros on [1M, 2M) afterwards."""
    c = _chain_274(tmp_path / "img", with_active=True)
    base, mid, top, active = c.images
    apply_ops(top, [("w", 1536 * K, 4 * K, 0x0C)])
    v0 = flat(active)
    assert v0[:M] == b"\x01" * M and v0[M : 1536 * K] == bytes(512 * K)
    run_offline(active, top=top, base=base, mode=mode)
    assert flat(active) == v0
    assert convert_raw(base) == v0
    assert chain_files(active) == ["active.qcow2", "base.qcow2"]
    assert_clean(c)


@pytest.mark.parametrize("mode", ["simple", "restartable"])
def test_short_top_under_longer_overlay_zeroes_base(tmp_path, mode):
    """top (1M) shorter than its overlay (3M), base (4M) longer: after the commit base
    reads zeros over [len(top), min(len(overlay), len(base))) = [1M, 3M) and keeps its
    data past the overlay's end."""
    d = tmp_path / "img"
    d.mkdir()
    base = create(str(d / "base.qcow2"), 4 * M)
    apply_ops(base, [("w", 0, 4 * M, 0x01)])
    top = create(str(d / "top.qcow2"), M, backing="base.qcow2")
    apply_ops(top, [("w", 64 * K, 64 * K, 0x02)])
    active = create(str(d / "active.qcow2"), 3 * M, backing="top.qcow2")
    apply_ops(active, [("w", 2 * M, 4 * K, 0x03)])
    c = Chain(d, [base, top, active], top, base)
    v0 = flat(active)
    assert v0[M : 2 * M] == bytes(M)
    run_offline(active, top=top, base=base, mode=mode)
    assert flat(active) == v0
    b = convert_raw(base)
    assert len(b) == 4 * M
    assert b[:M] == v0[:M]
    assert b[M : 3 * M] == bytes(2 * M)
    assert b[3 * M :] == b"\x01" * M
    assert_clean(c)


# ---- restartable mode: killed at random points, restarted --------------------------------


def _restartable_chain(d):
    """~12 MiB of data in the range over a 32 MiB disk, spread over mid and top, with
    overlaps (case 3) and top-only data (case 4)."""
    d.mkdir(parents=True, exist_ok=True)
    size = 32 * M
    base = create(str(d / "base.qcow2"), size)
    apply_ops(base, [("w", 0, 16 * M, 0x0B)])
    mid = create(str(d / "mid.qcow2"), size, backing="base.qcow2")
    ops = [("w", o * M, M, ("rand", f"mid{o}")) for o in range(0, 24, 3)]
    ops += [("w", 26 * M + 3 * K, 200 * K, "mid-tail"), ("z", 2 * M, M)]
    apply_ops(mid, ops)
    top = create(str(d / "top.qcow2"), size, backing="mid.qcow2")
    ops = [("w", o * M + 512 * K, M, ("rand", f"top{o}")) for o in range(0, 24, 4)]
    ops += [("w", 30 * M, 2 * M, "top-end"), ("z", 9 * M, 64 * K)]
    apply_ops(top, ops)
    active = create(str(d / "active.qcow2"), size, backing="top.qcow2")
    apply_ops(active, [("w", 5 * M, 64 * K, 0x41)])
    return Chain(d, [base, mid, top, active], top, base)


def _progress_runs(path):
    """[(lines)] per run: each run starts with 'start'; lines are (offset, len) or 'done'."""
    runs = []
    for line in Path(path).read_text().splitlines():
        if line == "start":
            runs.append([])
        elif line == "done":
            runs[-1].append("done")
        elif line.strip():
            o, n = line.split()
            runs[-1].append((int(o), int(n)))
    return runs


def test_restartable_kill9_loses_only_the_chunk_in_flight(tmp_path):
    """Deterministic: the process SIGKILLs itself in the progress callback, right after
    3 MiB were reported copied (the moment a rate-limited driver sleeps, where a kill
    usually lands). Nothing was in flight then, so the restart has exactly what was not
    reported to copy: a copy reported done must already be durable in base *and*
    forgotten by the drained layer (flush and unallocate before the step is yielded)."""
    c = _restartable_chain(tmp_path / "img")
    base, mid, top, active = c.images
    v0 = flat(active)
    progress_file = tmp_path / "progress"
    script = offline_script(
        active, progress_file, kill_after=3 * M, top=top, base=base, mode="restartable"
    )
    _run_script(script, expect_kill=True)
    assert flat(active) == v0
    check_images(c.existing(), allow_leaks=True)
    first = _progress_runs(progress_file)[0]
    data, copied = first[0][1], first[-1][0]
    assert copied >= 3 * M
    script = offline_script(active, progress_file, top=top, base=base, mode="restartable")
    _run_script(script, expect_kill=False)
    second = _progress_runs(progress_file)[1]
    assert second[-1] == "done"
    left = second[0][1]
    assert flat(active) == v0
    assert left <= data - copied, (
        f"after a kill -9 at {copied} of {data} bytes (nothing in flight) the restart "
        f"has {left} bytes to copy: {left - (data - copied)} bytes reported copied are "
        f"copied again"
    )


def test_simple_kill9_then_restart_starts_over(tmp_path):
    """Simple mode keeps no progress: killed midway, the chain still reads right and a
    new run copies everything again (QEMU's behaviour)."""
    c = _restartable_chain(tmp_path / "img")
    v0 = flat(c.active)
    progress_file = tmp_path / "progress"
    _run_script(offline_script(c.active, progress_file, kill_after=3 * M), expect_kill=True)
    assert flat(c.active) == v0
    assert len(chain_names(c.active)) == 4
    check_images(c.existing(), allow_leaks=True)
    _run_script(offline_script(c.active, progress_file), expect_kill=False)
    first, second = _progress_runs(progress_file)
    assert second[-1] == "done" and second[0][1] == first[0][1]
    assert flat(c.active) == v0
    assert chain_files(c.active) == ["active.qcow2", "base.qcow2"]
    check_images([c.base, c.active], allow_leaks=True)


def test_restartable_restart_after_drop_is_not_refused(tmp_path):
    """Killed after mid was drained and left the chain: the same command run again
    (no --force) finishes. mid.qcow2 is then an empty image naming base.qcow2: the
    commit's own leftover, not someone else's chain to protect."""
    c = _restartable_chain(tmp_path / "img")
    base, mid, top, active = c.images
    v0 = flat(active)
    script = offline_script(active, tmp_path / "progress", kill_after=10 * M, mode="restartable")
    _run_script(script, expect_kill=True)
    assert chain_files(active) == ["active.qcow2", "top.qcow2", "base.qcow2"]
    assert flat(active) == v0
    cp = commit_cli(active, "--mode", "restartable")
    assert cp.returncode == 0, cp.stderr
    assert flat(active) == v0
    assert chain_files(active) == ["active.qcow2", "base.qcow2"]


def _wait_for_reports(progress_file, nruns, proc, timeout=30):
    """Until run number `nruns` has reported its first progress (its len)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(progress_file):
            runs = _progress_runs(progress_file)
            if len(runs) >= nruns and runs[nruns - 1]:
                return
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_restartable_killed_and_restarted(tmp_path, seed):
    rnd = random.Random(seed)
    c = _restartable_chain(tmp_path / "img")
    base, mid, top, active = c.images
    v0 = flat(active)
    progress_file = tmp_path / "progress"
    speed = 8 * M
    kills = 0
    for attempt in range(12):
        script = offline_script(
            active, progress_file, top=top, base=base, mode="restartable", speed=speed
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=str(REPO),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if attempt < 3:
            # kill at a random point of the copy (not during start-up)
            _wait_for_reports(progress_file, attempt + 1, proc)
            time.sleep(rnd.uniform(0.05, 0.8))
        killed = proc.poll() is None and attempt < 3
        if killed:
            proc.kill()
            kills += 1
        out, err = proc.communicate(timeout=120)
        runs = _progress_runs(progress_file)
        committed = chain_files(active) == ["active.qcow2", "base.qcow2"]
        if committed or (runs and runs[-1] and runs[-1][-1] == "done"):
            # a kill may land after the commit's end (top dropped), before the process exits
            assert proc.returncode == 0 or (killed and proc.returncode == -signal.SIGKILL), err
            break
        assert proc.returncode == -signal.SIGKILL, err
        # after every crash: same guest view, no corruption (leaks are allowed)
        assert flat(active) == v0
        check_images(c.existing(), allow_leaks=True)
    else:
        pytest.fail("the commit never finished")
    assert kills >= 1
    assert flat(active) == v0
    assert chain_files(active) == ["active.qcow2", "base.qcow2"]
    check_images([base, active], allow_leaks=True)
    runs = _progress_runs(progress_file)
    data = runs[0][0][1]
    assert data >= 10 * M, runs[0][:3]
    copied = []
    for run in runs:
        reports = [r for r in run if r != "done"]
        copied.append(reports[-1][0] if reports else 0)
    chunk = 1 << 20
    total = sum(copied)
    assert total <= data * 1.05 + kills * chunk, (
        f"restarts copied {total} bytes for {data} bytes of data "
        f"(per run: {copied}, lens: {[r[0][1] for r in runs if r and r[0] != 'done']})"
    )
    # each restart's len is what is left: never more than the data not yet copied
    for k in range(1, len(runs)):
        if runs[k] and runs[k][0] != "done":
            left = runs[k][0][1]
            assert left <= data - sum(copied[:k]) + k * chunk, (k, left, copied)


# ---- a crash at every flush barrier ---------------------------------------------------------


def test_kill9_in_base_flush_then_rerun_leaves_no_corruption(tmp_path):
    """Minimal repro: the commit's last write into base is a zero write that needs a new
    L2 table (allocated past the end of base's file). kill -9 at the first barrier of
    base's final flush: the refcount block (written) counts the L2 cluster, the file
    does not reach it yet (a leak: fine). The rerun must not hand that cluster out as
    free (past the end of the file) on top of its leaked refcount: refcount 2 with
    QCOW_OFLAG_COPIED is a corruption for qemu-img check."""
    c = build("zeros_into_new_l2", tmp_path / "img")
    v0 = flat(c.active)
    _run_script(
        crash_script(c.active, tmp_path / "p", 1, "kill", 1, tmp_path / "n"), expect_kill=True
    )
    check_images(c.images, allow_leaks=True)
    assert flat(c.active) == v0
    _run_script(offline_script(c.active, tmp_path / "q"), expect_kill=False)
    assert flat(c.active) == v0
    check_images(c.images, allow_leaks=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "powercut"])
@pytest.mark.parametrize("mode", ["simple", "restartable"])
@pytest.mark.parametrize("case", ["scenario", "zeros_into_new_l2"])
def test_crash_at_every_barrier(tmp_path, case, mode, how):
    """The scenario chain (base <- mid <- top with all four allocation cases), committed
    offline with a crash at the k-th flush barrier (fdatasync) of any image, for every
    k: SIGKILL (everything written stays), or a power cut (what each file got since its
    last barrier is lost, or a random part of it kept). After the crash the chain the
    headers describe reads as before and has no corruption; the same command run again
    finishes, with the same view."""
    pristine = build(case, tmp_path / "pristine")
    v0 = flat(pristine.active)
    count_file = tmp_path / "count"
    barriers = _count_barriers(pristine, tmp_path, count_file, how, mode)
    assert barriers >= 5
    failures = []
    for k in range(1, barriers + 1):
        d = tmp_path / f"crash{k}"
        shutil.copytree(pristine.directory, d)
        active = d / "active.qcow2"
        _run_script(
            crash_script(active, tmp_path / f"p{k}", k, how, k, count_file, mode=mode),
            expect_kill=True,
        )
        images = [str(p) for p in sorted(d.glob("*.qcow2"))]
        try:
            check_images(images, allow_leaks=True)
            assert flat(str(active)) == v0, "the guest view changed"
            # the same command again, unless the crash came after the overlay was
            # rewritten (nothing left to commit)
            if len(chain_names(str(active))) > 2:
                cp = _run_script(
                    offline_script(active, tmp_path / f"q{k}", mode=mode), expect_kill=None
                )
                assert cp.returncode == 0, cp.stderr.strip().splitlines()[-1]
            assert flat(str(active)) == v0, "the guest view changed after the restart"
            assert chain_files(str(active)) == ["active.qcow2", "base.qcow2"]
            check_images(images, allow_leaks=True)
        except AssertionError as e:
            failures.append(
                f"crash at barrier {k}/{barriers}: {(str(e).splitlines() or [repr(e)])[0][:300]}"
            )
    assert not failures, "\n".join(failures)


# ---- errors: one line, non-zero exit, nothing modified ---------------------------------------


def _assert_refused(cp, directory, before, *words, lines_expected=1):
    assert cp.returncode != 0, cp
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(lines) == lines_expected, cp.stderr
    assert lines[0].startswith("qcowfs: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert sha256_tree(directory) == before, "a refused commit modified an image"


def _error_chain(tmp_path):
    return build("scenario", tmp_path / "img")


def test_cli_refuses_base_not_below_top(tmp_path):
    c = _error_chain(tmp_path)
    before = sha256_tree(c.directory)
    cp = commit_cli(c.active, "--top", "mid.qcow2", "--base", c.images[2])
    _assert_refused(cp, c.directory, before, "top.qcow2")
    cp = commit_cli(c.active, "--top", "top.qcow2", "--base", "top.qcow2")
    _assert_refused(cp, c.directory, before, "top.qcow2")


def test_cli_refuses_restartable_with_read_only_intermediate(tmp_path):
    c = _error_chain(tmp_path)
    mid = c.images[1]
    os.chmod(mid, 0o444)
    before = sha256_tree(c.directory)
    cp = commit_cli(c.active, "--mode", "restartable")
    _assert_refused(cp, c.directory, before, "mid.qcow2")
    # simple mode does not write into mid: it is allowed
    cp = commit_cli(c.active)
    assert cp.returncode == 0, cp.stderr


def test_cli_refuses_single_image(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    img = create(str(d / "single.qcow2"), M)
    apply_ops(img, [("w", 0, 64 * K, 0x11)])
    before = sha256_tree(d)
    cp = commit_cli(img)
    _assert_refused(cp, d, before, "single.qcow2")


def test_cli_refuses_unknown_names(tmp_path):
    c = _error_chain(tmp_path)
    before = sha256_tree(c.directory)
    cp = commit_cli(c.active, "--top", "nosuch.qcow2")
    _assert_refused(cp, c.directory, before, "nosuch.qcow2")
    cp = commit_cli(c.active, "--base", "nosuch.qcow2")
    _assert_refused(cp, c.directory, before, "nosuch.qcow2")
    cp = commit_cli(str(c.directory / "nosuch.qcow2"))
    _assert_refused(cp, c.directory, before, "nosuch.qcow2")


def test_cli_rerun_after_a_finished_commit_says_it_is_done(tmp_path):
    """`--top top.qcow2` again after that commit finished: top is a leftover of it, and
    the refusal says where its data went instead of only that it is no image of the
    chain."""
    c = _error_chain(tmp_path)
    base, mid, top, active = c.images
    assert commit_cli(active, "--top", "top.qcow2").returncode == 0
    assert chain_files(active) == ["active.qcow2", "base.qcow2"]
    before = sha256_tree(c.directory)
    cp = commit_cli(active, "--top", "top.qcow2")
    _assert_refused(cp, c.directory, before, "top.qcow2", "already", "base.qcow2", "leftover")
    cp = commit_cli(active, "--top", os.path.abspath(mid))
    _assert_refused(cp, c.directory, before, "mid.qcow2", "already", "base.qcow2")
    assert base


def test_cli_refuses_to_grow_a_v2_base_with_snapshots(tmp_path):
    """A commit into a smaller base grows it first; a v2 base with internal snapshots
    cannot grow (its snapshots do not record their disk size: none could be reverted to
    afterwards). Refused up front, as QEMU refuses the resize, with nothing modified and
    the snapshot still revertible."""
    d = tmp_path / "img"
    d.mkdir()
    base = create(str(d / "base.qcow2"), 8 * M, compat="0.10")
    apply_ops(base, [("w", 0, 4 * M, 0x11)])
    qemu_img("snapshot", "-c", "s1", base)
    mid = create(str(d / "mid.qcow2"), 12 * M, backing="base.qcow2")
    top = create(str(d / "top.qcow2"), 12 * M, backing="mid.qcow2")
    apply_ops(mid, [("w", 10 * M, M, 0x22)])
    before = sha256_tree(d)
    for args in ((top,), (top, "--active"), (top, "--top", "mid.qcow2", "--mode", "restartable")):
        cp = commit_cli(*args)
        _assert_refused(cp, d, before, "base.qcow2", "smaller", "v2", "snapshots", "amend")
    qemu_img("snapshot", "-a", "s1", base)  # still revertible
    assert convert_raw(base)[: 4 * M] == b"\x11" * (4 * M)


def test_backing_names_through_a_symlinked_directory_resolve_as_the_kernel_does(tmp_path):
    """`link -> real/sub`, and link/active.qcow2 names `../base.qcow2`: the kernel (and so
    QEMU) finds real/base.qcow2, not the decoy beside `link` that collapsing `link/..` as
    text gives. The chain reads as qemu-img reads it, and a commit through the link
    writes a backing name that still leads to base (from the real directory)."""
    d = tmp_path / "img"
    (d / "real" / "sub").mkdir(parents=True)
    base = create(str(d / "real" / "base.qcow2"), 4 * M)
    apply_ops(base, [("w", 0, M, 0xAA)])
    decoy = create(str(d / "base.qcow2"), 4 * M)
    apply_ops(decoy, [("w", 0, M, 0x55)])
    create(str(d / "real" / "sub" / "top.qcow2"), 4 * M, backing="../base.qcow2")
    apply_ops(str(d / "real" / "sub" / "top.qcow2"), [("w", M, M, 0x33)])
    create(str(d / "real" / "sub" / "active.qcow2"), 4 * M, backing="top.qcow2")
    (d / "link").symlink_to("real/sub")
    active = str(d / "link" / "active.qcow2")
    want = convert_raw(active)
    assert want[:4] == b"\xaa" * 4
    with open_chain(active) as chain:
        assert chain.read(0, chain.virtual_size) == want
        assert os.path.samefile(chain.layers[-1].path, base)
    assert commit_cli(active).returncode == 0
    chain = qemu_info_chain(active)
    assert [os.path.realpath(i["filename"]) for i in chain] == [
        os.path.realpath(active),
        os.path.realpath(base),
    ]
    assert convert_raw(active) == want
    assert convert_raw(decoy)[:4] == b"\x55" * 4


def test_cli_refuses_two_image_chain(tmp_path):
    """active <- base offline: the default top (active's backing file) is the bottom of
    the chain; nothing to commit without a mount (--active)."""
    d = tmp_path / "img"
    d.mkdir()
    base = create(str(d / "base.qcow2"), M)
    two = create(str(d / "two.qcow2"), M, backing="base.qcow2")
    apply_ops(two, [("w", 0, 4 * K, 0x22)])
    before = sha256_tree(d)
    cp = commit_cli(two)
    _assert_refused(cp, d, before, "base.qcow2")
    assert base


def test_cli_guard_refusal(tmp_path):
    """Another image depends on base (outside the chain): the stranding guard refuses,
    nothing changed. Its first line names the file and the problem; then one line per
    stranded image (the guard's own format: the contract's "one line" is stretched)."""
    c = _error_chain(tmp_path)
    other = create(str(c.directory / "other.qcow2"), M, backing="base.qcow2")
    before = sha256_tree(c.directory)
    cp = commit_cli(c.active)
    _assert_refused(cp, c.directory, before, "base.qcow2", "--force", lines_expected=2)
    assert cp.stderr.strip().splitlines()[1].startswith(other + ": ")


@pytest.mark.parametrize(
    "kw,word",
    [
        (dict(top="mid.qcow2", base="top.qcow2"), "top.qcow2"),
        (dict(top="nosuch.qcow2"), "nosuch.qcow2"),
        (dict(mode="restartable", top="active.qcow2"), "active"),
        (dict(mode="bogus"), "bogus"),
    ],
)
def test_run_offline_refusals_change_nothing(tmp_path, kw, word):
    c = _error_chain(tmp_path)
    before = sha256_tree(c.directory)
    with pytest.raises(QcowError) as e:
        run_offline(c.active, **kw)
    assert word in str(e.value) and "\n" not in str(e.value)
    assert sha256_tree(c.directory) == before


def test_run_offline_refuses_read_only_intermediate_in_restartable_mode(tmp_path):
    c = _error_chain(tmp_path)
    os.chmod(c.images[1], 0o444)
    before = sha256_tree(c.directory)
    with pytest.raises(QcowError) as e:
        run_offline(c.active, mode="restartable")
    assert "mid.qcow2" in str(e.value)
    assert sha256_tree(c.directory) == before
