"""The two servers of a chain, started and taken down the same way: `qcowfs mount` and
qemu-storage-daemon's FUSE export; the floor of a pyfuse3 server, serving a raw file;
and the QMP client that talks to the first two. Every mount and daemon is taken down on
every path (`qcowfs unmount`, QMP `quit`, then kill + `fusermount3 -u -z`)."""

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .harness import NA, OURS, QSD, ROOT, is_mounted, last_line, lazy_unmount, qemu_img

FLOOR = "floor"

EVENT_TIMEOUT = 600.0  # seconds a job may take before it counts as hung


@dataclass
class Mounted:
    kind: str
    file: Path  # the flat file to do I/O on
    qmp: Path  # QMP socket (ours: the control socket)
    pid: int
    mount_time: float
    log: Path
    device: str = ""  # QSD: the root node for block-commit
    probe: Path = None  # QMP socket for a second client (QSD's monitor takes one client)

    def __post_init__(self):
        self.probe = self.probe or self.qmp


def mount(ctx, kind, image, work, notes=None, writable=True):
    """A context manager serving image through `kind`'s FUSE mount; yields Mounted."""
    if kind == OURS:
        return mount_ours(ctx, image, work, notes)
    return mount_qsd(ctx, image, work, notes, writable)


@contextlib.contextmanager
def mount_ours(ctx, image, work, notes=None):
    work.mkdir(parents=True, exist_ok=True)
    mnt, sock, logf = work / "mnt", work / "ctl.sock", work / "qcowfs.log"
    mnt.mkdir(exist_ok=True)
    vsize = _virtual_size(image)
    argv = ctx.pin(
        [*ctx.qcowfs, "mount", image, mnt, "--control-socket", sock, "--log-file", logf],
        ctx.server_cpu,
    )
    ctx.mounts.add(str(mnt))
    t = time.perf_counter()
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        lazy_unmount(mnt)
        raise NA(f"qcowfs mount: {last_line(cp.stderr) or f'exit {cp.returncode}'}")
    _wait_served(mnt / "disk.raw", vsize, None, 30)
    elapsed = time.perf_counter() - t
    pid = None
    try:
        pid = int((work / "ctl.pid").read_text().strip())
    except (OSError, ValueError):
        pass
    m = Mounted(OURS, mnt / "disk.raw", sock, pid, elapsed, logf)
    try:
        yield m
    finally:
        _unmount_ours(ctx, m, mnt, notes)


@contextlib.contextmanager
def mount_floor(ctx, raw, work):
    """The floor of a pyfuse3 server (programs/pyfuse3_floor.py) serving `raw`; yields
    Mounted."""
    work.mkdir(parents=True, exist_ok=True)
    mnt, logf = work / "mnt", work / "floor.log"
    mnt.mkdir(exist_ok=True)
    argv = ctx.pin(ctx.program("pyfuse3_floor", raw, mnt), ctx.server_cpu)
    ctx.mounts.add(str(mnt))
    t = time.perf_counter()
    with open(logf, "wb") as lf:
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
    ctx.procs.add(proc)
    try:
        try:
            _wait_served(mnt / "disk.raw", os.stat(raw).st_size, proc, 30)
        except NA as e:
            raise NA(f"pyfuse3 floor {e}: {last_line(logf.read_text(errors='replace'))}") from None
        yield Mounted(FLOOR, mnt / "disk.raw", None, proc.pid, time.perf_counter() - t, logf)
    finally:
        lazy_unmount(mnt)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        ctx.procs.discard(proc)
        ctx.mounts.discard(str(mnt))


