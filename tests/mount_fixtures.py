"""Fixtures and helpers for tests that go through a real FUSE mount (test_mount*.py).

`mounter` mounts with the real CLI (``python -m fusefs mount``) and guarantees that
nothing outlives the test, whatever happens in it: the finalizer lazily unmounts
(``fusermount3 -u -z``) whatever is still mounted and kill -9s any daemon still alive.
Each mount gets its own control socket, log and pid file in the test's tmp directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import qemu_helpers

from fusefs.daemon import pid_alive  # noqa: F401 (the tests' too)
from fusefs.mountrecord import remove_record

M = 1 << 20


def mounted_fstype(path) -> str | None:
    """File system type mounted at PATH (from /proc/self/mountinfo), or None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mp = fields[4].encode().decode("unicode_escape")
            if mp == target:
                found = fields[sep + 1]
    return found


def wait_until(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def daemons_for(mountpoint) -> list[int]:
    """Pids of processes whose command line mentions MOUNTPOINT (our daemons)."""
    target = os.fsencode(os.path.realpath(mountpoint))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"fusefs" in argv and target in argv and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


class Mount:
    """One mount made through the CLI."""

    def __init__(self, image, mountpoint: Path, socket: Path, name="disk.raw"):
        self.image = str(image)
        self.mountpoint = Path(mountpoint)
        self.socket = socket
        self.name = name
        self.proc = None  # the Popen of a --foreground run
        self.stderr_file = None  # and where its stderr goes

    @property
    def disk(self) -> Path:
        return self.mountpoint / self.name

    @property
    def log_file(self) -> Path:
        return self.socket.with_suffix(".log")

    @property
    def pid_file(self) -> Path:
        return self.socket.with_suffix(".pid")

    def daemon_pid(self) -> int:
        return int(self.pid_file.read_text())

    def log(self) -> str:
        try:
            return self.log_file.read_text()
        except OSError:
            return "(no log)"

    def is_mounted(self) -> bool:
        return mounted_fstype(self.mountpoint) is not None

    def cli(self, verb, *args, timeout=120) -> subprocess.CompletedProcess:
        """`qcowfs VERB MOUNTPOINT --control-socket SOCKET ARGS` (output captured)."""
        return qemu_helpers.run_qcowfs(
            verb, str(self.mountpoint), "--control-socket", str(self.socket), *args, timeout=timeout
        )

    def unmount(self, *extra) -> subprocess.CompletedProcess:
        """`qcowfs unmount`; asserts it worked and the daemon is gone."""
        cp = self.cli("unmount", *extra)
        assert cp.returncode == 0, (cp.stderr, self.log())
        assert not self.is_mounted()
        assert not daemons_for(self.mountpoint), self.log()
        return cp

    def wait_gone(self, timeout=30.0):
        """Wait for the daemon to exit and the mount to disappear."""
        wait_until(lambda: not daemons_for(self.mountpoint), timeout, "daemon exit")
        wait_until(lambda: not self.is_mounted(), timeout, "unmount")

    def cleanup(self):
        if self.is_mounted():
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for pid in daemons_for(self.mountpoint):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in daemons_for(self.mountpoint):
            wait_until(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to die")
        # a killed daemon leaves its mount record behind (fusefs/mountrecord.py)
        remove_record(os.path.realpath(self.mountpoint))


class Mounter:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.mounts: list[Mount] = []
        self._n = 0

    def _new(self, image, mountpoint, name):
        self._n += 1
        if mountpoint is None:
            mountpoint = self.tmp / f"mnt{self._n}"
            mountpoint.mkdir()
        m = Mount(image, Path(mountpoint), self.tmp / f"ctl{self._n}.sock", name)
        self.mounts.append(m)
        return m

    def __call__(self, image, *args, mountpoint=None, name="disk.raw") -> Mount:
        """Mount IMAGE in the background (the way a user does); assert success."""
        m = self._new(image, mountpoint, name)
        cp = self.run(m, *args)
        assert cp.returncode == 0, (cp.stderr, m.log())
        assert cp.stderr == "", cp.stderr
        assert m.disk.stat().st_size > 0
        return m

    def run(self, m: Mount, *args) -> subprocess.CompletedProcess:
        extra = [] if m.name == "disk.raw" else ["--name", m.name]
        return qemu_helpers.run_qcowfs(
            "mount", m.image, str(m.mountpoint), "--control-socket", str(m.socket), *extra, *args
        )

    def attempt(self, image, *args, mountpoint=None) -> tuple[Mount, subprocess.CompletedProcess]:
        """Try to mount (expected to fail); the Mount is cleaned up all the same."""
        m = self._new(image, mountpoint, "disk.raw")
        return m, self.run(m, *args)

    def foreground(self, image, *args, mountpoint=None) -> Mount:
        """Run `mount --foreground` as a child process; returns once the file answers."""
        m = self._new(image, mountpoint, "disk.raw")
        m.stderr_file = self.tmp / f"fg{self._n}.stderr"
        with open(m.stderr_file, "w") as err:  # a file: a full pipe would block it
            m.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fusefs",
                    "mount",
                    m.image,
                    str(m.mountpoint),
                    "--foreground",
                    "--control-socket",
                    str(m.socket),
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

        def up():
            assert m.proc.poll() is None, m.stderr_file.read_text()
            return m.is_mounted() and m.disk.exists()

        wait_until(up, 30, "the foreground mount")
        return m

    def cleanup(self):
        for m in self.mounts:
            m.cleanup()
        # the daemons run with the lock-order checker on (scripts/test.sh): an inversion
        # it saw fails the test even when the timing never produced the deadlock
        for m in self.mounts:
            for path in (m.log_file, m.stderr_file):
                text = path.read_text(errors="replace") if path and path.exists() else ""
                if "LOCKDEP:" in text:
                    raise AssertionError(
                        f"lock order inversion in the daemon of "
                        f"{m.mountpoint}:\n{text[text.index('LOCKDEP:') :]}"
                    )


@pytest.fixture
def mounter(tmp_path):
    """`mounter(image, *args) -> Mount`; everything is unmounted and killed afterwards."""
    mt = Mounter(tmp_path)
    try:
        yield mt
    finally:
        mt.cleanup()


# ---- helpers ---------------------------------------------------------------------------


def read_file(path, direct=False, chunk=M) -> bytes:
    """The whole file, with O_DIRECT (aligned buffer) or through the page cache."""
    if not direct:
        with open(path, "rb") as f:
            return f.read()
    import mmap

    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, chunk)
        out = bytearray()
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            out += buf[:n]
            off += n
        return bytes(out)
    finally:
        os.close(fd)


def check_clean(image) -> dict:
    """`qemu-img check` of every qcow2 layer of IMAGE's chain: no errors, no leaks."""
    reports = {}
    for layer in qemu_helpers.qemu_info_chain(image):
        if layer["format"] != "qcow2":
            continue
        rc, rep = qemu_helpers.qemu_check(layer["filename"])
        assert rc == 0, (layer["filename"], rc, rep)
        assert (
            not rep.get("check-errors") and not rep.get("leaks") and not rep.get("corruptions")
        ), rep
        reports[layer["filename"]] = rep
    return reports


def file_hashes(directory) -> dict[str, str]:
    return qemu_helpers.sha256_tree(directory)


def make_chain(d: Path, size=64 * M, cluster=65536) -> str:
    """D/images/: base (patterned data in the first half) <- top (some overwrites).
    Returns top's path."""
    d = Path(d) / "images"
    d.mkdir(exist_ok=True)
    base, top = d / "base.qcow2", d / "top.qcow2"
    qemu_helpers.qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(base), str(size)
    )
    qemu_helpers.qemu_io(str(base), f"write -P 0x5a 0 {size // 2}")
    qemu_helpers.qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"cluster_size={cluster}",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        str(top),
    )
    qemu_helpers.qemu_io(
        str(top), f"write -P 0xa5 {size // 4} {size // 8}", f"write -z {size // 16} {size // 32}"
    )
    return str(top)


def make_chain3(d: Path, size=64 * M) -> str:
    """D/images/: base <- mid (16 MiB of data to commit) <- top. Returns top's path."""
    d = Path(d) / "images"
    d.mkdir(exist_ok=True)
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    qemu_helpers.qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
    qemu_helpers.qemu_io(str(base), f"write -P 0x11 0 {size // 2}")
    qemu_helpers.qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid)
    )
    qemu_helpers.qemu_io(str(mid), f"write -P 0x22 {size // 8} {16 * M}")
    qemu_helpers.qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    qemu_helpers.qemu_io(str(top), f"write -P 0x33 {size // 4} {M}")
    return str(top)
