"""What every section shares: the run's options (Ctx), running and timing processes
pinned to a CPU, the figures of a section (Section, Row) and their table."""

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from qcow.mountinfo import mounts

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = "scripts.benchlib.programs"

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CLUSTER = 64 * K
OURS, QSD = "ours", "qsd"


class NA(Exception):
    """A figure that cannot be measured (a feature that does not work yet, a tool
    missing): shown as "n/a: <reason>"."""


T0 = time.monotonic()


def say(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- processes


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
        self.qcowfs = (
            [str(venv_qcowfs)] if venv_qcowfs.exists() else [sys.executable, "-m", "fusefs"]
        )
        self.procs = set()  # Popen objects still to reap on the way out
        self.mounts = set()  # paths that may hold a FUSE mount of ours or QSD's
        self._pristine = None
        self._big = None

    def pin(self, argv, cpu):
        if cpu is None or not self.taskset:
            return list(map(str, argv))
        return [self.taskset, "-c", str(cpu), *map(str, argv)]

    def program(self, name, *args):
        """argv running one of the measured programs (scripts/benchlib/programs/) with
        this interpreter; run it with cwd=ROOT, so the project is importable."""
        return [self.python, "-m", f"{PROGRAMS}.{name}", *map(str, args)]


def last_line(text):
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def run(argv, *, check=True, timeout=600, cwd=None, input=None):
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise NA(  # noqa: B904  (the timeout is the whole story)
            f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''}: timed out after {timeout} s"
        )
    except FileNotFoundError:
        raise NA(f"{argv[0]}: not installed") from None
    if check and cp.returncode != 0:
        name = " ".join(Path(a).name for a in argv[:3] if not a.startswith("-"))
        raise NA(f"{name}: exit {cp.returncode}: {last_line(cp.stderr) or last_line(cp.stdout)}")
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
        raise NA(
            f"{Path(argv[3] if argv[0] == ctx.taskset else argv[0]).name}: exit "
            f"{p.returncode}: {last_line(se) or last_line(so)}"
        )
    return wall, ru.ru_maxrss * 1024, so, se


def py_json(ctx, name, *args, cpu=None, timeout=900):
    """Run the measured program `name` (it prints one JSON object last); returns (that
    object, wall, peak RSS)."""
    wall, rss, so, _ = timed(ctx, ctx.program(name, *args), cpu=cpu, timeout=timeout, cwd=ROOT)
    return json.loads(so.strip().splitlines()[-1]), wall, rss


def qemu_img(*args, **kw):
    return run(["qemu-img", *args], **kw)


def qemu_io(img, cmds, fmt="qcow2"):
    """qemu-io commands in batches (ARG_MAX)."""
    for i in range(0, len(cmds), 2000):
        argv = ["qemu-io", "-f", fmt]
        for c in cmds[i : i + 2000]:
            argv += ["-c", c]
        run(argv + [str(img)], timeout=1800)


def qemu_img_bench(ctx, image, *options, cpu=None):
    """`qemu-img bench -f qcow2 OPTIONS IMAGE`: (wall seconds, its own loop seconds)."""
    argv = ["qemu-img", "bench", "-f", "qcow2", *options, image]
    wall, _, so, _ = timed(ctx, argv, cpu=cpu)
    return wall, bench_seconds(so)


def bench_seconds(text):
    """The loop time `qemu-img bench` prints ("Run completed in N seconds.")."""
    for line in text.splitlines():
        if line.startswith("Run completed in"):
            return float(line.split()[3])
    return None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ms(v):
    return v * 1000 if isinstance(v, (int, float)) else v


def attempt(fn, na, key):
    """fn(); an NA it raises is kept in na[key] (and said) instead."""
    try:
        fn()
    except NA as e:
        na[key] = str(e)
        say(f"  {key}: n/a: {e}")


# ----------------------------------------------------------------------------- the system


def mount_points():
    """(mount point, file system type) of every mount, from /proc/self/mountinfo."""
    return [(m.mount_point, m.fstype) for m in mounts()]


def fs_type(path):
    """File system type holding path (longest mountinfo prefix)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for mnt, fstype in mount_points():
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, fstype
    return kind


def is_mounted(path):
    target = os.path.realpath(path)
    return any(mnt == target for mnt, _ in mount_points())


def lazy_unmount(path):
    if is_mounted(path):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


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


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cleanup(ctx):
    """Kill what is still running and lazily unmount what may still be mounted."""
    for p in list(ctx.procs):
        with contextlib.suppress(Exception):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for path in list(ctx.mounts):
        lazy_unmount(path)
    # anything still mounted below our temporary directory
    for path, _ in mount_points():
        if path.startswith(str(ctx.tmp)):
            lazy_unmount(path)


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    figure: str
    unit: str
    ours: object = None  # number, None (not measured) or "n/a: ..." text
    theirs: object = None
    better: str = "higher"  # "higher" | "lower" | "" (informational)
    goal: tuple = ()  # ("rel", factor) vs theirs, ("abs", limit), ()
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
        return {
            "figure": self.figure,
            "unit": self.unit,
            "ours": self.ours,
            "qemu": self.theirs,
            "ratio": self.ratio,
            "better": self.better,
            "goal": self.goal_text(),
            "ok": self.ok,
            "note": self.note,
            "samples": self.samples,
        }


@dataclass
class Section:
    name: str
    title: str
    vs: str
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    na: str = ""  # the whole section could not run
    seconds: float = 0.0
    load: str = ""  # load average when the section ended

    def row(self, *a, **kw):
        r = Row(*a, **kw)
        self.rows.append(r)
        return r

    def to_json(self):
        return {
            "title": self.title,
            "vs": self.vs,
            "na": self.na or None,
            "seconds": round(self.seconds, 1),
            "loadavg": self.load,
            "rows": [r.to_json() for r in self.rows],
            "notes": self.notes,
        }


class Notes:
    """Deduplicated notes of a section."""

    def __init__(self, section):
        self.section = section

    def add(self, text):
        if text not in self.section.notes:
            self.section.notes.append(text)


def na_text(e):
    return f"n/a: {e}"


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
    out = [
        f"== {section.title} ==  (ours beside {section.vs}; {section.seconds:.0f} s; "
        f"load average {section.load})"
    ]
    if section.na:
        out.append(f"n/a: {section.na}")
        return "\n".join(out)
    head = ("figure", "unit", "ours", section.vs.split()[0], "ours/QEMU", "goal", "")
    rows = [head]
    footnotes = []
    missing = {}  # (who, reason) -> figures
    for r in section.rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        ok = {True: "ok", False: "MISS", None: ""}[r.ok]
        rows.append(
            (r.figure, r.unit, fmt_num(r.ours), fmt_num(r.theirs), ratio, r.goal_text(), ok)
        )
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
        cells += [c.rjust(w) for c, w in zip(row[2:5], widths[2:5], strict=True)]
        cells += [row[5].ljust(widths[5]), row[6]]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths).rstrip())
    out += footnotes
    out += [f"  note: {n}" for n in section.notes]
    return "\n".join(out)