def _unmount_ours(ctx, m, mnt, notes):
    problem = None
    try:
        cp = subprocess.run(
            [*ctx.qcowfs, "unmount", mnt, "--cancel-jobs", "--control-socket", m.qmp],
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        if cp.returncode != 0:
            problem = f"qcowfs unmount failed: {last_line(cp.stderr)}"
    except subprocess.TimeoutExpired:
        problem = "qcowfs unmount timed out"
    if m.pid and _alive(m.pid):
        deadline = time.monotonic() + 10
        while _alive(m.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(m.pid):
            problem = problem or "the daemon outlived qcowfs unmount"
            os.kill(m.pid, signal.SIGKILL)
    if is_mounted(mnt):
        problem = problem or "still mounted after unmount"
        lazy_unmount(mnt)
    ctx.mounts.discard(str(mnt))
    errors = _log_errors(m.log)
    if notes is not None:
        if problem:
            notes.add(f"ours: {problem}")
        for e in errors:
            notes.add(f"ours: daemon log: {e}")


def _log_errors(path, limit=3):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [
        ln.split(": ", 1)[-1][:200]
        for ln in lines
        if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")
    ]
    return bad[:limit]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _virtual_size(image):
    cp = qemu_img("info", "-U", "--output=json", image)
    return json.loads(cp.stdout)["virtual-size"]


def _wait_served(path, vsize, proc, timeout):
    """Poll until path answers stat with the virtual size (a FUSE export serving), then
    read its first 4 KiB: the time to mount ends with a read that returned."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            if os.stat(path).st_size == vsize:
                break
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise NA(f"exited with status {proc.returncode} before serving")
        if time.perf_counter() > deadline:
            raise NA(f"{path} not served within {timeout} s")
        time.sleep(0.0005)
    fd = os.open(path, os.O_RDONLY)
    try:
        if len(os.pread(fd, 4096, 0)) != 4096:
            raise NA(f"{path}: a short read of its first 4 KiB")
    finally:
        os.close(fd)


def _qsd_escape(s):
    return str(s).replace(",", ",,")


@contextlib.contextmanager
def mount_qsd(ctx, image, work, notes=None, writable=True):
    work.mkdir(parents=True, exist_ok=True)
    exp, sock, logf = work / "qsd.raw", work / "qsd.sock", work / "qsd.log"
    probe = work / "qsd-probe.sock"
    exp.unlink(missing_ok=True)
    exp.touch()
    sock.unlink(missing_ok=True)
    probe.unlink(missing_ok=True)
    vsize = _virtual_size(image)
    argv = ctx.pin(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f,filename={_qsd_escape(image)}",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--export",
            f"type=fuse,id=e,node-name=q,mountpoint={_qsd_escape(exp)},"
            f"writable={'on' if writable else 'off'}",
            "--chardev",
            f"socket,id=qmp,path={_qsd_escape(sock)},server=on,wait=off",
            "--monitor",
            "chardev=qmp",
            "--chardev",
            f"socket,id=probe,path={_qsd_escape(probe)},server=on,wait=off",
            "--monitor",
            "chardev=probe",
        ],
        ctx.server_cpu,
    )
    ctx.mounts.add(str(exp))
    with open(logf, "wb") as lf:
        t = time.perf_counter()
        try:
            proc = subprocess.Popen(argv, stdout=lf, stderr=lf, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise NA("qemu-storage-daemon is not installed") from None
    ctx.procs.add(proc)
    try:
        try:
            _wait_served(exp, vsize, proc, 30)
        except NA as e:
            raise NA(
                f"qemu-storage-daemon {e}: {last_line(logf.read_text(errors='replace'))}"
            ) from None
        elapsed = time.perf_counter() - t
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        yield Mounted(QSD, exp, sock, proc.pid, elapsed, logf, device="q", probe=probe)
    finally:
        _stop_qsd(ctx, proc, sock, exp, notes)


def _stop_qsd(ctx, proc, sock, exp, notes):
    if proc.poll() is None:
        try:
            q = QMP(sock, timeout=10)
            try:
                q.cmd("quit")
            finally:
                q.close()
        except Exception:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if notes is not None:
                notes.add("qsd: did not exit after quit; killed")
            proc.kill()
            proc.wait()
    ctx.procs.discard(proc)
    lazy_unmount(exp)
    ctx.mounts.discard(str(exp))


# ----------------------------------------------------------------------------- QMP


class QMPError(NA):
    pass


class QMP:
    """A synchronous QMP client (qemu.qmp's legacy API), the same for both servers."""

    def __init__(self, path, timeout=60):
        try:
            from qemu.qmp.legacy import QEMUMonitorProtocol
        except ImportError:
            raise NA("the qemu.qmp client is not installed (pip install qemu.qmp)") from None
        self.q = QEMUMonitorProtocol(str(path))
        self.q.settimeout(timeout)
        try:
            self.q.connect()
        except Exception as e:
            raise NA(f"cannot connect to {path}: {e}") from None

    def cmd(self, name, args=None):
        r = self.q.cmd_raw(name, args)
        if "error" in r:
            raise QMPError(f"{name}: {r['error'].get('class')}: {r['error'].get('desc')}")
        return r.get("return")

    def clear(self):
        self.q.get_events(wait=False)
        self.q.clear_events()

    def wait_event(self, names, job, timeout=EVENT_TIMEOUT):
        """The next of `names` for job; (event, monotonic time of arrival)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NA(f"no {'/'.join(names)} within {timeout:.0f} s")
            try:
                ev = self.q.pull_event(wait=min(left, 1.0))
            except Exception:  # asyncio.TimeoutError on a quiet second
                ev = None
            if ev is None:
                continue
            now = time.monotonic()
            data = ev.get("data") or {}
            if data.get("device", data.get("id")) != job:
                continue
            name = ev.get("event")
            if name in names:
                return ev, now
            if name == "BLOCK_JOB_CANCELLED":
                raise NA("the job was cancelled")
            if name == "BLOCK_JOB_ERROR":
                raise NA(f"BLOCK_JOB_ERROR: {data}")

    def close(self):
        with contextlib.suppress(Exception):
            self.q.close()
