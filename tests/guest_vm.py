"""A real Linux guest under QEMU (TCG) for tests/test_guest_vm.py.

The guest is Debian's cloud kernel and a busybox initramfs whose /init is
scripts/guest/init; scripts/guest/build.sh builds both from Debian packages into
``.cache/guest`` (``QCOWFS_GUEST_DIR`` overrides). The guest's disk is an ext4 file system
that ``build_fs_chain`` spreads over a qcow2 chain built with qemu-img: each layer holds
exactly the sectors in which its generation of the file system differs from the layers
below. ``Guest`` runs QEMU with the serial console on a pipe, so the test reads the
guest's ``GUEST: ...`` lines and writes ``stop`` to it. ``Watchdog`` turns a hang into a
failure that carries the daemon's threads (Python stacks when the daemon dumps them on
SIGQUIT/SIGUSR1, kernel stacks always), its log and the guest's console.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import qemu_helpers
from qemu_helpers import REPO_ROOT, K, M, qemu_img

GUEST_DIR = Path(os.environ.get("QCOWFS_GUEST_DIR", REPO_ROOT / ".cache" / "guest"))
BUILD = REPO_ROOT / "scripts" / "guest" / "build.sh"
DISK_SIZE = 256 * M
GUEST_FILES = 16  # files the workload keeps (guest_files= on the kernel command line)
FS_BLOCK = 4096  # mkfs.ext4 would pick 1 KiB blocks for a disk this small
# Kernel messages that mean the disk failed the guest (scripts/guest/init counts the same).
IO_ERROR = re.compile(
    r"I/O error|EXT4-fs error|EXT4-fs warning|Buffer I/O|"
    r"blk_update_request|JBD2.*error"
)


def guest_image() -> tuple[Path, Path]:
    """(vmlinuz, initramfs.gz), built by scripts/guest/build.sh if not yet (a no-op when
    they are up to date). Fails, rather than skips, when they cannot be had."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run ./scripts/setup.sh (qemu-system-x86)")
    cp = subprocess.run(
        [str(BUILD)], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    if cp.returncode != 0:
        pytest.fail(f"{BUILD} failed:\n{cp.stderr}")
    return GUEST_DIR / "vmlinuz", GUEST_DIR / "initramfs.gz"


# ----------------------------------------------------------------- the file system


def content(name: str, generation: int, size: int) -> bytes:
    """File NAME's bytes at GENERATION: unique 64-byte lines, as `gen` in scripts/guest/init."""
    return b"".join(f"{f'{name} g{generation} {i}':<63}\n".encode() for i in range(size // 64))


def _host_files(generation: int, existing: list[str]) -> dict[str, int]:
    """Files (name -> size) generation G writes: six new ones, and new contents for two
    older ones (removed and written again, so freed blocks of lower layers are reused)."""
    files = {f"g{generation}-{j}": ((generation * 5 + j * 3) % 12 + 1) * 64 * K for j in range(6)}
    for name in existing[generation % 3 :: 5][:2]:
        files[name] = ((generation * 3 + len(name)) % 6 + 1) * 64 * K
    return files


def _debugfs(raw: Path, commands: list[str]):
    script = raw.with_suffix(".debugfs")
    script.write_text("".join(c + "\n" for c in commands))
    cp = subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(raw)], capture_output=True, text=True, timeout=120
    )
    errors = [
        line for line in cp.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")
    ]
    assert cp.returncode == 0 and not errors, (commands, cp.stderr)


def _write_generation(raw: Path, generation: int, manifest: dict[str, str]):
    """Generation G of the file system in RAW (debugfs, no mount): its files and
    host.sha256, the manifest of every host file the guest must find."""
    src = raw.parent / "src"
    src.mkdir(exist_ok=True)
    cmds = ["mkdir h"] if generation == 0 else ["rm host.sha256"]
    for name, size in _host_files(generation, sorted(manifest)).items():
        data = content(name, generation, size)
        (src / name).write_bytes(data)
        if name in manifest:
            cmds.append(f"rm h/{name}")
        cmds.append(f"write {src / name} h/{name}")
        manifest[name] = hashlib.sha256(data).hexdigest()
    (src / "host.sha256").write_text(
        "".join(f"{digest}  h/{name}\n" for name, digest in sorted(manifest.items()))
    )
    cmds.append(f"write {src / 'host.sha256'} host.sha256")
    _debugfs(raw, cmds)
    shutil.rmtree(src)


def build_fs_chain(d: Path, layers: list[tuple[str, str]]) -> tuple[list[Path], int]:
    """D/<name>.qcow2 for each (name, qemu-img -o options) of LAYERS, bottom first, holding
    one ext4 file system: generation G of it in the G-th layer. The bottom layer is
    ``qemu-img convert`` of generation 0; each layer above is an overlay holding only the
    sectors where its generation differs from the chain below: created over the raw
    generation, then ``qemu-img rebase``d onto the layer below (which copies exactly the
    differing sectors into it). Returns the images, bottom first, and how many files
    host.sha256 lists."""
    d.mkdir(parents=True, exist_ok=True)
    raw = d / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(DISK_SIZE)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            str(FS_BLOCK),
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(raw),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    manifest: dict[str, str] = {}
    images: list[Path] = []
    for name, opts in layers:
        image = d / f"{name}.qcow2"
        _write_generation(raw, len(images), manifest)
        if not images:
            qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", opts, raw, image)
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", raw.name, "-F", "raw", image)
            subprocess.run(
                [
                    "qemu-img",
                    "rebase",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    images[-1].name,
                    "-F",
                    "qcow2",
                    image.name,
                ],
                cwd=d,
                check=True,
                capture_output=True,
                timeout=300,
            )
        images.append(image)
    # the chain must read as the last generation, and that must be a clean file system
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", raw, images[-1])
    fsck(raw)
    raw.unlink()
    return images, len(manifest)


def fsck(raw: Path):
    cp = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, f"e2fsck -fn {raw}: exit {cp.returncode}\n{cp.stdout}{cp.stderr}"


# ---------------------------------------------------------------------------- QEMU


class Guest:
    """qemu-system-x86_64 booting the test guest on one virtio disk; the serial console is
    our pipe (every line also goes to CONSOLE_LOG)."""

    def __init__(self, drive: str, mode: str, console_log: Path, rounds: int = 1000):
        kernel, initrd = guest_image()
        self.console_log = console_log
        self.lines: list[str] = []
        self._cond = threading.Condition()
        cmdline = (
            f"console=ttyS0 panic=-1 loglevel=4 guest_mode={mode} "
            f"guest_rounds={rounds} guest_files={GUEST_FILES}"
        )
        self.argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            cmdline,
            "-drive",
            drive,
        ]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with open(self.console_log, "w") as log:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0):
        """The first console line from index START on that matches PATTERN (re.search):
        (match, index). None on timeout or when QEMU exited without printing it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                for j in range(i, len(self.lines)):
                    found = rx.search(self.lines[j])
                    if found:
                        return found, j
                i = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    return None
                self._cond.wait(min(left, 1.0))

    def send(self, line: str):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float):
        """QEMU's exit code, or None if it is still running after TIMEOUT."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def console(self, last: int = 60) -> str:
        with self._cond:
            return "\n".join(self.lines[-last:])

    def io_errors(self) -> list[str]:
        with self._cond:
            return [line for line in self.lines if IO_ERROR.search(line)]

    def complaints(self) -> list[str]:
        """The guest's own reports of a file or read that went wrong."""
        with self._cond:
            return [line for line in self.lines if line.startswith("GUEST: bad:")]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self, timeout: float) -> bool:
        """Kill QEMU if it still runs; True once it is gone (a thread blocked in a FUSE
        request the daemon never answers keeps it until the daemon dies)."""
        self.kill()
        if self.wait_exit(timeout) is None:
            return False
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        return True


