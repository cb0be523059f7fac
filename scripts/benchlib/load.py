"""Load on a mounted chain while a job runs, and what it saw: the guest (4 KiB O_DIRECT
random writes or reads at QD1 by programs/guest_io.py, a completion stamp each), a
second QMP client asking query-block-jobs, and the figures taken from the stamps."""

import array
import bisect
import json
import subprocess
import threading
import time

from .harness import NA, ROOT, last_line
from .servers import QMP


class Load:
    """The guest: 4 KiB O_DIRECT random pwrites (or preads) at QD1 on the client CPU,
    with a completion time stamp each."""

    def __init__(self, ctx, path, size, work, mode="write"):
        self.ctx = ctx
        self.out = work / f"load-{mode}.stamps"
        self.stop_file = work / f"load-{mode}.stop"
        self.stop_file.unlink(missing_ok=True)
        self.out.unlink(missing_ok=True)
        argv = ctx.pin(
            ctx.program("guest_io", path, size, self.out, self.stop_file, 42, mode), ctx.client_cpu
        )
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        ctx.procs.add(self.proc)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.wait()
            raise NA(f"guest writer did not start: {last_line(self.proc.stderr.read())}")
        self.started = time.monotonic()

    def finish(self):
        """Stop; the array of completion stamps and the writer's summary."""
        self.stop_file.touch()
        try:
            so, se = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            so, se = self.proc.communicate()
        self.ctx.procs.discard(self.proc)
        if self.proc.returncode != 0:
            raise NA(f"guest writer failed: {last_line(se)}")
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
        self.path = path
        self.waits = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        # The client is made in this thread: qemu.qmp's legacy client runs the asyncio
        # loop of the thread that made it, and the main thread's loop is busy there.
        try:
            q = QMP(self.path)
        except NA:
            return
        try:
            while not self._stop.wait(0.02):
                t = time.monotonic()
                try:
                    q.cmd("query-block-jobs")
                except Exception:  # noqa: BLE001 - the mount went away
                    return
                self.waits.append(time.monotonic() - t)
        finally:
            q.close()

    def finish(self):
        self._stop.set()
        self._thread.join(60)
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
