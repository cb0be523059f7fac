"""How a mount ends: every clean way leaves clean images; kill -9 loses nothing fsync'd."""

import os
import signal
import subprocess
import time

import pytest
import qemu_helpers
from mount_fixtures import (
    M,
    check_clean,
    daemons_for,
    make_chain,  # noqa: F401
    read_file,
    wait_until,
)
from qemu_helpers import convert_raw, qemu_check, qemu_img, rand_bytes, run_qcowfs


def _write_fsynced(m, off, data):
    fd = os.open(m.disk, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _dirty_some(tmp_path, m):
    """Writes (fsync'd, and one not) spread over fresh and existing clusters."""
    expected = bytearray(convert_raw(m.image, share=True))
    for i, off in enumerate((0, 5 * M + 4096, 17 * M, 30 * M - 512)):
        data = rand_bytes(i, off, 300000)
        _write_fsynced(m, off, data)
        expected[off : off + len(data)] = data
    with open(m.disk, "r+b") as f:  # written and closed, never fsync'd
        f.seek(40 * M)
        f.write(b"\x77" * 65536)
    expected[40 * M : 40 * M + 65536] = b"\x77" * 65536
    return expected


def _assert_clean_end(m, expected):
    assert not m.is_mounted()
    assert not daemons_for(m.mountpoint), m.log()
    check_clean(m.image)
    assert qemu_img("info", m.image).returncode == 0  # no lock left behind
    assert convert_raw(m.image) == expected
    assert "exit 0" in m.log()


def test_unmount_by_qcowfs_unmount(tmp_path, mounter):
    m = mounter(make_chain(tmp_path))
    expected = _dirty_some(tmp_path, m)
    cp = m.unmount()
    assert cp.stdout == "" and cp.stderr == ""
    _assert_clean_end(m, expected)


def test_unmount_default_control_socket(tmp_path):
    """No --control-socket: mount and unmount find the socket by the contract's rule."""
    top = make_chain(tmp_path, size=8 * M)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        cp = run_qcowfs("mount", top, mnt)
        assert cp.returncode == 0, cp.stderr
        from fusefs.qmp import default_socket_path

        sock = default_socket_path(str(mnt))
        assert os.path.exists(sock)
        assert os.path.exists(sock[: -len(".sock")] + ".log")
        cp = run_qcowfs("unmount", mnt)
        assert cp.returncode == 0, cp.stderr
        assert not os.path.exists(sock)
        assert not daemons_for(mnt)
        check_clean(top)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        for pid in daemons_for(mnt):
            os.kill(pid, signal.SIGKILL)


def test_unmount_by_fusermount(tmp_path, mounter):
    m = mounter(make_chain(tmp_path))
    expected = _dirty_some(tmp_path, m)
    subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True)
    m.wait_gone()
    _assert_clean_end(m, expected)
    assert "unmounted from outside" in m.log()


def test_unmount_by_sigterm(tmp_path, mounter):
    m = mounter(make_chain(tmp_path))
    expected = _dirty_some(tmp_path, m)
    os.kill(m.daemon_pid(), signal.SIGTERM)
    m.wait_gone()
    _assert_clean_end(m, expected)
    assert "SIGTERM received" in m.log()


def test_unmount_by_sigint_in_foreground(tmp_path, mounter):
    m = mounter.foreground(make_chain(tmp_path))
    expected = _dirty_some(tmp_path, m)
    m.proc.send_signal(signal.SIGINT)
    assert m.proc.wait(timeout=60) == 0, m.stderr_file.read_text()
    err = m.stderr_file.read_text()
    assert err == "", err  # nothing to say on a clean run (it is in the log)
    assert "SIGINT received" in m.log()
    _assert_clean_end(m, expected)


def test_unmount_not_mounted(tmp_path):
    cp = run_qcowfs("unmount", tmp_path)
    assert cp.returncode != 0
    assert cp.stderr.startswith("qcowfs: ") and cp.stderr.count("\n") == 1, cp.stderr
    assert "not mounted" in cp.stderr


