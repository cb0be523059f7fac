"""Hostile and careless folders: the files the root daemon writes (pid, log,
control socket) are never reached through a symlink or taken from someone else, and
the stranding guard's scan never blocks on a FIFO or a file of /proc and never leaves
the file systems it was asked to search. Plus the flat file's own small faults:
O_TRUNC, its mode under --allow-other.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import time

import pytest
from mount_fixtures import daemons_for, make_chain3, read_file, wait_until
from qemu_helpers import convert_raw, create, qemu_info_chain, run_qcowfs
from test_commit_support import SyncQMP
from test_qmp_support import Raw

from fusefs.daemonfiles import LogHandler, RepeatFilter

M = 1 << 20
SECRET = b"root-only secret\n"


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    os.chmod(path, 0o600)
    return path


def _one_line(cp, *words):
    lines = cp.stderr.strip().splitlines()
    assert cp.returncode != 0 and len(lines) == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("which", ["pid", "log", "sock"])
def test_symlink_at_a_daemon_file_is_refused(tmp_path, mounter, secret, which):
    """A user's symlink at DIR/m.pid, DIR/m.log or DIR/m.sock, pointing at a root-only
    file: the mount is refused with one line naming the path, and the file is neither
    truncated, nor appended to, nor chmod'ed."""
    top = make_chain3(tmp_path)
    m = mounter._new(top, None, "disk.raw")
    planted = {"pid": m.pid_file, "log": m.log_file, "sock": m.socket}[which]
    os.symlink(secret, planted)
    before = os.stat(secret)
    cp = mounter.run(m)
    _one_line(cp, str(planted))
    assert not m.is_mounted()
    assert secret.read_bytes() == SECRET
    after = os.stat(secret)
    assert stat.S_IMODE(after.st_mode) == 0o600 and after.st_mtime_ns == before.st_mtime_ns
    assert os.path.islink(planted)  # left as it was


def test_daemon_files_are_private_and_a_stale_pid_file_is_replaced(tmp_path, mounter):
    """A pid file left by a killed daemon of ours is replaced; an old 0644 log is made
    0600; pid file and log are 0600 while mounted; the pid file goes at unmount."""
    top = make_chain3(tmp_path)
    m = mounter._new(top, None, "disk.raw")
    m.pid_file.write_text("999999\n")
    m.log_file.write_text("an old log\n")
    os.chmod(m.log_file, 0o644)
    cp = mounter.run(m)
    assert cp.returncode == 0, (cp.stderr, m.log())
    for path in (m.pid_file, m.log_file):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.lstat(m.socket).st_mode) == 0o600
    assert int(m.pid_file.read_text()) != 999999
    assert m.log().startswith("an old log\n")
    m.unmount()
    assert not m.pid_file.exists()


def test_pid_file_of_someone_else_is_refused(tmp_path, mounter):
    top = make_chain3(tmp_path)
    m = mounter._new(top, None, "disk.raw")
    m.pid_file.write_text("1\n")
    os.chown(m.pid_file, 65534, 65534)
    cp = mounter.run(m)
    _one_line(cp, str(m.pid_file), "belongs to uid 65534")
    assert m.pid_file.read_text() == "1\n"
    assert not m.is_mounted()


