#!/usr/bin/env python3
"""qcowfs beside QEMU, measured in one run: the "Speed" figures of issues 2 to 7.

    python scripts/bench.py [--size 1G] [--only SECTION]... [--quick] [--json]

Sections (``--only`` takes these names; default: all, in this order):

  reader  (issue 2) sequential ``chain.read`` in 1 MiB pieces vs ``qemu-img convert -O raw``
          (and ``qemu-img bench`` reading); opening a 1 TiB sparse chain; peak RSS after
          20k random 4 KiB reads of a 1 TiB sparse chain vs ``qemu-io`` doing the same.
  writer  (issue 3) sequential 1 MiB ``chain.write`` into an empty active layer vs
          ``qemu-img bench -w -s 1M -t writeback`` on the same kind of image.
  mount   (issue 4) ``qcowfs mount`` vs ``qemu-storage-daemon``'s FUSE export of the same
          chain: fio (psync, one job, O_DIRECT) sequential 1 MiB read, 4 KiB random read,
          sequential 1 MiB write and 4 KiB random write into an empty overlay; time to
          mount; the daemon's peak RSS after 20k random reads of a 1 TiB chain.
  commit  (issue 5) offline ``qcowfs commit active.qcow2`` vs ``qemu-img commit -b base
          top`` (the same work: (base, top] into base); live block-commit of top into base
          over our control socket vs QSD's QMP, idle and under a 4 KiB random-write load:
          time, guest write IOPS during the job vs idle, longest guest write stall.
  active  (issue 6) active commit (top = the active image): time to READY and to
          COMPLETED (block-job-complete sent at READY), idle and under load, ours vs QSD;
          longest write stall around the pivot.
  guard   (issue 7) the stranding guard's scan of 2,000 small qcow2 files
          (``scripts/bench_guard.py``).

Method (../shared/perf-notes.md): timings on a small VM swing 2x with CPU placement, so
every figure compares the two programs in the same run, alternating which goes first,
pinned the same way (servers and offline tools on CPU 0, fio and the guest load on CPU 1,
with ``taskset``), over several rounds; tables show medians and the ratio ours/QEMU. The
test chain is deterministic: base <- mid <- top <- active, 64 KiB clusters, base fully
written, the flat view ~30% top, ~21% mid (mid also holds data under about half of
top's clusters), ~49% base, active empty; built with qemu-io and fixed patterns in a
temporary directory (``--tmpdir``; the default temp directory is on the same file
system as the one the figures were taken on, see the header printed). Write tests get a
fresh copy of what they write to: a new empty active layer over the (read-only) chain
for mount writes, a full copy of the chain (then ``sync``) for every commit.

The guest load for the live sections is a small Python process writing 4 KiB at random
offsets with O_DIRECT through the mounted file (QD1, pwrite, a CLOCK_MONOTONIC stamp at
each completion): IOPS in a window = completions in it / its length; the longest stall =
the longest interval between two completions that overlaps the window.

A section (or a figure) that needs a feature that does not work yet prints "n/a: why"
instead of failing. Every mount and daemon started here is taken down on every path
(``qcowfs unmount``, QMP ``quit``, then kill + ``fusermount3 -u -z``).
"""

import argparse
import bisect
import contextlib
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CLUSTER = 64 * K
SECTIONS = ("reader", "writer", "mount", "commit", "active", "guard")
OURS, QSD = "ours", "qsd"
JOB = "c"                       # job id used for every block-commit
RUN_LENGTHS = (1, 2, 4, 8, 16, 32)   # clusters per allocation run in the test chain
CHAIN = ("base.qcow2", "mid.qcow2", "top.qcow2", "active.qcow2")
EVENT_TIMEOUT = 600.0           # seconds a job may take before it counts as hung


class NA(Exception):
    """A figure that cannot be measured (a feature that does not work yet, a tool
    missing): shown as "n/a: <reason>"."""


T0 = time.monotonic()


def say(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- process helpers

class Ctx:
    """Options and shared state of one benchmark run."""

    def __init__(self, args, tmp):
        self.args = args
        self.tmp = Path(tmp)
        self.size = args.size
        self.quick = args.quick
        self.rounds = args.rounds
        self.commit_rounds = args.commit_rounds
        self.runtime = args.runtime
        ncpu = len(os.sched_getaffinity(0))
        self.server_cpu = args.server_cpu
        self.client_cpu = args.client_cpu if ncpu > 1 else args.server_cpu
        self.taskset = shutil.which("taskset")
        self.python = sys.executable
        venv_qcowfs = Path(sys.executable).parent / "qcowfs"
        self.qcowfs = [str(venv_qcowfs)] if venv_qcowfs.exists() else [sys.executable, "-m", "fusefs"]
        self.procs = set()          # Popen objects still to reap on the way out
        self.mounts = set()         # paths that may hold a FUSE mount of ours or QSD's
        self._pristine = None
        self._big = None

    def pin(self, argv, cpu):
        if cpu is None or not self.taskset:
            return list(map(str, argv))
        return [self.taskset, "-c", str(cpu), *map(str, argv)]


def _last_line(text):
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def run(argv, *, check=True, timeout=600, cwd=None, input=None):
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NA(f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''}: timed out after {timeout} s")
    except FileNotFoundError:
        raise NA(f"{argv[0]}: not installed")
    if check and cp.returncode != 0:
        name = " ".join(Path(a).name for a in argv[:3] if not a.startswith("-"))
        raise NA(f"{name}: exit {cp.returncode}: {_last_line(cp.stderr) or _last_line(cp.stdout)}")
    return cp


def timed(ctx, argv, *, cpu=None, timeout=900, cwd=None):
    """Run argv; (wall seconds, peak RSS bytes of that process, stdout, stderr).
    Raises NA when it fails."""
    argv = ctx.pin(argv, cpu)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd)
        ctx.procs.add(p)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
            ctx.procs.discard(p)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        so, se = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        raise NA(f"{Path(argv[3] if argv[0] == ctx.taskset else argv[0]).name}: exit "
                 f"{p.returncode}: {_last_line(se) or _last_line(so)}")
    return wall, ru.ru_maxrss * 1024, so, se


def py_json(ctx, script, *args, cpu=None, timeout=900):
    """Run a Python snippet (this interpreter, the project importable) that prints one
    JSON object last; returns (that object, wall, peak RSS)."""
    wall, rss, so, _ = timed(ctx, [ctx.python, "-c", script, *map(str, args)], cpu=cpu,
                             timeout=timeout, cwd=ROOT)
    return json.loads(so.strip().splitlines()[-1]), wall, rss


def qemu_img(*args, **kw):
    return run(["qemu-img", *args], **kw)


def qemu_io(img, cmds, fmt="qcow2"):
    """qemu-io commands in batches (ARG_MAX)."""
    for i in range(0, len(cmds), 2000):
        argv = ["qemu-io", "-f", fmt]
        for c in cmds[i:i + 2000]:
            argv += ["-c", c]
        run(argv + [str(img)], timeout=1800)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fs_type(path):
    """File system type holding path (longest mountinfo prefix)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mnt = parts[4].replace("\\040", " ")
                sep = parts.index("-")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[sep + 1]
    except OSError:
        pass
    return kind


def is_mounted(path):
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4].replace("\\040", " ") == target for line in f)
    except OSError:
        return False


def lazy_unmount(path):
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def proc_status(pid):
    """{'VmRSS': bytes, 'VmHWM': bytes} of a live process."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(val.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


# ----------------------------------------------------------------------------- the test chains

