"""Mounts that must not happen: one clear line, non-zero exit, nothing left behind."""

import os
import shutil
import signal
import subprocess
import time

import pytest
from mount_fixtures import (
    M,
    daemons_for,
    file_hashes,
    make_chain,  # noqa: F401
    mounted_fstype,
    wait_until,
)
from qemu_helpers import HDR_CLUSTER_BITS, patch


def _assert_refused(m, cp, *words):
    assert cp.returncode != 0
    assert cp.stdout == ""
    assert cp.stderr.startswith("qcowfs: ") and cp.stderr.count("\n") == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    for w in words:
        assert w in cp.stderr, cp.stderr
    if m.mountpoint.is_dir():
        assert mounted_fstype(m.mountpoint) is None
    assert not daemons_for(m.mountpoint)


def test_missing_mountpoint(tmp_path, mounter):
    m, cp = mounter.attempt(make_chain(tmp_path, size=4 * M), mountpoint=tmp_path / "nowhere")
    _assert_refused(m, cp, "nowhere", "does not exist")


def test_mountpoint_not_a_directory(tmp_path, mounter):
    f = tmp_path / "file"
    f.write_text("x")
    m, cp = mounter.attempt(make_chain(tmp_path, size=4 * M), mountpoint=f)
    _assert_refused(m, cp, "not a directory")


def test_mountpoint_already_mounted(tmp_path, mounter):
    top = make_chain(tmp_path, size=4 * M)
    first = mounter(top, "--read-only")
    m, cp = mounter.attempt(top, "--read-only", mountpoint=first.mountpoint)
    assert cp.returncode != 0 and "already mounted" in cp.stderr, cp.stderr
    assert cp.stderr.count("\n") == 1
    assert first.disk.stat().st_size == 4 * M  # the first mount is untouched
    first.unmount()


def test_raw_image_refused(tmp_path, mounter):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * M)
    m, cp = mounter.attempt(raw)
    _assert_refused(m, cp, str(raw), "raw")


def test_missing_image(tmp_path, mounter):
    m, cp = mounter.attempt(tmp_path / "nothing.qcow2")
    _assert_refused(m, cp, "nothing.qcow2", "no such file")


def test_corrupt_image_refused_and_untouched(tmp_path, mounter):
    top = make_chain(tmp_path, size=4 * M)
    patch(top, HDR_CLUSTER_BITS, "I", 40)
    before = file_hashes(tmp_path / "images")
    m, cp = mounter.attempt(top)
    _assert_refused(m, cp, "top.qcow2")
    assert file_hashes(tmp_path / "images") == before


def test_missing_backing_file(tmp_path, mounter):
    top = make_chain(tmp_path, size=4 * M)
    os.unlink(tmp_path / "images" / "base.qcow2")
    m, cp = mounter.attempt(top)
    _assert_refused(m, cp, "base.qcow2")


@pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon not installed"
)
@pytest.mark.parametrize("which", ["top", "base"])
def test_image_locked_by_qemu_storage_daemon(tmp_path, mounter, which):
    """QSD holds the chain read-write (top) or writes to the base: we must refuse."""
    top = make_chain(tmp_path, size=4 * M)
    target = top if which == "top" else str(tmp_path / "images" / "base.qcow2")
    qsd = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f,filename={target}",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        assert qsd.poll() is None, qsd.communicate()
        wait_until(
            lambda: (
                subprocess.run(["qemu-img", "info", target], capture_output=True).returncode != 0
            ),
            10,
            "QSD to lock the image",
        )
        m, cp = mounter.attempt(top)
        _assert_refused(m, cp, os.path.basename(target), "lock")
    finally:
        qsd.send_signal(signal.SIGTERM)
        qsd.wait(timeout=30)


def test_foreground_errors_are_one_line_too(tmp_path, mounter):
    top = make_chain(tmp_path, size=4 * M)
    m, cp = mounter.attempt(top, "--foreground", mountpoint=tmp_path / "nowhere")
    _assert_refused(m, cp, "does not exist")
    raw = tmp_path / "flat.raw"
    raw.write_bytes(b"\0" * M)
    m, cp = mounter.attempt(raw, "--foreground")
    _assert_refused(m, cp, "raw")