def test_log_rotates_and_repeats_are_rate_limited(tmp_path):
    """The log moves aside past its size bound (one old log kept, both 0600), and one
    message repeated thousands of times is written a few times, then counted."""
    path = tmp_path / "d.log"
    handler = LogHandler(str(path))
    handler.maxBytes = 4096
    handler.addFilter(RepeatFilter())
    logger = logging.getLogger("qcowfs.test-rotation")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(5000):
            logger.warning("job event %s %s", "JOB_STATUS_CHANGE", i)
        for i in range(200):
            logger.warning(f"line {i} of distinct text " + "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    old = tmp_path / "d.log.1"
    assert old.exists() and not (tmp_path / "d.log.2").exists()
    text = path.read_text() + old.read_text()
    assert text.count("job event") <= RepeatFilter.BURST
    assert path.stat().st_size <= 4096 + 200 and old.stat().st_size <= 4096 + 200
    for p in (path, old):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


@pytest.mark.slow
def test_pause_resume_spam_does_not_flood_the_log(tmp_path, mounter):
    """Thousands of pause/resume commands on a running job: the log keeps a bounded
    number of their lines and says how many it suppressed."""
    top = make_chain3(tmp_path)
    m = mounter(top)
    with SyncQMP(m.socket) as qmp:
        qmp.execute("block-commit", {"job-id": "j", "top": "mid.qcow2", "speed": 1})
        for _ in range(600):
            qmp.execute("block-job-pause", {"device": "j"})
            qmp.execute("block-job-resume", {"device": "j"})
        time.sleep(RepeatFilter.WINDOW + 0.5)
        qmp.execute("block-job-pause", {"device": "j"})  # opens a new window: the count
        qmp.execute("block-job-cancel", {"device": "j", "force": True})
        qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
    log = m.log()
    assert log.count("job event") < 200, len(log)
    assert "more like it suppressed" in log
    m.unmount()


# ---------------------------------------------------------------- the guard's scan


def _commit_wait(m, *args, timeout=60):
    return run_qcowfs(
        "commit",
        str(m.mountpoint),
        "--control-socket",
        str(m.socket),
        "--top",
        "mid.qcow2",
        "--wait",
        *args,
        timeout=timeout,
    )


def test_guard_scan_skips_fifos_and_blocking_files(tmp_path, mounter):
    """A FIFO, a symlink to it and a symlink to /proc/kmsg (whose read blocks) in the
    chain's folder: the commit is answered and runs to the end."""
    top = make_chain3(tmp_path)
    d = os.path.dirname(top)
    os.mkfifo(os.path.join(d, "pipe.qcow2"))
    os.symlink("pipe.qcow2", os.path.join(d, "pipe-link.qcow2"))
    os.symlink("/proc/kmsg", os.path.join(d, "kmsg.qcow2"))
    want = convert_raw(top)
    m = mounter(top)
    cp = _commit_wait(m, "--guard-dir", d)
    assert cp.returncode == 0, (cp.stderr, m.log())
    assert read_file(m.disk) == want
    m.unmount()
    assert [os.path.basename(x["filename"]) for x in qemu_info_chain(top)] == [
        "top.qcow2",
        "base.qcow2",
    ]


def test_guard_scan_time_is_bounded(tmp_path, monkeypatch):
    """A scan past its time bound stops with an error naming what it searched."""
    from commit import guard
    from qcow.errors import JobError

    top = make_chain3(tmp_path)
    d = os.path.dirname(top)
    chain = [os.path.join(d, n) for n in ("top.qcow2", "mid.qcow2", "base.qcow2")]
    monkeypatch.setattr(guard, "SCAN_SECONDS", 0.0)
    with pytest.raises(JobError, match=f"stranding guard: scanning {d} took more than 0 s"):
        guard.guard_commit(chain, 2, 1, "simple", [d], False)


def test_unmount_while_block_commit_scans_a_hung_folder(tmp_path, mounter):
    """block-commit's guard scan hangs in a folder whose file system does not answer
    (another FUSE mount, its daemon stopped): the command stays cancellable, so
    `qcowfs unmount` still ends the mount cleanly, without waiting for the scan."""
    import signal

    top = make_chain3(tmp_path)
    m = mounter(top)
    other = str(tmp_path / "other.qcow2")
    create(other, M)
    hung = mounter(other)
    pid = hung.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        client = Raw(m.socket)
        try:
            client.send(
                b'{"execute":"qmp_capabilities"}\n{"execute":"block-commit","arguments":'
                b'{"top":"mid.qcow2","x-guard-dirs":["' + str(hung.mountpoint).encode() + b'"]}}\n'
            )
            time.sleep(1.0)
            m.unmount()  # asserts: exit 0, unmounted, daemon gone
        finally:
            client.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    # The stopped daemon's own clean exit is not what this test is about (after a
    # SIGSTOP with a request pending it sometimes stays silent for a while): end it.
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not daemons_for(hung.mountpoint), 30, "the stopped daemon's end")
    assert [os.path.basename(x["filename"]) for x in qemu_info_chain(top)] == [
        "top.qcow2",
        "mid.qcow2",
        "base.qcow2",
    ]


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mounted inside the test's folder (unmounted even on failure)."""
    mnt = tmp_path / "guard" / "other-fs"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_guard_walk_stays_on_its_file_system_unless_named(tmp_path, mounter, tmpfs):
    """A clone of base (which the commit changes) on another file system mounted
    below a guard directory is not searched (the walk stays on the guard directory's
    file system, as it must for --guard-dir /, which holds /proc, /sys and /dev); named
    itself, it is found and the commit refused."""
    top = make_chain3(tmp_path)
    base = os.path.join(os.path.dirname(top), "base.qcow2")
    clone = str(tmpfs / "clone.qcow2")
    create(clone, 64 * M, backing=base)
    m = mounter(top)
    named = _commit_wait(m, "--guard-dir", str(tmpfs))
    assert named.returncode != 0 and clone in named.stderr, named.stderr
    assert "Traceback" not in named.stderr
    cp = _commit_wait(m, "--guard-dir", str(tmpfs.parent))
    assert cp.returncode == 0, (cp.stderr, m.log())
    m.unmount()


# ---------------------------------------------------------------- the flat file


def test_open_with_o_trunc_is_refused_like_truncate(tmp_path, mounter):
    top = make_chain3(tmp_path)
    want = convert_raw(top)
    m = mounter(top)
    with pytest.raises(OSError) as e:
        os.open(m.disk, os.O_WRONLY | os.O_TRUNC)
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.truncate(m.disk, 0)
    assert e.value.errno == errno.EPERM
    assert os.stat(m.disk).st_size == len(want)
    assert read_file(m.disk) == want
    m.unmount()


@pytest.mark.parametrize(
    "mode, read_only, shown", [(0o600, False, 0o600), (0o640, False, 0o640), (0o644, True, 0o444)]
)
def test_flat_file_takes_the_top_image_mode(tmp_path, mounter, mode, read_only, shown):
    """Under --allow-other every user reaches the mount: disk.raw is no more open than
    the top image (0600 stays 0600), without write bits on a read-only mount."""
    top = make_chain3(tmp_path)
    os.chmod(top, mode)
    m = mounter(top, "--allow-other", *(["--read-only"] if read_only else []))
    assert stat.S_IMODE(os.stat(m.disk).st_mode) == shown
    m.unmount()