def plan_chain(size, seed=0x9C0F5):
    """Allocation runs of the deterministic chain: (first cluster, clusters, layer, mid
    also under top?). Runs of 1..32 clusters; 30% of runs top, 22% mid, 48% base only."""
    rng = random.Random(seed)
    n = size // CLUSTER
    runs, c = [], 0
    while c < n:
        length = min(rng.choice(RUN_LENGTHS), n - c)
        r = rng.random()
        layer = "top" if r < 0.30 else "mid" if r < 0.52 else "base"
        under = layer == "top" and rng.random() < 0.5
        runs.append((c, length, layer, under))
        c += length
    return runs


def chain_stats(size):
    n = size // CLUSTER
    top = mid_vis = mid_all = 0
    for _, length, layer, under in plan_chain(size):
        if layer == "top":
            top += length
            mid_all += length if under else 0
        elif layer == "mid":
            mid_vis += length
            mid_all += length
    return {"clusters": n, "top": top / n, "mid": mid_vis / n, "base": (n - top - mid_vis) / n,
            "mid_allocated": mid_all * CLUSTER, "top_allocated": top * CLUSTER,
            "to_commit": (top + mid_vis) * CLUSTER}


def build_chain(d, size):
    """base <- mid <- top <- active in d (relative backing names, 64 KiB clusters)."""
    d.mkdir(parents=True, exist_ok=True)
    opts = f"cluster_size={CLUSTER}"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, d / "base.qcow2", str(size))
    step = 64 * M
    qemu_io(d / "base.qcow2", [f"write -q -P 0x11 {o} {min(step, size - o)}"
                               for o in range(0, size, step)])
    mid_cmds, top_cmds = [], []
    for k, (c, length, layer, under) in enumerate(plan_chain(size)):
        off, n = c * CLUSTER, length * CLUSTER
        if layer == "top":
            top_cmds.append(f"write -q -P {0x80 | (k & 0x3f)} {off} {n}")
            if under:
                mid_cmds.append(f"write -q -P {0x40 | (k & 0x3f)} {off} {n}")
        elif layer == "mid":
            mid_cmds.append(f"write -q -P {0x40 | (k & 0x3f)} {off} {n}")
    for name, back, cmds in (("mid", "base", mid_cmds), ("top", "mid", top_cmds),
                             ("active", "top", [])):
        img = d / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", f"{back}.qcow2", "-F",
                 "qcow2", img, str(size), cwd=d)
        if cmds:
            qemu_io(img, cmds)
    return d


def build_big(d):
    """A 1 TiB sparse chain base <- top <- active with an L2 table in every 512 MiB of
    base and of top (2,048 each): random reads touch far more tables than any cache
    holds."""
    d.mkdir(parents=True, exist_ok=True)
    opts = f"cluster_size={CLUSTER}"
    span = 512 * M
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, d / "base.qcow2", str(T))
    qemu_io(d / "base.qcow2", [f"write -q -P 0x11 {o} 65536" for o in range(0, T, span)])
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2",
             d / "top.qcow2", str(T), cwd=d)
    qemu_io(d / "top.qcow2", [f"write -q -P 0x22 {o + span // 2} 65536" for o in range(0, T, span)])
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "top.qcow2", "-F", "qcow2",
             d / "active.qcow2", str(T), cwd=d)
    return d


def pristine(ctx):
    if ctx._pristine is None:
        t = time.monotonic()
        say(f"building the {ctx.size / G:g} GiB test chain ...")
        ctx._pristine = build_chain(ctx.tmp / "pristine", ctx.size)
        say(f"  built in {time.monotonic() - t:.1f} s")
    return ctx._pristine


def big(ctx):
    if ctx._big is None:
        t = time.monotonic()
        say("building the 1 TiB sparse chain ...")
        ctx._big = build_big(ctx.tmp / "big")
        say(f"  built in {time.monotonic() - t:.1f} s")
    return ctx._big


def new_overlay(path, backing):
    """A fresh, empty qcow2 overlay at path over backing (absolute name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", "-b",
             str(Path(backing).resolve()), "-F", "qcow2", path)
    return path


def copy_chain(src, dst):
    """A full copy of the chain (relative names stay valid), flushed to disk so no
    timed fdatasync pays for the copy's dirty pages."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    run(["cp", "--sparse=always", *[src / n for n in CHAIN], dst])
    os.sync()
    return dst


# ----------------------------------------------------------------------------- results

@dataclass
class Row:
    figure: str
    unit: str
    ours: object = None          # number, None (not measured) or "n/a: ..." text
    theirs: object = None
    better: str = "higher"       # "higher" | "lower" | "" (informational)
    goal: tuple = ()             # ("rel", factor) vs theirs, ("abs", limit), ()
    note: str = ""
    samples: dict = field(default_factory=dict)

    @staticmethod
    def _num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    @property
    def ratio(self):
        if self._num(self.ours) and self._num(self.theirs) and self.theirs:
            return self.ours / self.theirs
        return None

    def goal_text(self):
        if not self.goal:
            return ""
        kind, x = self.goal
        op = ">=" if self.better == "higher" else "<="
        if kind == "rel":
            return f"{op} QEMU" if x == 1 else f"{op} {x:g}x QEMU"
        return f"{op} {x:g}"

    @property
    def ok(self):
        if not self.goal or not self._num(self.ours):
            return None
        kind, x = self.goal
        if kind == "rel":
            if not self._num(self.theirs):
                return None
            limit = self.theirs * x
        else:
            limit = x
        return self.ours >= limit if self.better == "higher" else self.ours <= limit

    def to_json(self):
        return {"figure": self.figure, "unit": self.unit, "ours": self.ours,
                "qemu": self.theirs, "ratio": self.ratio, "better": self.better,
                "goal": self.goal_text(), "ok": self.ok, "note": self.note,
                "samples": self.samples}


@dataclass
class Section:
    name: str
    title: str
    vs: str
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    na: str = ""                 # the whole section could not run
    seconds: float = 0.0
    load: str = ""               # load average when the section ended

    def row(self, *a, **kw):
        r = Row(*a, **kw)
        self.rows.append(r)
        return r

    def to_json(self):
        return {"title": self.title, "vs": self.vs, "na": self.na or None,
                "seconds": round(self.seconds, 1), "loadavg": self.load, "rows": [r.to_json() for r in self.rows],
                "notes": self.notes}


def fmt_num(v):
    if isinstance(v, str):
        return "n/a"
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}" if a >= 0.01 else f"{v:.2g}"


def render(section):
    out = [f"== {section.title} ==  (ours beside {section.vs}; {section.seconds:.0f} s; "
           f"load average {section.load})"]
    if section.na:
        out.append(f"n/a: {section.na}")
        return "\n".join(out)
    head = ("figure", "unit", "ours", section.vs.split()[0], "ours/QEMU", "goal", "")
    rows = [head]
    footnotes = []
    missing = {}        # (who, reason) -> figures
    for r in section.rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        ok = {True: "ok", False: "MISS", None: ""}[r.ok]
        rows.append((r.figure, r.unit, fmt_num(r.ours), fmt_num(r.theirs), ratio,
                     r.goal_text(), ok))
        for who, v in (("ours", r.ours), (section.vs.split()[0], r.theirs)):
            if isinstance(v, str):
                missing.setdefault((who, v), []).append(r.figure.strip())
        if r.note:
            footnotes.append(f"  {r.figure.strip()}: {r.note}")
    for (who, reason), figures in missing.items():
        which = figures[0] if len(figures) == 1 else f"{len(figures)} figures"
        footnotes.append(f"  {who} {reason} ({which})")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:5], widths[2:5])]
        cells += [row[5].ljust(widths[5]), row[6]]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths).rstrip())
    out += footnotes
    out += [f"  note: {n}" for n in section.notes]
    return "\n".join(out)


