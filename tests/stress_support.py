"""Guest load and hang detection for the concurrent stress tests.

`GuestLoad` plays a guest on MOUNT/disk.raw while a job runs: O_DIRECT 4 KiB random
readers (with the odd 64 KiB and 1 MiB read, which the mount serves in worker threads),
O_DIRECT 4 KiB random writers and one buffered writer. The disk is cut into 4 KiB
blocks dealt round-robin to four owners: class 0 is never written, classes 1-2 belong
to the O_DIRECT writers, class 3 to the buffered writer. A writer updates the model
under its class's lock, and a reader compares under the same lock, so every read of
every block is checked against the model while the job runs.

`HangWatch` fails a test with the daemon's thread dump (SIGUSR1 -> faulthandler into
its log) when a guest request, `query-block-jobs`, or the job itself does not finish
within its limit; then it kills the daemon so that blocked guest threads get ENOTCONN
instead of hanging the test run.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import threading
import time

BLOCK = 4096
CLASSES = 4
REQUEST_LIMIT = 60.0  # a guest request in flight longer than this is a hang
QUERY_LIMIT = 1.0  # query-block-jobs must answer within this (issue contract)


class _Op:
    """The request a guest thread has in flight (for the hang watch)."""

    def __init__(self):
        self.what = None
        self.since = None

    def start(self, what):
        self.what, self.since = what, time.monotonic()

    def done(self):
        self.since = None


class GuestLoad:
    def __init__(self, disk, model: bytearray, seed=0, readers=2, direct_writers=2, pause=0.0):
        self.disk = str(disk)
        self.model = model
        self.nblocks = len(model) // BLOCK
        self.locks = [threading.Lock() for _ in range(CLASSES)]
        self.stop_flag = threading.Event()
        self.errors = []
        self.counts = {"reads": 0, "writes": 0, "checked": 0}
        self.pause = pause
        self.threads = []
        self.ops = []
        rnd = random.Random(seed)
        for i in range(readers):
            self._spawn(self._reader, rnd.randrange(1 << 30), f"reader{i}")
        for k in range(direct_writers):
            self._spawn(self._direct_writer, rnd.randrange(1 << 30), f"dwriter{k}", 1 + k)
        self._spawn(self._buffered_writer, rnd.randrange(1 << 30), "bwriter", 3)

    def _spawn(self, fn, seed, name, *args):
        op = _Op()
        self.ops.append((name, op))
        t = threading.Thread(target=self._guard, args=(fn, seed, op) + args, name=name, daemon=True)
        self.threads.append(t)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def _guard(self, fn, seed, op, *args):
        try:
            fn(random.Random(seed), op, *args)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.errors.append(f"{threading.current_thread().name}: {e!r}")
            self.stop_flag.set()

    def _block_of_class(self, rnd, cls):
        b = rnd.randrange(0, self.nblocks // CLASSES) * CLASSES + cls
        return min(b, self.nblocks - CLASSES + cls)

    # -- the guest's threads ---------------------------------------------------------

    def _reader(self, rnd, op):
        buf = mmap.mmap(-1, 1 << 20)
        fd = os.open(self.disk, os.O_RDONLY | os.O_DIRECT)
        try:
            while not self.stop_flag.is_set():
                size = rnd.choice([BLOCK] * 14 + [64 << 10, 1 << 20])
                off = rnd.randrange(0, len(self.model) - size + 1) // BLOCK * BLOCK
                view = memoryview(buf)[:size]
                first, last = off // BLOCK, (off + size - 1) // BLOCK
                classes = {b % CLASSES for b in range(first, last + 1)}
                locks = [self.locks[c] for c in sorted(classes)]
                for lock in locks:
                    lock.acquire()
                try:
                    op.start(f"read {off}+{size}")
                    n = os.preadv(fd, [view], off)
                    op.done()
                    want = self.model[off : off + size]
                    if n != size or view[:n] != want:
                        bad = next(i for i in range(n) if view[i] != want[i]) if n == size else n
                        raise AssertionError(
                            f"read at {off}+{size} differs from the model at byte {off + bad}"
                        )
                finally:
                    for lock in locks:
                        lock.release()
                self.counts["reads"] += 1
                self.counts["checked"] += size
                if self.pause:
                    time.sleep(self.pause)
        finally:
            os.close(fd)

    def _direct_writer(self, rnd, op, cls):
        self._writer(rnd, op, cls, direct=True)

    def _buffered_writer(self, rnd, op, cls):
        self._writer(rnd, op, cls, direct=False)

    def _writer(self, rnd, op, cls, direct):
        """Random 4 KiB writes to the blocks of class `cls`, the model updated under its
        lock; a buffered writer reads each block back through the page cache."""
        how = "O_DIRECT" if direct else "buffered"
        buf = mmap.mmap(-1, BLOCK)
        fd = os.open(self.disk, os.O_RDWR | (os.O_DIRECT if direct else 0))
        try:
            while not self.stop_flag.is_set():
                off = self._block_of_class(rnd, cls) * BLOCK
                data = rnd.randbytes(BLOCK)
                buf[:] = data
                with self.locks[cls]:
                    op.start(f"{how} write {off}")
                    n = os.pwrite(fd, buf, off)
                    op.done()
                    assert n == BLOCK, n
                    self.model[off : off + BLOCK] = data
                    if not direct:
                        op.start(f"buffered read {off}")
                        got = os.pread(fd, BLOCK, off)
                        op.done()
                        assert got == data, f"buffered read-back at {off} differs"
                self.counts["writes"] += 1
                if rnd.random() < 0.05:
                    op.start("fdatasync")
                    os.fdatasync(fd)
                    op.done()
                if self.pause:
                    time.sleep(self.pause)
        finally:
            os.close(fd)

    # -- ending ------------------------------------------------------------------------

    def stuck(self):
        """(thread, request, seconds) of a request in flight past REQUEST_LIMIT."""
        now = time.monotonic()
        for name, op in self.ops:
            since = op.since
            if since is not None and now - since > REQUEST_LIMIT:
                return name, op.what, now - since
        return None

    def check(self):
        assert not self.errors, self.errors

    def stop(self, timeout=REQUEST_LIMIT + 10):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"guest threads hung: {alive}"
        self.check()
        return self.counts


def scattered_chain(d, size, base_written, writes, seed):
    """base (64 KiB clusters, written over [0, base_written)) <- top (4 KiB clusters,
    `writes` scattered 4 KiB writes) <- an empty active image: the deadlock report's
    layout, where copying into base writes parts of base clusters base does not hold."""
    from qemu_helpers import apply_ops, create

    base = create(str(d / "base.qcow2"), size, cluster_size=64 << 10)
    apply_ops(base, [("w", 0, base_written, 0x11)])
    top = create(str(d / "top.qcow2"), size, backing="base.qcow2", cluster_size=BLOCK)
    rnd = random.Random(seed)
    apply_ops(
        top,
        [
            ("w", b * BLOCK, BLOCK, 0x20 + i % 7)
            for i, b in enumerate(rnd.sample(range(size // BLOCK), writes))
        ],
    )
    active = create(str(d / "active.qcow2"), size, backing="top.qcow2")
    return base, top, active


class HangWatch:
    """Polls query-block-jobs (its own QMP client) and the guest's requests; a hang
    becomes a failure carrying the daemon's thread dump."""

    def __init__(self, mount, qmp_factory, load: GuestLoad | None):
        self.mount = mount
        self.load = load
        self.qmp = qmp_factory()
        self.max_query = 0.0
        self.queries = 0
        self.jobs_seen = []
        self.failure = None
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="hangwatch")

    def start(self):
        self.thread.start()
        return self

    def _run(self):
        try:
            while not self.stop_flag.wait(0.1):
                t0 = time.monotonic()
                jobs = self.qmp.execute("query-block-jobs")
                dt = time.monotonic() - t0
                self.queries += 1
                self.max_query = max(self.max_query, dt)
                if jobs:
                    self.jobs_seen.append(jobs[0].get("status"))
                if dt > QUERY_LIMIT:
                    self.fail(f"query-block-jobs took {dt:.2f} s")
                    return
                stuck = self.load.stuck() if self.load else None
                if stuck:
                    self.fail(f"guest {stuck[0]}: {stuck[1]} in flight for {stuck[2]:.0f} s")
                    return
        except Exception as e:  # noqa: BLE001 - the daemon died or hung
            self.fail(f"query-block-jobs failed: {e!r}")

    def fail(self, why):
        if self.failure is None:
            self.failure = f"{why}\n{dump_daemon(self.mount)}"
            if self.load is not None:
                self.load.stop_flag.set()

    def stop(self):
        self.stop_flag.set()
        self.thread.join(30)
        try:
            self.qmp.close()
        except Exception:  # noqa: BLE001
            pass


def dump_daemon(mount) -> str:
    """Ask the daemon for every thread's stack (SIGUSR1), then kill it so that nothing
    stays blocked on the mount; returns the tail of its log."""
    try:
        pid = mount.daemon_pid()
    except Exception:  # noqa: BLE001
        pid = None
    if pid:
        try:
            os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return "daemon log (tail):\n" + mount.log()[-20000:]
    except Exception as e:  # noqa: BLE001
        return f"(no daemon log: {e!r})"