def drive(path: Path, fmt: str, extra: str = "") -> str:
    """A -drive argument for the guest's virtio disk (commas in PATH escaped)."""
    file = str(path).replace(",", ",,")
    return f"file={file},format={fmt},if=virtio,discard=unmap" + (f",{extra}" if extra else "")


# ------------------------------------------------------------------------ watchdog


def _caught_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    return 0


def thread_report(pid: int) -> str:
    """Every thread of PID: name, state, kernel wait channel and kernel stack."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        base = f"/proc/{pid}/task/{tid}"
        try:
            comm = Path(base, "comm").read_text().strip()
            state = next(
                line.split(None, 1)[1].strip()
                for line in Path(base, "status").read_text().splitlines()
                if line.startswith("State:")
            )
            stack = Path(base, "stack").read_text().strip()
        except (OSError, StopIteration):
            continue
        out.append(f"thread {tid} ({comm}) {state}\n{stack}")
    return "\n".join(out)


class Watchdog:
    """Turns a wait that ran out of time into a test failure that says why it hangs."""

    def __init__(self, mount):
        self.mount = mount
        self.guest: Guest | None = None

    def report(self, what: str) -> str:
        parts = [f"WATCHDOG: {what}"]
        try:
            pid = self.mount.daemon_pid()
            caught = _caught_signals(pid)
            dump = next(
                (s for s in (signal.SIGQUIT, signal.SIGUSR1) if caught & (1 << (s - 1))), None
            )
            if dump is not None:
                os.kill(pid, dump)
                time.sleep(2)  # faulthandler writes the stacks to the daemon's log
                parts.append(f"(sent {dump.name} to daemon {pid} for its thread dump)")
            else:
                parts.append(
                    f"(daemon {pid} catches neither SIGQUIT nor SIGUSR1: no Python stacks)"
                )
            parts.append(f"--- daemon {pid} threads (kernel side) ---\n{thread_report(pid)}")
        except (OSError, ValueError) as e:
            parts.append(f"(no daemon to inspect: {e})")
        try:
            cp = qemu_helpers.run_qcowfs(
                "jobs",
                str(self.mount.mountpoint),
                "--json",
                "--control-socket",
                str(self.mount.socket),
                timeout=5,
            )
            parts.append(f"--- qcowfs jobs --json ---\n{cp.stdout}{cp.stderr}")
        except subprocess.TimeoutExpired:
            parts.append("--- qcowfs jobs --json: no answer within 5 s ---")
        log = self.mount.log().splitlines()
        parts.append("--- daemon log (last 300 lines) ---\n" + "\n".join(log[-300:]))
        if self.guest is not None:
            code = self.guest.proc.poll()
            state = "running" if code is None else f"exited with {code}"
            parts.append(
                f"--- guest console (last 60 lines; QEMU {state}) ---\n" + self.guest.console()
            )
        return "\n".join(parts)

    def fail(self, what: str):
        pytest.fail(self.report(what), pytrace=False)