def na_text(e):
    return f"n/a: {e}"


# ----------------------------------------------------------------------------- mounts

@dataclass
class Mounted:
    kind: str
    file: Path           # the flat file to do I/O on
    qmp: Path            # QMP socket (ours: the control socket)
    pid: int
    mount_time: float
    log: Path
    device: str = ""     # QSD: the root node for block-commit


@contextlib.contextmanager
def mount_ours(ctx, image, work, notes=None):
    work.mkdir(parents=True, exist_ok=True)
    mnt, sock, logf = work / "mnt", work / "ctl.sock", work / "qcowfs.log"
    mnt.mkdir(exist_ok=True)
    vsize = _virtual_size(image)
    argv = ctx.pin([*ctx.qcowfs, "mount", image, mnt, "--control-socket", sock,
                    "--log-file", logf], ctx.server_cpu)
    ctx.mounts.add(str(mnt))
    t = time.perf_counter()
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        lazy_unmount(mnt)
        raise NA(f"qcowfs mount: {_last_line(cp.stderr) or f'exit {cp.returncode}'}")
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


def _unmount_ours(ctx, m, mnt, notes):
    problem = None
    try:
        cp = subprocess.run([*ctx.qcowfs, "unmount", mnt, "--cancel-jobs", "--control-socket",
                             m.qmp], capture_output=True, text=True, timeout=180,
                            stdin=subprocess.DEVNULL)
        if cp.returncode != 0:
            problem = f"qcowfs unmount failed: {_last_line(cp.stderr)}"
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
    bad = [ln.split(": ", 1)[-1][:200] for ln in lines
           if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")]
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
    """Poll until path answers stat with the virtual size (a FUSE export serving)."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            if os.stat(path).st_size == vsize:
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise NA(f"exited with status {proc.returncode} before serving")
        if time.perf_counter() > deadline:
            raise NA(f"{path} not served within {timeout} s")
        time.sleep(0.0005)


def _qsd_escape(s):
    return str(s).replace(",", ",,")


@contextlib.contextmanager
def mount_qsd(ctx, image, work, notes=None, writable=True):
    work.mkdir(parents=True, exist_ok=True)
    exp, sock, logf = work / "qsd.raw", work / "qsd.sock", work / "qsd.log"
    exp.unlink(missing_ok=True)
    exp.touch()
    sock.unlink(missing_ok=True)
    vsize = _virtual_size(image)
    argv = ctx.pin([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f,filename={_qsd_escape(image)}",
        "--blockdev", "driver=qcow2,node-name=q,file=f",
        "--export", f"type=fuse,id=e,node-name=q,mountpoint={_qsd_escape(exp)},"
                    f"writable={'on' if writable else 'off'}",
        "--chardev", f"socket,id=qmp,path={_qsd_escape(sock)},server=on,wait=off",
        "--monitor", "chardev=qmp"], ctx.server_cpu)
    ctx.mounts.add(str(exp))
    with open(logf, "wb") as lf:
        t = time.perf_counter()
        try:
            proc = subprocess.Popen(argv, stdout=lf, stderr=lf, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise NA("qemu-storage-daemon is not installed")
    ctx.procs.add(proc)
    try:
        try:
            _wait_served(exp, vsize, proc, 30)
        except NA as e:
            raise NA(f"qemu-storage-daemon {e}: {_last_line(logf.read_text(errors='replace'))}")
        elapsed = time.perf_counter() - t
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        yield Mounted(QSD, exp, sock, proc.pid, elapsed, logf, device="q")
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


def mount(ctx, kind, image, work, notes=None, writable=True):
    if kind == OURS:
        return mount_ours(ctx, image, work, notes)
    return mount_qsd(ctx, image, work, notes, writable)


class Notes:
    """Deduplicated notes of a section."""

    def __init__(self, section):
        self.section = section

    def add(self, text):
        if text not in self.section.notes:
            self.section.notes.append(text)


# ----------------------------------------------------------------------------- QMP

class QMPError(NA):
    pass


class QMP:
    """A synchronous QMP client (qemu.qmp's legacy API), the same for both servers."""

    def __init__(self, path, timeout=60):
        try:
            from qemu.qmp.legacy import QEMUMonitorProtocol
        except ImportError:
            raise NA("the qemu.qmp client is not installed (pip install qemu.qmp)")
        self.q = QEMUMonitorProtocol(str(path))
        self.q.settimeout(timeout)
        try:
            self.q.connect()
        except Exception as e:
            raise NA(f"cannot connect to {path}: {e}")

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
            except Exception:       # asyncio.TimeoutError on a quiet second
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


# ----------------------------------------------------------------------------- guest load

LOAD_SCRIPT = r"""
import array, mmap, os, random, sys, time
path, size, out, stop, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
reading = sys.argv[6] == "read"
fd = os.open(path, (os.O_RDONLY if reading else os.O_WRONLY) | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
buf.write(b"\xa5" * 4096)
if reading:
    pw = lambda fd, buf, off: os.preadv(fd, [buf], off)
rnd = random.Random(seed).randrange
n = size // 4096
ts = array.array("d")
mono, exists = time.monotonic, os.path.exists
if not reading:
    pw = os.pwrite
errors = 0
last_error = ""
ts.append(mono())
sys.stdout.write("ready\n"); sys.stdout.flush()
i = 0
limit = mono() + 900
while True:
    i += 1
    if not (i & 63) and (exists(stop) or mono() > limit):
        break
    try:
        pw(fd, buf, rnd(n) * 4096)
    except OSError as e:
        errors += 1
        last_error = str(e)
        if errors > 100:
            break
        continue
    ts.append(mono())
os.close(fd)
with open(out, "wb") as f:
    ts.tofile(f)
import json
print(json.dumps({"writes": len(ts) - 1, "errors": errors, "last_error": last_error}))
"""


class Load:
    """The guest: 4 KiB O_DIRECT random pwrites (or preads) at QD1 on the client CPU,
    with a completion time stamp each."""

    def __init__(self, ctx, path, size, work, mode="write"):
        self.ctx = ctx
        self.out = work / f"load-{mode}.stamps"
        self.stop_file = work / f"load-{mode}.stop"
        self.stop_file.unlink(missing_ok=True)
        self.out.unlink(missing_ok=True)
        argv = ctx.pin([ctx.python, "-c", LOAD_SCRIPT, path, size, self.out, self.stop_file, 42,
                        mode], ctx.client_cpu)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, stdin=subprocess.DEVNULL)
        ctx.procs.add(self.proc)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.wait()
            raise NA(f"guest writer did not start: {_last_line(self.proc.stderr.read())}")
        self.started = time.monotonic()

    def finish(self):
        """Stop; the array of completion stamps and the writer's summary."""
        import array
        self.stop_file.touch()
        try:
            so, se = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            so, se = self.proc.communicate()
        self.ctx.procs.discard(self.proc)
        if self.proc.returncode != 0:
            raise NA(f"guest writer failed: {_last_line(se)}")
        summary = json.loads(so.strip().splitlines()[-1])
        ts = array.array("d")
        with open(self.out, "rb") as f:
            ts.frombytes(f.read())
        return list(ts), summary

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ctx.procs.discard(self.proc)


class QueryProbe:
    """`query-block-jobs` every 20 ms on a connection of its own while a job runs: how
    long the control socket keeps a client waiting under guest load."""

    def __init__(self, path):
        import threading
        self.q = QMP(path)
        self.waits = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            t = time.monotonic()
            try:
                self.q.cmd("query-block-jobs")
            except Exception:           # noqa: BLE001 - the mount went away
                return
            self.waits.append(time.monotonic() - t)

    def finish(self):
        self._stop.set()
        self._thread.join(60)
        self.q.close()
        return max(self.waits) if self.waits else None


def latencies(ts, a, b):
    """Per-request latencies of a QD1 load: the gaps between consecutive completions
    that end in [a, b]."""
    i = max(bisect.bisect_left(ts, a), 1)
    j = bisect.bisect_right(ts, b)
    return sorted(ts[k] - ts[k - 1] for k in range(i, j))


def percentile(sorted_xs, p):
    if not sorted_xs:
        return None
    return sorted_xs[min(len(sorted_xs) - 1, int(len(sorted_xs) * p / 100))]


def rate(ts, a, b):
    """Completions per second in [a, b)."""
    if b <= a:
        return None
    return (bisect.bisect_left(ts, b) - bisect.bisect_left(ts, a)) / (b - a)


def longest_gap(ts, a, b):
    """The longest interval between consecutive completions that overlaps [a, b]."""
    i = max(bisect.bisect_left(ts, a) - 1, 0)
    j = min(bisect.bisect_right(ts, b) + 1, len(ts))
    best = 0.0
    for k in range(i + 1, j):
        best = max(best, ts[k] - ts[k - 1])
    return best


# ----------------------------------------------------------------------------- fio

def fio(ctx, path, rw, bs, size, *, runtime=None, number_ios=None, direct=True):
    argv = ["fio", "--name=bench", f"--filename={path}", "--ioengine=psync", "--iodepth=1",
            "--numjobs=1", f"--direct={int(direct)}", f"--rw={rw}", f"--bs={bs}",
            f"--size={size}", "--fallocate=none", "--randrepeat=1", "--output-format=json"]
    if runtime:
        argv += ["--time_based", f"--runtime={runtime}"]
    if number_ios:
        argv += [f"--number_ios={number_ios}"]
    _, _, so, _ = timed(ctx, argv, cpu=ctx.client_cpu, timeout=900)
    data = json.loads(so[so.index("{"):])
    job = data["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    if job.get("error"):
        raise NA(f"fio: error {job['error']}")
    return {"bw": side["bw_bytes"] / M, "iops": side["iops"], "ios": side["total_ios"],
            "clat_max_ms": side.get("clat_ns", {}).get("max", 0) / 1e6}


# ----------------------------------------------------------------------------- 1. reader

SEQ_READ = r"""
import json, sys, time
import qcow
qcow.tune_malloc()      # as the qcowfs CLI and daemon do
path, piece = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
with qcow.open_chain(path, writable=False) as chain:
    size = chain.virtual_size
    read = chain.read
    for off in range(0, size, piece):
        read(off, min(piece, size - off))
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": size}))
"""

OPEN_TIME = r"""
import json, sys, time
import qcow
path, n = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(n):
    t = time.perf_counter()
    with qcow.open_chain(path, writable=False) as chain:
        chain.read(chain.virtual_size - 4096, 4096)
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times}))
"""

RANDOM_READS = r"""
import json, resource, sys
import qcow
path, offsets = sys.argv[1], sys.argv[2]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
offs = [int(x) for x in open(offsets).read().split()]
with qcow.open_chain(path, writable=False) as chain:
    chain.read(0, 4096)
    before = rss()
    for off in offs:
        chain.read(off, 4096)
    after = rss()
print(json.dumps({"before": before, "after": after,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def section_reader(ctx, sec):
    d = pristine(ctx)
    active = d / "active.qcow2"
    size = ctx.size
    out = ctx.tmp / "convert.raw"
    cpu = ctx.server_cpu
    s = {"ours": [], "convert": [], "unsafe": [], "bench": [], "bench_self": []}
    na = {}

    def ours():
        r, _, _ = py_json(ctx, SEQ_READ, active, M, cpu=cpu)
        s["ours"].append(r["seconds"])

    def convert(unsafe):
        out.unlink(missing_ok=True)
        argv = ["qemu-img", "convert", "-O", "raw"] + (["-t", "unsafe"] if unsafe else []) + [active, out]
        wall, _, _, _ = timed(ctx, argv, cpu=cpu)
        out.unlink(missing_ok=True)
        s["unsafe" if unsafe else "convert"].append(wall)

    def bench():
        wall, _, so, _ = timed(ctx, ["qemu-img", "bench", "-f", "qcow2", "-d", "1", "-s", "1M",
                                     "-c", str(size // M), active], cpu=cpu)
        s["bench"].append(wall)
        s["bench_self"].append(_bench_seconds(so))

    tests = {"ours": ours, "convert": lambda: convert(False), "unsafe": lambda: convert(True),
             "bench": bench}
    say("reader: warm-up")
    for name, fn in tests.items():       # page cache warm for everyone
        _attempt(fn, na, name)
    for k in s:
        s[k].clear()
    for r in range(ctx.rounds):
        say(f"reader: round {r + 1}/{ctx.rounds}")
        names = list(tests) if r % 2 == 0 else list(reversed(tests))
        for name in names:
            if name not in na:
                _attempt(tests[name], na, name)

    def mibs(key):
        if key in na:
            return na_text(na[key])
        t = median(s[key])
        return size / M / t if t else None

    sec.row("sequential read, 1 MiB pieces vs qemu-img convert -O raw (to a file)",
            "MiB/s", mibs("ours"), mibs("convert"), goal=("rel", 1),
            note="convert writes a raw file on the same file system "
                 f"({fs_type(ctx.tmp)}) with its default cache (fdatasync at the end); "
                 "ours is chain.read in a loop (open to close), interpreter start excluded",
            samples={k: s[k] for k in ("ours", "convert")})
    sec.row("  same, vs qemu-img convert -t unsafe (no final flush)", "MiB/s",
            mibs("ours"), mibs("unsafe"), better="higher", goal=(),
            samples={"unsafe": s["unsafe"]})
    bench_self = median(s["bench_self"])
    sec.row("  same, vs qemu-img bench -d 1 -s 1M (read, QD1, wall)", "MiB/s",
            mibs("ours"), mibs("bench"), goal=(),
            note=(f"qemu-img bench's own loop time: {size / M / bench_self:,.0f} MiB/s"
                  if bench_self else ""),
            samples={"bench": s["bench"], "bench_self": s["bench_self"]})

    # open time of a 1 TiB sparse chain
    b = big(ctx)
    bactive = b / "active.qcow2"
    opens, qopens, ona = [], [], {}
    for r in range(max(ctx.rounds, 3)):
        for who in ((OURS, QSD) if r % 2 == 0 else (QSD, OURS)):
            if who == OURS and "o" not in ona:
                def f():
                    res, _, _ = py_json(ctx, OPEN_TIME, bactive, 3, cpu=cpu)
                    opens.append(median(res["times"]))
                _attempt(f, ona, "o")
            elif who == QSD and "q" not in ona:
                def g():
                    wall, _, _, _ = timed(ctx, ["qemu-io", "-r", "-f", "qcow2", "-c",
                                                f"read -q {T - 4096} 4096", bactive], cpu=cpu)
                    qopens.append(wall)
                _attempt(g, ona, "q")
    sec.row("open a 1 TiB sparse 3-layer chain (+ one 4 KiB read)", "ms",
            na_text(ona["o"]) if "o" in ona else _ms(median(opens)),
            na_text(ona["q"]) if "q" in ona else _ms(median(qopens)),
            better="lower", goal=("abs", 1000),
            note="ours: open_chain + read + close in-process; qemu-io: the whole process",
            samples={"ours": opens, "qemu": qopens})

    # RSS after random reads of the 1 TiB chain
    nreads = 5000 if ctx.quick else 20000
    rng = random.Random(1234)
    offs = [rng.randrange(T // 4096) * 4096 for _ in range(nreads)]
    offfile = ctx.tmp / "offsets.txt"
    offfile.write_text("\n".join(map(str, offs)))
    rss_ours = rss_q = None
    note = ""
    try:
        res, _, peak = py_json(ctx, RANDOM_READS, bactive, offfile, cpu=cpu)
        rss_ours = peak / M
        note = (f"ours: RSS {res['before'] / M:.0f} MiB after open, {res['after'] / M:.0f} MiB "
                f"after the reads; peak of the whole Python process shown")
    except NA as e:
        rss_ours = na_text(e)
    try:
        argv = ["qemu-io", "-r", "-f", "qcow2"]
        for o in offs:
            argv += ["-c", f"read -q {o} 4096"]
        _, peak, _, _ = timed(ctx, argv + [bactive], cpu=cpu)
        rss_q = peak / M
    except NA as e:
        rss_q = na_text(e)
    sec.row(f"peak RSS after {nreads // 1000}k random 4 KiB reads, 1 TiB chain", "MiB",
            rss_ours, rss_q, better="lower", goal=("abs", 64), note=note)


def _ms(v):
    return v * 1000 if isinstance(v, (int, float)) else v


def _bench_seconds(text):
    for line in text.splitlines():
        if line.startswith("Run completed in"):
            return float(line.split()[3])
    return None


def _attempt(fn, na, key):
    try:
        fn()
    except NA as e:
        na[key] = str(e)
        say(f"  {key}: n/a: {e}")


# ----------------------------------------------------------------------------- 2. writer

SEQ_WRITE = r"""
import json, sys, time
import qcow
path, total, piece, pattern = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
buf = bytes([pattern]) * piece
t = time.perf_counter()
with qcow.open_chain(path, writable=True) as chain:
    write = chain.write
    for off in range(0, total, piece):
        write(off, buf)
    loop = time.perf_counter() - t
print(json.dumps({"loop": loop, "total": time.perf_counter() - t}))
"""


def section_writer(ctx, sec):
    d = pristine(ctx)
    top = d / "top.qcow2"
    total = min(256 * M, ctx.size) if not ctx.quick else min(64 * M, ctx.size)
    work = ctx.tmp / "writer"
    cpu = ctx.server_cpu
    s = {"ours": [], "ours_loop": [], "qemu": [], "qemu_self": []}
    na = {}

    def ours():
        img = new_overlay(work / "w-ours.qcow2", top)
        os.sync()
        r, _, _ = py_json(ctx, SEQ_WRITE, img, total, M, 0x5A, cpu=cpu)
        s["ours"].append(r["total"])
        s["ours_loop"].append(r["loop"])

    def qemu():
        img = new_overlay(work / "w-qemu.qcow2", top)
        os.sync()
        wall, _, so, _ = timed(ctx, ["qemu-img", "bench", "-f", "qcow2", "-w", "-s", "1M", "-c",
                                     str(total // M), "-t", "writeback", "--pattern=0x5a", img],
                               cpu=cpu)
        s["qemu"].append(wall)
        s["qemu_self"].append(_bench_seconds(so))

    tests = {"ours": ours, "qemu": qemu}
    for r in range(ctx.rounds + 1):      # round 0: warm-up, not counted
        say(f"writer: round {r}/{ctx.rounds}" + (" (warm-up)" if r == 0 else ""))
        for name in (tests if r % 2 == 0 else reversed(list(tests))):
            if name not in na:
                _attempt(tests[name], na, name)
        if r == 0:
            for k in s:
                s[k].clear()

    def mibs(key, who):
        if who in na:
            return na_text(na[who])
        t = median(s[key])
        return total / M / t if t else None

    sec.row(f"{total // M} MiB of sequential 1 MiB writes into an empty active layer, "
            "with the final flush and close", "MiB/s", mibs("ours", "ours"), mibs("qemu", "qemu"),
            goal=("rel", 1),
            note="ours: open_chain(writable) + chain.write loop + close (flush, fdatasync), "
                 "one thread; qemu-img bench -w -s 1M -t writeback (64 requests in flight): "
                 "its whole process",
            samples=s)
    sec.row("  writes only (before the final flush)", "MiB/s", mibs("ours_loop", "ours"),
            mibs("qemu_self", "qemu"), goal=(),
            note="qemu: the 'Run completed in' time qemu-img bench prints")


# ----------------------------------------------------------------------------- 3. mount

def section_mount(ctx, sec):
    d = pristine(ctx)
    top = d / "top.qcow2"
    vsize = ctx.size
    runtime = ctx.runtime
    notes = Notes(sec)
    keys = ("mount", "seqread", "randread", "seqwrite", "randwrite", "unmount")
    s = {k: {OURS: [], QSD: []} for k in keys}
    na = {OURS: {}, QSD: {}}
    extra = {OURS: {}, QSD: {}}
    before = {n: os.stat(d / n).st_mtime_ns for n in CHAIN[:3]}

    def one(kind, tests):
        work = ctx.tmp / "mount" / kind
        active = new_overlay(work / "active.qcow2", top)
        t_unmount = None
        with mount(ctx, kind, active, work, notes) as m:
            s["mount"][kind].append(m.mount_time)
            for name in tests:
                try:
                    if name == "seqread":
                        r = fio(ctx, m.file, "read", "1M", vsize, runtime=runtime)
                        s[name][kind].append(r["bw"])
                    elif name == "randread":
                        r = fio(ctx, m.file, "randread", "4k", vsize, runtime=runtime)
                        s[name][kind].append(r["iops"])
                    elif name == "seqwrite":
                        r = fio(ctx, m.file, "write", "1M", vsize)
                        s[name][kind].append(r["bw"])
                    elif name == "randwrite":
                        r = fio(ctx, m.file, "randwrite", "4k", vsize, runtime=runtime)
                        s[name][kind].append(r["iops"])
                        extra[kind].setdefault("randwrite_clat_max", []).append(r["clat_max_ms"])
                except NA as e:
                    na[kind][name] = str(e)
                    say(f"  {kind} {name}: n/a: {e}")
            t_unmount = time.perf_counter()
        s["unmount"][kind].append(time.perf_counter() - t_unmount)

    for r in range(ctx.rounds):
        order = (OURS, QSD) if r % 2 == 0 else (QSD, OURS)
        say(f"mount: round {r + 1}/{ctx.rounds} ({' then '.join(order)})")
        for kind in order:
            for tests in (("seqread", "randread"), ("seqwrite",), ("randwrite",)):
                if all(t in na[kind] for t in tests) or "mount" in na[kind]:
                    continue
                try:
                    one(kind, tests)
                except NA as e:
                    na[kind]["mount"] = str(e)
                    say(f"  {kind}: n/a: {e}")

    def val(key, kind):
        if key in na[kind]:
            return na_text(na[kind][key])
        if "mount" in na[kind] and not s[key][kind]:
            return na_text(na[kind]["mount"])
        return median(s[key][kind])

    sec.row("time to mount (command start to file serving)", "ms", _ms(val("mount", OURS)),
            _ms(val("mount", QSD)), better="lower", goal=("rel", 1),
            note="ours: `qcowfs mount` returns (it waits for the daemon); QSD: process start "
                 "until its export file stats with the virtual size",
            samples=s["mount"])
    sec.row("O_DIRECT sequential read, 1 MiB", "MiB/s", val("seqread", OURS), val("seqread", QSD),
            goal=("rel", 1), samples=s["seqread"])
    sec.row("4 KiB random read, QD1", "IOPS", val("randread", OURS), val("randread", QSD),
            goal=("rel", 1), samples=s["randread"])
    sec.row("sequential write 1 MiB into an empty overlay", "MiB/s", val("seqwrite", OURS),
            val("seqwrite", QSD), goal=("rel", 1), samples=s["seqwrite"])
    sec.row("4 KiB random write into an empty overlay, QD1", "IOPS", val("randwrite", OURS),
            val("randwrite", QSD), goal=("rel", 1), samples=s["randwrite"],
            note="fio clat max (ms), median of rounds: ours "
                 f"{fmt_num(median(extra[OURS].get('randwrite_clat_max', [])))}, QSD "
                 f"{fmt_num(median(extra[QSD].get('randwrite_clat_max', [])))}")
    sec.row("time to unmount (after the last request)", "ms",
            _ms(median(s["unmount"][OURS])), _ms(median(s["unmount"][QSD])), better="lower",
            goal=(), samples=s["unmount"])

    # memory of the daemon: 1 TiB chain read at random through the mount
    b = big(ctx)
    nreads = 5000 if ctx.quick else 20000
    mem = {}
    for kind in (OURS, QSD):
        work = ctx.tmp / "mount-big" / kind
        try:
            active = new_overlay(work / "active.qcow2", b / "top.qcow2")
            with mount(ctx, kind, active, work, notes) as m:
                st0 = proc_status(m.pid)
                fio(ctx, m.file, "randread", "4k", T, number_ios=nreads)
                st = proc_status(m.pid)
                mem[kind] = st.get("VmHWM", 0) / M
                if kind == OURS:
                    notes.add(f"ours: daemon RSS {st0.get('VmRSS', 0) / M:.0f} MiB after mount, "
                              f"{st.get('VmRSS', 0) / M:.0f} MiB after the reads")
        except NA as e:
            mem[kind] = na_text(e)
    sec.row(f"daemon peak RSS after {nreads // 1000}k random 4 KiB reads, 1 TiB chain", "MiB",
            mem.get(OURS), mem.get(QSD), better="lower", goal=("abs", 64))
    after = {n: os.stat(d / n).st_mtime_ns for n in CHAIN[:3]}
    if after != before:
        notes.add("WARNING: a backing file of the chain was modified by a mount")
    sec.notes.append(f"fio psync, one job, O_DIRECT; servers on CPU {ctx.server_cpu}, fio on "
                     f"CPU {ctx.client_cpu}; {ctx.rounds} rounds alternating who goes first; "
                     f"random tests and sequential reads run {runtime} s; sequential write one "
                     f"pass over {vsize // M} MiB; every write test on a fresh empty active "
                     "layer over the same read-only chain")


# ----------------------------------------------------------------------------- 4. commit

def section_commit(ctx, sec):
    d = pristine(ctx)
    notes = Notes(sec)
    st = chain_stats(ctx.size)
    cpu = ctx.server_cpu
    runs = ctx.tmp / "commit"
    s = {"ours": [], "qemu": []}
    na = {}
    say("commit: offline")
    for r in range(ctx.commit_rounds):
        a, b = runs / "off-ours", runs / "off-qemu"
        copy_chain(d, a)
        copy_chain(d, b)
        order = ("ours", "qemu") if r % 2 == 0 else ("qemu", "ours")
        for who in order:
            if who in na:
                continue
            try:
                if who == "ours":
                    wall, _, _, _ = timed(ctx, [*ctx.qcowfs, "commit", a / "active.qcow2"], cpu=cpu)
                else:
                    wall, _, _, _ = timed(ctx, ["qemu-img", "commit", "-q", "-b", "base.qcow2",
                                                b / "top.qcow2"], cpu=cpu, cwd=b)
                s[who].append(wall)
            except NA as e:
                na[who] = str(e)
        if r == 0 and not na:
            cp = qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", a / "base.qcow2",
                          b / "base.qcow2", check=False)
            notes.add("offline: base after our commit " +
                      ("equals" if cp.returncode == 0 else "DIFFERS FROM") +
                      " base after qemu-img's (qemu-img compare)")
            cp = qemu_img("check", "-q", a / "base.qcow2", check=False)
            if cp.returncode != 0:
                notes.add(f"offline: qemu-img check of our base: exit {cp.returncode}")
        shutil.rmtree(a)
        shutil.rmtree(b)
    imports = []
    for _ in range(3):
        try:
            w, _, _, _ = timed(ctx, [ctx.python, "-c", "import commit.engine, fusefs.cli, qcow"],
                               cpu=cpu, cwd=ROOT)
            imports.append(w)
        except NA:
            break
    sec.row("offline commit of (base, top] into base", "s",
            na_text(na["ours"]) if "ours" in na else median(s["ours"]),
            na_text(na["qemu"]) if "qemu" in na else median(s["qemu"]), better="lower",
            goal=("rel", 1),
            note=f"`qcowfs commit active.qcow2` vs `qemu-img commit -b base.qcow2 top.qcow2`, "
                 f"whole processes; {st['to_commit'] / M:.0f} MiB allocated in (base, top]; of "
                 f"ours, starting Python and importing the project takes "
                 f"{fmt_num(median(imports))} s",
            samples=s)
    live_rows(ctx, sec, notes, active=False)


def live_commit_run(ctx, kind, chain_dir, work, *, active, load, notes):
    """One live commit on a mount of chain_dir; a dict of figures (seconds, IOPS)."""
    base, top, act = (str(chain_dir / n) for n in ("base.qcow2", "top.qcow2", "active.qcow2"))
    res = {}
    # QEMU 7.2's writable FUSE export holds the RESIZE permission for good, and the
    # mirror job of an active commit unshares it: QSD can active-commit only under a
    # read-only export (enough when idle).
    writable = not (active and kind == QSD and not load)
    with mount(ctx, kind, chain_dir / "active.qcow2", work, notes, writable) as m:
        q = QMP(m.qmp)
        guest = reader = probe = None
        try:
            if load:
                guest = Load(ctx, m.file, ctx.size, work)
                if not active:
                    reader = Load(ctx, m.file, ctx.size, work, mode="read")
                time.sleep(1.2)
            args = {"job-id": JOB, "base": base}
            if m.device:
                args["device"] = m.device
            if not active:
                args["top"] = top
            elif kind == OURS:
                args["top"] = act
            q.clear()
            t0 = time.monotonic()
            try:
                q.cmd("block-commit", args)
            except QMPError as e:
                if kind == QSD and active and "Permission conflict" in str(e) and "resize" in str(e):
                    raise NA("QEMU 7.2 cannot: its writable FUSE export holds the RESIZE "
                             "permission, which the active commit's mirror job unshares "
                             "(block-commit: Permission conflict ... 'resize')") from None
                raise
            if reader is not None:
                probe = QueryProbe(m.qmp)
            if active:
                _, t_ready = q.wait_event({"BLOCK_JOB_READY"}, JOB)
                t_cs = time.monotonic()
                q.cmd("block-job-complete", {"device": JOB})
                res["ready"] = t_ready - t0
            ev, t1 = q.wait_event({"BLOCK_JOB_COMPLETED"}, JOB)
            if (ev.get("data") or {}).get("error"):
                raise NA(f"job failed: {ev['data']['error']}")
            res["done"] = t1 - t0
            res["len"] = (ev.get("data") or {}).get("len")
            if probe is not None:
                res["query_max"] = probe.finish()
                probe = None
            if reader is not None:
                rts, summary = reader.finish()
                reader = None
                if summary["errors"]:
                    notes.add(f"{kind}: the guest reader saw {summary['errors']} read errors "
                              f"({summary['last_error']})")
                lat = latencies(rts, t0, t1)
                res["read_p99"] = percentile(lat, 99)
                res["read_max"] = lat[-1] if lat else None
            if guest is not None:
                time.sleep(0.3)
                ts, summary = guest.finish()
                guest = None
                if summary["errors"]:
                    notes.add(f"{kind}: the guest writer saw {summary['errors']} write errors "
                              f"({summary['last_error']})")
                idle_a, idle_b = t0 - 1.0, t0
                res["iops_idle"] = rate(ts, idle_a, idle_b)
                res["iops_job"] = rate(ts, t0, t1)
                res["stall_job"] = longest_gap(ts, t0, t1)
                res["stall_idle"] = longest_gap(ts, idle_a + 0.05, idle_b - 0.05)
                if active:
                    res["stall_pivot"] = longest_gap(ts, t_cs, t1)
                    res["iops_sync"] = rate(ts, t0, t_ready)
            nodes = q.cmd("query-named-block-nodes") if kind == OURS else None
            if nodes is not None:
                want = 1 if active else 2
                if len(nodes) != want:
                    notes.add(f"ours: after the job the mount reports {len(nodes)} images, "
                              f"expected {want}")
        finally:
            for p in (guest, reader):
                if p is not None:
                    p.kill()
            if probe is not None:
                probe.finish()
            q.close()
    return res


def live_rows(ctx, sec, notes, *, active):
    d = pristine(ctx)
    runs = ctx.tmp / ("active" if active else "commit")
    label = "active" if active else "live"
    figures = ("ready", "done", "iops_idle", "iops_job", "stall_job", "stall_idle",
               "stall_pivot", "iops_sync", "len", "query_max", "read_p99", "read_max")
    s = {(kind, load): {f: [] for f in figures} for kind in (OURS, QSD) for load in (False, True)}
    na = {}
    for r in range(ctx.commit_rounds):
        order = (OURS, QSD) if r % 2 == 0 else (QSD, OURS)
        for load in (False, True):
            say(f"{label} commit: round {r + 1}/{ctx.commit_rounds}, "
                f"{'under load' if load else 'idle'} ({' then '.join(order)})")
            for kind in order:
                key = (kind, load)
                if key in na:
                    continue
                chain_dir = copy_chain(d, runs / kind / "chain")
                try:
                    res = live_commit_run(ctx, kind, chain_dir, runs / kind / "run",
                                          active=active, load=load, notes=notes)
                    for f, v in res.items():
                        s[key][f].append(v)
                    if r == 0 and not load:
                        _check_after(kind, chain_dir, active, notes)
                except NA as e:
                    na[key] = str(e)
                    say(f"  {kind} {'load' if load else 'idle'}: n/a: {e}")
                finally:
                    shutil.rmtree(chain_dir, ignore_errors=True)

    def v(kind, load, f, scale=1.0):
        if (kind, load) in na:
            return na_text(na[(kind, load)])
        m = median(s[(kind, load)][f])
        return m * scale if m is not None else None

    def pct(kind, load, f="iops_job"):
        if (kind, load) in na:
            return na_text(na[(kind, load)])
        xs = [j / i for j, i in zip(s[(kind, load)][f], s[(kind, load)]["iops_idle"]) if i and j is not None]
        return 100 * median(xs) if xs else None

    both = lambda f, load, scale=1.0: (v(OURS, load, f, scale), v(QSD, load, f, scale))  # noqa: E731
    if not active:
        sec.row("live commit (base, top] into base, idle", "s", *both("done", False),
                better="lower", goal=("rel", 1), samples=_samples(s, "done", False))
        sec.row("live commit, under 4 KiB random-write load", "s", *both("done", True),
                better="lower", goal=("rel", 1), samples=_samples(s, "done", True))
        sec.row("guest 4 KiB write IOPS, idle (the second before the job)", "IOPS",
                *both("iops_idle", True), goal=(), samples=_samples(s, "iops_idle", True))
        sec.row("guest 4 KiB write IOPS during the job", "IOPS", *both("iops_job", True),
                goal=("rel", 1), samples=_samples(s, "iops_job", True))
        sec.row("  during the job / idle", "%", pct(OURS, True), pct(QSD, True),
                goal=("abs", 70))
        sec.row("longest guest write stall during the job (switch-over included)", "ms",
                *both("stall_job", True, 1000), better="lower", goal=("abs", 10),
                samples=_samples(s, "stall_job", True))
        sec.row("  longest write stall in the idle second before (noise floor)", "ms",
                *both("stall_idle", True, 1000), better="lower", goal=())
        sec.row("guest 4 KiB read latency during the job, p99", "ms",
                *both("read_p99", True, 1000), better="lower", goal=("rel", 1),
                samples=_samples(s, "read_p99", True))
        sec.row("guest 4 KiB read latency during the job, max", "ms",
                *both("read_max", True, 1000), better="lower", goal=("rel", 1),
                samples=_samples(s, "read_max", True))
        sec.row("longest wait for query-block-jobs during the job", "ms",
                *both("query_max", True, 1000), better="lower", goal=("abs", 1000),
                samples=_samples(s, "query_max", True))
    else:
        sec.row("active commit: block-commit to READY, idle", "s", *both("ready", False),
                better="lower", goal=("rel", 1), samples=_samples(s, "ready", False))
        sec.row("active commit: block-commit to COMPLETED, idle", "s", *both("done", False),
                better="lower", goal=("rel", 1), samples=_samples(s, "done", False))
        sec.row("active commit: to READY under 4 KiB random-write load", "s",
                *both("ready", True), better="lower", goal=("rel", 1),
                samples=_samples(s, "ready", True))
        sec.row("active commit: to COMPLETED under load", "s", *both("done", True),
                better="lower", goal=("rel", 1), samples=_samples(s, "done", True))
        sec.row("guest 4 KiB write IOPS, idle (the second before the job)", "IOPS",
                *both("iops_idle", True), goal=(), samples=_samples(s, "iops_idle", True))
        sec.row("guest write IOPS during the job", "IOPS", *both("iops_job", True),
                goal=("rel", 1), samples=_samples(s, "iops_job", True))
        sec.row("  during the job / idle", "%", pct(OURS, True), pct(QSD, True),
                goal=("rel", 1))
        sec.row("longest write stall around the pivot (complete to COMPLETED)", "ms",
                *both("stall_pivot", True, 1000), better="lower", goal=("abs", 10),
                samples=_samples(s, "stall_pivot", True))
        sec.row("longest write stall during the whole job", "ms", *both("stall_job", True, 1000),
                better="lower", goal=("abs", 10), samples=_samples(s, "stall_job", True))
        sec.row("  longest write stall in the idle second before (noise floor)", "ms",
                *both("stall_idle", True, 1000), better="lower", goal=())
    lens = {kind: median(s[(kind, False)]["len"]) for kind in (OURS, QSD)}
    sec.notes.append(
        f"{ctx.commit_rounds} rounds alternating who goes first, a fresh copy of the chain "
        f"(then sync) per run; block-commit over QMP with the same client (qemu.qmp) for "
        f"both; times from sending block-commit to the event's arrival"
        + ("; block-job-complete sent as soon as BLOCK_JOB_READY arrives" if active else "")
        + f"; job len: ours {fmt_num(lens[OURS] / M if lens[OURS] else None)} MiB, QSD "
          f"{fmt_num(lens[QSD] / M if lens[QSD] else None)} MiB")
    if active:
        sec.notes.append("QSD's idle active commit runs under a read-only FUSE export (QEMU "
                         "7.2 refuses the mirror job under a writable one, see its n/a)")
    sec.notes.append(f"guest load: Python, 4 KiB O_DIRECT random pwrite at QD1 on CPU "
                     f"{ctx.client_cpu} (servers on CPU {ctx.server_cpu}), started 1.2 s "
                     "before the job; stall = longest gap between two write completions "
                     "overlapping the window"
                     + ("" if active else "; beside it a 4 KiB O_DIRECT random reader at "
                        "QD1 (read latency = gap between its completions) and a second "
                        "QMP client asking query-block-jobs every 20 ms"))


def _samples(s, f, load):
    return {OURS: s[(OURS, load)][f], QSD: s[(QSD, load)][f]}


def _check_after(kind, chain_dir, active, notes):
    """After the first idle run: the reduced chain and a clean qemu-img check."""
    img = chain_dir / ("base.qcow2" if active else "active.qcow2")
    cp = qemu_img("info", "-U", "--backing-chain", "--output=json", img, check=False)
    if cp.returncode == 0:
        n = len(json.loads(cp.stdout))
        want = 1 if active else 2
        if n != want:
            notes.add(f"{kind}: after the job, {img.name}'s chain has {n} images, expected {want}")
    for name in ("base.qcow2", "active.qcow2"):
        cp = qemu_img("check", "-q", chain_dir / name, check=False)
        if cp.returncode != 0:
            notes.add(f"{kind}: qemu-img check {name} after the job: exit {cp.returncode} "
                      f"{_last_line(cp.stderr or cp.stdout)}")


# ----------------------------------------------------------------------------- 5. active

def section_active(ctx, sec):
    live_rows(ctx, sec, Notes(sec), active=True)


# ----------------------------------------------------------------------------- 6. guard

def section_guard(ctx, sec):
    try:
        from bench_guard import scan_benchmark
    except ImportError as e:
        raise NA(f"scripts/bench_guard.py: {e}")
    n = 200 if ctx.quick else 2000
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        best = scan_benchmark(n)
    line = buf.getvalue().strip()
    sec.row(f"stranding guard scan of a directory of {n:,} small qcow2 files (best)", "ms",
            best * 1000 if best is not None else "n/a: the scan found the wrong dependants",
            None, better="lower", goal=("abs", 1000), note=line)


# ----------------------------------------------------------------------------- main

SECTION_INFO = {
    "reader": (section_reader, "1. reader (issue 2)", "qemu-img"),
    "writer": (section_writer, "2. writer (issue 3)", "qemu-img bench"),
    "mount": (section_mount, "3. mount (issue 4): qcowfs mount vs qemu-storage-daemon FUSE export",
              "QSD"),
    "commit": (section_commit, "4. commit (issue 5): offline and live commit of (base, top]",
               "QEMU (qemu-img / QSD)"),
    "active": (section_active, "5. active commit with pivot (issue 6)", "QSD"),
    "guard": (section_guard, "6. stranding guard (issue 7)", "-"),
}


def parse_size(text):
    t = text.strip().upper().replace("IB", "").rstrip("B")
    mult = {"K": K, "M": M, "G": G, "T": T}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" else t
    size = int(float(num) * mult)
    if size <= 0 or size % CLUSTER:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive multiple of 64 KiB")
    return size


def header(ctx):
    st = chain_stats(ctx.size)
    qv = run(["qemu-img", "--version"], check=False).stdout.splitlines()[:1]
    fv = run(["fio", "--version"], check=False).stdout.strip()
    return {
        "chain": f"base <- mid <- top <- active, {ctx.size / G:g} GiB, 64 KiB clusters; flat "
                 f"view {st['top']:.0%} top / {st['mid']:.0%} mid / {st['base']:.0%} base; "
                 f"{st['to_commit'] / M:.0f} MiB allocated in (base, top] (mid "
                 f"{st['mid_allocated'] / M:.0f} MiB, top {st['top_allocated'] / M:.0f} MiB)",
        "host": f"{platform.node()}: {len(os.sched_getaffinity(0))} CPUs, kernel "
                f"{platform.release()}, Python {platform.python_version()}, "
                f"{qv[0] if qv else 'qemu-img ?'}, {fv}",
        "tmpdir": f"{ctx.tmp} ({fs_type(ctx.tmp)})",
        "pinning": (f"servers/offline tools on CPU {ctx.server_cpu}, clients on CPU "
                    f"{ctx.client_cpu}" if ctx.taskset else "taskset missing: not pinned"),
        "rounds": f"{ctx.rounds} (commit sections {ctx.commit_rounds}); medians",
        "load": f"load average at start {loadavg()} (other work on the machine skews "
                "absolute figures; the ratios are what to compare)",
    }


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cleanup(ctx):
    for p in list(ctx.procs):
        with contextlib.suppress(Exception):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for path in list(ctx.mounts):
        lazy_unmount(path)
    # anything still mounted below our temporary directory
    try:
        with open("/proc/self/mountinfo") as f:
            stale = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(ctx.tmp))]
    except OSError:
        stale = []
    for path in stale:
        lazy_unmount(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None,
                   help="virtual size of the test chain (default 1 GiB; --quick: 128 MiB)")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON on stdout (tables go to stderr)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 5)")
    p.add_argument("--commit-rounds", type=int, default=None,
                   help="rounds of the commit sections (default 3)")
    p.add_argument("--runtime", type=int, default=None,
                   help="seconds per time-based fio run (default 3)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--tmpdir", default=None, help="where to build the chains")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 128 * M if args.quick else G
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.commit_rounds is None:
        args.commit_rounds = 1 if args.quick else 3
    if args.runtime is None:
        args.runtime = 1 if args.quick else 3
    sections = [s for s in SECTIONS if not args.only or s in args.only]

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)

    tmp = tempfile.mkdtemp(prefix="qcowfs-bench-", dir=args.tmpdir)
    ctx = Ctx(args, os.path.realpath(tmp))
    out = sys.stderr if args.json else sys.stdout
    results = {"header": header(ctx), "sections": {}}
    rc = 0
    try:
        for k, v in results["header"].items():
            print(f"{k}: {v}", file=out, flush=True)
        for name in sections:
            fn, title, vs = SECTION_INFO[name]
            sec = Section(name, title, vs)
            t = time.monotonic()
            say(f"section {name} ...")
            try:
                fn(ctx, sec)
            except NA as e:
                sec.na = str(e)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                sec.na = f"the benchmark itself failed: {type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
                rc = 1
            finally:
                cleanup(ctx)
            sec.seconds = time.monotonic() - t
            sec.load = loadavg()
            results["sections"][name] = sec.to_json()
            print("\n" + render(sec), file=out, flush=True)
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        rc = 130
    finally:
        cleanup(ctx)
        if args.keep:
            say(f"kept {ctx.tmp}")
        else:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
