"""QEMU-compatible image locking, shown with the real qemu-img, qemu-io and
qemu-storage-daemon.

While a chain is open for writing, the active image refuses other users that do not
pass -U, and its backing files admit readers but refuse writers; a chain that QEMU is
writing is refused with a clear ImageLockConflict.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from qemu_helpers import K, M, apply_ops, create, qemu_img, qemu_io

import qcow
from qcow.errors import ImageLockConflict


def _chain(d):
    base = create(d / "base.qcow2", 4 * M)
    apply_ops(base, [("w", 0, 64 * K, 0x11)])
    top = create(d / "top.qcow2", 4 * M, backing="base.qcow2")
    return top, base


def _lock_error(cp):
    return cp.returncode != 0 and "lock" in (cp.stderr + cp.stdout).lower()


def test_qemu_sees_our_locks(workdir):
    top, base = _chain(workdir)
    chain = qcow.open_chain(top, writable=True)
    try:
        chain.write(0, b"x" * 512)
        # the active image: no reader without -U, -U works
        cp = qemu_img("info", top, check=False)
        assert _lock_error(cp), cp
        assert 'shared "write" lock' in cp.stderr, cp.stderr
        assert qemu_img("info", "-U", top, check=False).returncode == 0
        assert qemu_io(top, "read 0 512", check=False).returncode != 0
        # a read-only backing file: readers are welcome, writers are not
        assert qemu_img("info", base, check=False).returncode == 0
        cp = qemu_io(base, "write 0 512", check=False)
        assert _lock_error(cp), cp
        cp = subprocess.run(
            ["qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", base],
            capture_output=True,
            text=True,
        )
        assert cp.returncode == 0, cp.stderr
    finally:
        chain.close()
    assert qemu_img("info", top, check=False).returncode == 0
    assert qemu_io(base, "write 0 512").returncode == 0
    assert qemu_io(top, "read -P 0x78 0 512").returncode == 0


def test_read_only_chain_admits_qemu_readers(workdir):
    top, base = _chain(workdir)
    with qcow.open_chain(top) as chain:
        chain.read(0, 4096)
        assert qemu_img("info", top, check=False).returncode == 0
        assert _lock_error(qemu_io(top, "write 0 512", check=False))
        assert _lock_error(qemu_io(base, "write 0 512", check=False))
    assert qemu_io(top, "write 0 512").returncode == 0


def test_our_own_second_writer_is_refused(workdir):
    top, base = _chain(workdir)
    with qcow.open_chain(top, writable=True):
        with pytest.raises(ImageLockConflict):
            qcow.open_chain(top, writable=True)
        with pytest.raises(ImageLockConflict):
            qcow.open_chain(top)  # reader vs. a writer that won't share
        with qcow.open_chain(top, image_locking=False) as peek:  # like -U
            peek.read(0, 512)
        with qcow.open_chain(base) as other:  # base is only read: shareable
            other.read(0, 512)
    with qcow.open_chain(top, writable=True):
        pass


@pytest.fixture
def storage_daemon():
    """Start qemu-storage-daemon on an image, read-write; always killed afterwards."""
    procs = []

    def start(path):
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            pytest.fail("qemu-storage-daemon is not installed (Debian qemu-system-common)")
        pidfile = f"{path}.qsd.pid"
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        p = subprocess.Popen(
            [
                qsd,
                "--blockdev",
                f"driver=file,node-name=f,filename={path}",
                "--blockdev",
                "driver=qcow2,node-name=q,file=f",
                "--pidfile",
                pidfile,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        # the pid file appears once start-up (opening the images) is over; probing
        # with qemu-img meanwhile would race with the daemon for the locks
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if p.poll() is not None:
                pytest.fail(f"qemu-storage-daemon exited: {p.stderr.read()}")
            if os.path.exists(pidfile):
                break
            time.sleep(0.02)
        else:
            pytest.fail("qemu-storage-daemon did not start in time")
        assert _lock_error(qemu_img("info", path, check=False)), "daemon holds no lock"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        p.stdout.close()
        p.stderr.close()


def test_chain_written_by_qemu_is_refused(workdir, storage_daemon):
    img = create(workdir / "busy.qcow2", 4 * M)
    before = open(img, "rb").read()
    storage_daemon(img)
    with pytest.raises(ImageLockConflict) as ei:
        qcow.open_chain(img, writable=True)
    msg = str(ei.value)
    assert img in msg and "lock" in msg and "\n" not in msg, msg
    with pytest.raises(ImageLockConflict):
        qcow.open_chain(img)  # QEMU does not share "write"
    with qcow.open_chain(img, image_locking=False) as chain:  # -U
        assert chain.read(0, 512) == bytes(512)
    assert open(img, "rb").read() == before  # nothing written by the attempts


def test_dirty_image_not_repaired_under_qemus_feet(workdir, storage_daemon):
    """A dirty lazy-refcounts image that QEMU holds open for writing: our writable
    open must fail on the lock *before* repairing anything (the repair writes)."""
    from qemu_helpers import patch, qcow2_layout
    from test_check import dirty_lazy_image

    img, _c = dirty_lazy_image(workdir, "busy-dirty.qcow2")
    storage_daemon(img)  # QEMU repairs and cleans it when it opens it
    inc = qcow2_layout(img)["incompatible"]
    patch(img, 72, "Q", inc | 1)  # dirty again, as if QEMU were mid-write
    before = open(img, "rb").read()
    with pytest.raises(ImageLockConflict):
        qcow.open_chain(img, writable=True)
    assert open(img, "rb").read() == before, "image modified before the lock was taken"
    from qemu_helpers import run_qcowfs

    cp = run_qcowfs("check", "--repair", img)
    assert cp.returncode == 1, cp
    assert open(img, "rb").read() == before, "check --repair wrote to a locked image"


def test_backing_file_written_by_qemu_is_refused(workdir, storage_daemon):
    top, base = _chain(workdir)
    storage_daemon(base)
    with pytest.raises(ImageLockConflict) as ei:
        qcow.open_chain(top, writable=True)
    assert base in str(ei.value)
    # the failed open released what it had taken on top
    assert qemu_img("info", top, check=False).returncode == 0


def test_cli_mount_free_commands_report_lock_conflict(workdir, storage_daemon):
    """`qcowfs check --repair` on an image QEMU is writing: one line, exit 1."""
    img = create(workdir / "busy2.qcow2", M)
    storage_daemon(img)
    from qemu_helpers import run_qcowfs

    cp = run_qcowfs("check", "--repair", img)
    assert cp.returncode == 1, cp
    assert "Traceback" not in cp.stderr
    assert img in cp.stderr and "lock" in cp.stderr.lower(), cp.stderr