def test_kill_9_after_fsync_loses_nothing(tmp_path, mounter):
    top = make_chain(tmp_path)
    m = mounter(top)
    expected = bytearray(convert_raw(top, share=True))
    for i, off in enumerate((0, 9 * M + 512, 33 * M, 63 * M)):
        data = rand_bytes(50 + i, off, 1 * M)
        _write_fsynced(m, off, data)
        expected[off : off + len(data)] = data
    os.kill(m.daemon_pid(), signal.SIGKILL)
    wait_until(lambda: not daemons_for(m.mountpoint), 30, "daemon death")
    # a dead mount is refused as a mountpoint, and `qcowfs unmount` clears it away
    cp = run_qcowfs("mount", top, m.mountpoint)
    assert cp.returncode != 0 and "dead FUSE mount" in cp.stderr, cp.stderr
    cp = run_qcowfs("unmount", m.mountpoint, "--control-socket", m.socket)
    assert cp.returncode != 0 and "daemon was gone" in cp.stderr, cp.stderr
    assert not m.is_mounted()
    for layer in (top, str(tmp_path / "images" / "base.qcow2")):
        rc, rep = qemu_check(layer)
        assert rc in (0, 3), rep  # leaks allowed after a crash, nothing else
        assert not rep.get("corruptions") and not rep.get("check-errors"), rep
    assert convert_raw(top) == expected
    # the locks died with the process: the chain mounts again and reads the same
    m2 = mounter(top)
    assert read_file(m2.disk, direct=True) == expected
    m2.unmount()


@pytest.mark.parametrize("how", ["unmount", "sigterm"])
def test_shutdown_while_io_is_in_flight(tmp_path, mounter, how):
    """A writer hammering the file while the mount is asked to stop: the daemon still
    exits 0 with clean images, and everything the writer fsync'd is there."""
    top = make_chain(tmp_path)
    m = mounter(top)
    writer = subprocess.Popen(
        [
            "fio",
            "--name=bg",
            f"--filename={m.disk}",
            "--ioengine=libaio",
            "--direct=1",
            "--rw=randwrite",
            "--bs=16k",
            "--iodepth=8",
            "--size=32M",
            "--time_based",
            "--runtime=30",
            "--fsync=16",
            "--output=/dev/null",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        time.sleep(1.5)
        assert writer.poll() is None
        if how == "unmount":
            # `qcowfs unmount` refuses while the file is open ...
            cp = run_qcowfs("unmount", m.mountpoint, "--control-socket", m.socket)
            assert cp.returncode != 0 and "busy" in cp.stderr, (cp.stderr, m.log())
            assert "(fio)" in cp.stderr, cp.stderr  # its worker process
            assert m.is_mounted()
            # ... QMP quit, what it sends otherwise, still stops the daemon mid-I/O
            from test_qmp_support import qmp_call

            qmp_call(str(m.socket), "quit")
        else:
            os.kill(m.daemon_pid(), signal.SIGTERM)
        m.wait_gone()
    finally:
        writer.kill()
        writer.wait()
    assert "exit 0" in m.log()
    check_clean(top)


@pytest.mark.parametrize("how", ["unmount", "sigterm", "fusermount"])
def test_ending_the_mount_during_a_commit_cancels_it(tmp_path, mounter, how):
    from mount_fixtures import make_chain3

    top = make_chain3(tmp_path)
    expected = convert_raw(top)
    layers = [layer["filename"] for layer in qemu_helpers.qemu_info_chain(top)]
    m = mounter(top)
    sock = ["--control-socket", str(m.socket)]
    cp = run_qcowfs("commit", m.mountpoint, "--speed", str(M), *sock)
    assert cp.returncode == 0, (cp.stderr, m.log())
    cp = run_qcowfs("jobs", m.mountpoint, "--json", *sock)
    assert cp.returncode == 0 and '"running"' in cp.stdout, (cp.stdout, cp.stderr)
    if how == "unmount":
        cp = run_qcowfs("unmount", m.mountpoint, *sock)
        assert cp.returncode != 0 and "--cancel-jobs" in cp.stderr, cp.stderr
        assert cp.stderr.count("\n") == 1
        assert m.is_mounted()  # refused: nothing happened
        assert read_file(m.disk) == expected
        m.unmount("--cancel-jobs")
    elif how == "sigterm":
        os.kill(m.daemon_pid(), signal.SIGTERM)
        m.wait_gone()
    else:
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True)
        m.wait_gone()
    log = m.log()
    assert "BLOCK_JOB_CANCELLED" in log and "exit 0" in log, log
    check_clean(top)
    assert [layer["filename"] for layer in qemu_helpers.qemu_info_chain(top)] == layers
    assert convert_raw(top) == expected
