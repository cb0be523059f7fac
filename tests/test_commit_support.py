"""Helpers shared by the commit tests (test_commit*.py, test_active*.py); no tests here.

Chains are built with qemu-img/qemu-io only and judged with qemu-img (convert, check,
info). `Chain` describes one built chain: its images bottom first, and which of them
a commit works on.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qemu_helpers import (
    K,
    M,
    apply_ops,
    build_case,
    convert_raw,
    create,
    qemu_check,
    qemu_img,
    qemu_info_chain,
)

__all__ = [
    "K",
    "M",
    "Chain",
    "BUILDERS",
    "build",
    "flat",
    "check_images",
    "assert_clean",
    "chain_names",
    "chain_files",
    "node_files",
    "qemu_reference_commit",
    "commit_cli",
    "offline_script",
    "crash_script",
    "SyncQMP",
    "Writer",
    "compare_with_pending",
    "settle_pending_write",
]


@dataclass
class Chain:
    """A built chain. `images` bottom first (absolute paths); `top`/`base` the commit's
    range by default; `overlay` the image just above top."""

    directory: Path
    images: list[str]
    top: str
    base: str
    notes: dict = field(default_factory=dict)

    @property
    def active(self):
        return self.images[-1]

    @property
    def overlay(self):
        return self.images[self.images.index(self.top) + 1]

    def path(self, name):
        return str(self.directory / name)

    def existing(self):
        return [p for p in self.images if os.path.exists(p)]


def flat(image, share=False) -> bytes:
    """The guest's flat view of IMAGE's chain, as QEMU reads it."""
    return convert_raw(image, share=share)


def check_images(paths, allow_leaks=False, share=False):
    """`qemu-img check` of every qcow2 image in PATHS: no corruption; no leaks and no
    errors at all unless allow_leaks (after a crash leaks are allowed)."""
    reports = {}
    for p in paths:
        if not os.path.exists(p) or not _is_qcow2(p):
            continue
        rc, rep = qemu_check(p, share=share)
        assert not rep.get("corruptions"), (p, rc, rep)
        assert not rep.get("check-errors"), (p, rc, rep)
        if allow_leaks:
            assert rc in (0, 3), (p, rc, rep)
        else:
            assert rc == 0 and not rep.get("leaks"), (p, rc, rep)
        reports[p] = rep
    return reports


def assert_clean(chain: Chain, allow_leaks=False):
    return check_images(chain.existing(), allow_leaks=allow_leaks)


def _is_qcow2(path):
    with open(path, "rb") as f:
        return f.read(4) == b"QFI\xfb"


def chain_names(image, share=False):
    """[(basename of filename, backing-filename or None, virtual-size)], top first."""
    return [
        (os.path.basename(i["filename"]), i.get("backing-filename"), i["virtual-size"])
        for i in qemu_info_chain(image, share=share)
    ]


def chain_files(image, share=False):
    """The basenames of the chain's files, top first."""
    return [n for n, _b, _s in chain_names(image, share=share)]


def node_files(nodes):
    """The basenames of query-named-block-nodes' files, top first."""
    return [os.path.basename(n["file"]) for n in nodes]


def qemu_reference_commit(chain: Chain, top=None, base=None):
    """What QEMU makes of the same commit: `qemu-img commit -b BASE TOP`, then the
    management layer's step (QEMU's own commit of a non-active top does not touch the
    overlay's header): an unsafe rebase of top's overlay onto base. Returns the guest
    view afterwards and base's own view."""
    top = top or chain.top
    base = base or chain.base
    overlay = chain.images[chain.images.index(top) + 1]
    qemu_img("commit", "-q", "-b", base, top)
    fmt = "qcow2" if _is_qcow2(base) else "raw"
    qemu_img(
        "rebase",
        "-q",
        "-u",
        "-b",
        os.path.relpath(base, os.path.dirname(overlay)),
        "-F",
        fmt,
        overlay,
    )
    return flat(chain.active), convert_raw(base) if fmt == "qcow2" else Path(base).read_bytes()


def commit_cli(*args, timeout=300):
    """`qcowfs commit ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fusefs", "commit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def offline_script(image, progress_file, kill_after=None, **kw):
    """`python -c` source that runs commit.engine.run_offline(image, **kw) and appends
    every progress report `offset len` (flushed) to progress_file, then 'done'. With
    kill_after, the process SIGKILLs itself once that many bytes have been copied."""
    return (
        "import os, signal\n"
        "from commit.engine import run_offline\n"
        f"f = open({str(progress_file)!r}, 'a', buffering=1)\n"
        "f.write('start\\n')\n"
        "def progress(o, n):\n"
        "    f.write(f'{o} {n}\\n')\n"
        f"    if {kill_after!r} is not None and o >= {kill_after!r}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"run_offline({str(image)!r}, progress=progress, **{kw!r})\n"
        "f.write('done\\n')\n"
    )


# ------------------------------------------------------------------------ chains


def _c(d, name, size, backing=None, fmt="qcow2", **opts):
    return create(str(d / name), size, backing=backing, backing_fmt=fmt, **opts)


def scenario(d):
    """The 2012 design discussion: base[1M] <- mid[2M] <- top[3M] <- active[3M],
    distinct data in every layer, around the 1M and 2M boundaries, the four
    allocation cases, zero clusters over lower data."""
    base = _c(d, "base.qcow2", M)
    apply_ops(base, [("w", 0, M, "base"), ("w", 900 * K, 124 * K, ("rand", "b"))])
    mid = _c(d, "mid.qcow2", 2 * M, "base.qcow2")
    apply_ops(
        mid,
        [
            ("w", M - 32 * K, 64 * K, "mid"),  # across base's end
            ("w", 2 * M - 48 * K, 48 * K, "mid-end"),  # up to mid's end
            ("w", 256 * K, 128 * K, "mid-only"),  # case 2 (mid only) ...
            ("w", 384 * K, 64 * K, "mid-both"),  # case 3 (mid and top)
            ("z", 128 * K, 64 * K),  # zero cluster over base data
            ("w", 1536 * K + 5, 3000, 0x4D),  # unaligned, past base's end
        ],
    )
    top = _c(d, "top.qcow2", 3 * M, "mid.qcow2")
    apply_ops(
        top,
        [
            ("w", 384 * K, 64 * K, "top-both"),  # case 3
            ("w", 512 * K, 64 * K, "top-only"),  # case 4 (top only, over base)
            ("z", 320 * K, 64 * K),  # zero over mid data
            ("w", M - 8 * K, 16 * K, "top-1M"),  # across 1M
            ("w", 2 * M - 16 * K, 32 * K, "top-2M"),  # across 2M (mid's end)
            ("w", 3 * M - 64 * K, 64 * K, ("rand", "t")),
            ("w", 2 * M + 256 * K, 1000, 0x54),  # past mid's end, unaligned
        ],
    )
    active = _c(d, "active.qcow2", 3 * M, "top.qcow2")
    apply_ops(
        active,
        [
            ("w", 2 * M - 4 * K, 8 * K, "active"),
            ("w", 700 * K, 4 * K, 0x41),
            ("z", 2 * M + 512 * K, 64 * K),
        ],
    )
    return Chain(d, [base, mid, top, active], top, base)


def scenario_mid(d):
    c = scenario(d)
    c.top = c.images[1]
    return c


def short_intermediate4(d):
    """base 4M (data everywhere) <- mid 1M <- top 4M <- active 4M: [1M,4M) reads zeros
    wherever top has nothing; a commit of top must write them into base."""
    base = _c(d, "base.qcow2", 4 * M)
    apply_ops(base, [("w", 0, 4 * M, "base")])
    mid = _c(d, "mid.qcow2", M, "base.qcow2")
    apply_ops(mid, [("w", M - 64 * K, 64 * K, "mid"), ("w", 100 * K, 4 * K, 0x4D)])
    top = _c(d, "top.qcow2", 4 * M, "mid.qcow2")
    apply_ops(top, [("w", 2 * M, 64 * K, "top"), ("w", M - 4 * K, 8 * K, 0x54)])
    active = _c(d, "active.qcow2", 4 * M, "top.qcow2")
    apply_ops(active, [("w", 3 * M, 4 * K, 0x41)])
    return Chain(d, [base, mid, top, active], top, base)


def top_larger_095(d):
    """QEMU iotest 095's shape: base 1M <- snp1 16M <- active 16M, commit snp1."""
    base = _c(d, "base.qcow2", M)
    apply_ops(base, [("w", 0, M, "base")])
    snp = _c(d, "snp1.qcow2", 16 * M, "base.qcow2")
    apply_ops(snp, [("w", 512 * K, M, "snp1"), ("w", 15 * M, 64 * K, 0x5E)])
    active = _c(d, "active.qcow2", 16 * M, "snp1.qcow2")
    apply_ops(active, [("w", 15 * M + 32 * K, 4 * K, 0x41)])
    return Chain(d, [base, snp, active], snp, base)


def compressed_mid(d):
    base = _c(d, "base.qcow2", 4 * M)
    apply_ops(base, [("w", 0, 4 * M, "base")])
    mid = _c(d, "mid.qcow2", 4 * M, "base.qcow2", compression_type="zstd")
    apply_ops(
        mid,
        [
            ("c", 0, M, "mid-comp"),
            ("c", 2 * M, 256 * K, 0x00),
            ("c", 3 * M, 128 * K, ("rand", "m")),
            ("w", M + 4 * K, 8 * K, 0x4D),
        ],
    )
    top = _c(d, "top.qcow2", 4 * M, "mid.qcow2")
    apply_ops(
        top,
        [
            ("w", 100 * K + 3, 1000, 0x54),  # partial over a compressed one
            ("c", 2 * M + 64 * K, 64 * K, "top-comp"),
        ],
    )
    active = _c(d, "active.qcow2", 4 * M, "top.qcow2")
    return Chain(d, [base, mid, top, active], top, base)


def extended_l2_chain(d):
    """Extended L2 in base and mid (subcluster writes), a standard top over them."""
    base = _c(d, "base.qcow2", 4 * M, cluster_size=64 * K, extended_l2="on")
    apply_ops(base, [("w", 0, 2 * M, "base"), ("w", 3 * M + 2 * K, 2 * K, 0x42)])
    mid = _c(d, "mid.qcow2", 4 * M, "base.qcow2", cluster_size=32 * K, extended_l2="on")
    apply_ops(
        mid,
        [
            ("w", 4 * K, 2 * K, 0x4D),
            ("w", 33 * K, 3 * K, "mid"),
            ("z", 40 * K, 2 * K),
            ("zu", M, 12 * K),
            ("w", 3 * M + 64 * K, 1024, 0x4E),
        ],
    )
    top = _c(d, "top.qcow2", 4 * M, "mid.qcow2", cluster_size=16 * K, extended_l2="on")
    apply_ops(top, [("w", 5 * K, 1536, 0x54), ("w", 2 * M - K, 2 * K, "top"), ("z", 3 * M, 1024)])
    active = _c(d, "active.qcow2", 4 * M, "top.qcow2")
    apply_ops(active, [("w", 6 * K, 512, 0x41)])
    return Chain(d, [base, mid, top, active], top, base)


def mixed_clusters(d):
    """A different cluster size in every layer: 2M, 512, 4K, 64K."""
    base = _c(d, "base.qcow2", 6 * M, cluster_size=2 * M)
    apply_ops(base, [("w", 0, 6 * M, "base")])
    mid = _c(d, "mid.qcow2", 6 * M, "base.qcow2", cluster_size=512)
    apply_ops(
        mid, [("w", 2 * M - 700, 1400, "mid"), ("z", 4 * M, 64 * K), ("w", 5 * M + 1, 10, 0x4D)]
    )
    top = _c(d, "top.qcow2", 6 * M, "mid.qcow2", cluster_size=4 * K)
    apply_ops(top, [("w", 17, 100, 0x54), ("w", 4 * M + 4 * K, 4 * K, "top"), ("z", M, 12 * K)])
    active = _c(d, "active.qcow2", 6 * M, "top.qcow2")
    return Chain(d, [base, mid, top, active], top, base)


def empty_base(d):
    """A freshly created (empty) base: the commit's first write allocates base's first
    L2 table at the end of the file."""
    base = _c(d, "base.qcow2", 8 * M)
    mid = _c(d, "mid.qcow2", 8 * M, "base.qcow2")
    apply_ops(mid, [("w", 0, M, "mid"), ("w", 5 * M, 256 * K, ("rand", "m"))])
    top = _c(d, "top.qcow2", 8 * M, "mid.qcow2")
    apply_ops(top, [("w", 512 * K, 128 * K, "top")])
    active = _c(d, "active.qcow2", 8 * M, "top.qcow2")
    return Chain(d, [base, mid, top, active], top, base)


def new_l2_regions(d):
    """4 KiB clusters in base (one L2 table covers 2 MiB): the commit fills regions of
    base that have no L2 table yet."""
    base = _c(d, "base.qcow2", 8 * M, cluster_size=4 * K)
    apply_ops(base, [("w", 0, 64 * K, "base")])
    top = _c(d, "top.qcow2", 8 * M, "base.qcow2")
    apply_ops(top, [("w", 3 * M, M, "top"), ("w", 6 * M - 8 * K, 16 * K, 0x54)])
    active = _c(d, "active.qcow2", 8 * M, "top.qcow2")
    return Chain(d, [base, top, active], top, base)


def zeros_into_new_l2(d):
    """The commit's last write into base is a zero write into a region of base that has
    no L2 table yet (4 KiB clusters: one L2 table covers 2 MiB): the new L2 table is
    the last cluster allocated, past the end of base's file until the final flush."""
    base = _c(d, "base.qcow2", 8 * M, cluster_size=4 * K)
    apply_ops(base, [("w", 0, 64 * K, "base")])
    top = _c(d, "top.qcow2", 8 * M, "base.qcow2")
    apply_ops(top, [("w", 64 * K, 64 * K, "top"), ("z", 6 * M, 64 * K)])
    active = _c(d, "active.qcow2", 8 * M, "top.qcow2")
    return Chain(d, [base, top, active], top, base)


def _matrix_plus_active(case):
    """A coverage-matrix case with an empty-ish active overlay added on top (an
    offline commit commits the active image's backing file, never the active one)."""

    def build_it(d):
        top = build_case(case, d)
        info = qemu_info_chain(top)
        images = [
            os.path.abspath(os.path.join(d, i["filename"]))
            if not os.path.isabs(i["filename"])
            else i["filename"]
            for i in info
        ][::-1]
        size = info[0]["virtual-size"]
        active = _c(d, "active.qcow2", size, os.path.basename(top))
        apply_ops(active, [("w", 0, 512, 0x41)])
        images.append(active)
        return Chain(d, images, images[-2], images[0])

    return build_it


def chain4_matrix(d):
    top = build_case("chain4", d)
    images = [str(d / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2", "active.qcow2")]
    assert top == images[-1]
    return Chain(d, images, images[2], images[0])


BUILDERS = {
    "scenario": scenario,
    "scenario_mid": scenario_mid,
    "chain4": chain4_matrix,
    "short_intermediate4": short_intermediate4,
    "top_larger_095": top_larger_095,
    "zero_over_backing": _matrix_plus_active("zero_over_backing"),
    "compressed_mid": compressed_mid,
    "compressed_base": _matrix_plus_active("compressed_zlib"),
    "extended_l2": extended_l2_chain,
    "extended_l2_top": _matrix_plus_active("extended_l2"),
    "raw_base": _matrix_plus_active("raw_base_chain"),
    "mixed_clusters": mixed_clusters,
    "short_unaligned": _matrix_plus_active("short_unaligned"),
    "backing_larger": _matrix_plus_active("backing_larger"),
    "compat010": _matrix_plus_active("compat010"),
    "snapshot_in_base": _matrix_plus_active("refcount16"),
    "empty_base": empty_base,
    "new_l2_regions": new_l2_regions,
    "zeros_into_new_l2": zeros_into_new_l2,
}


def build(name, d) -> Chain:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](d)


# ------------------------------------------------------------------ live helpers


class SyncQMP:
    """The real `qemu.qmp` client (asyncio), driven from plain test code: its event loop
    runs in a thread; every event received is kept (`events`, in order)."""

    def __init__(self, socket_path, timeout=30.0):
        import asyncio
        import threading

        self._asyncio = asyncio
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.events = []
        self._cond = threading.Condition()
        self.client = None
        try:
            self._call(self._connect(str(socket_path)))
        except BaseException:
            self.close()
            raise

    async def _connect(self, path):
        from qemu.qmp import QMPClient

        self.client = QMPClient("qcowfs-tests")
        await self.client.connect(path)
        self._pump = self._asyncio.ensure_future(self._pump_events())

    async def _pump_events(self):
        async for ev in self.client.events:
            with self._cond:
                self.events.append(dict(ev))
                self._cond.notify_all()

    def _call(self, coro, timeout=None):
        fut = self._asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout or self.timeout)

    def execute(self, cmd, args=None):
        return self._call(self.client.execute(cmd, args))

    def error_of(self, cmd, args=None):
        """(error class, description) of a command expected to fail."""
        from qemu.qmp import ExecuteError

        try:
            self.execute(cmd, args)
        except ExecuteError as e:
            return e.error_class, str(e)
        raise AssertionError(f"{cmd} {args} succeeded")

    def wait_event(self, name, timeout=60.0, pred=None, start=0):
        """The first event named NAME (index >= start) satisfying pred."""
        import time as _time

        deadline = _time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[start:]:
                    if ev.get("event") == name and (pred is None or pred(ev.get("data", {}))):
                        return ev
                left = deadline - _time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {name} event within {timeout} s; got "
                        f"{[e.get('event') for e in self.events]}"
                    )
                self._cond.wait(min(left, 0.5))

    def pause_midway(self, job_id):
        """Let the job copy for a second, pause it and wait until it is parked; return its
        (len, offset) then, the offset strictly inside."""
        time.sleep(1.0)
        self.execute("block-job-pause", {"device": job_id})
        self.wait_event("JOB_STATUS_CHANGE", pred=lambda d: d["status"] == "paused")
        (job,) = self.execute("query-block-jobs")
        assert 0 < job["offset"] < job["len"], job
        return job["len"], job["offset"]

    def statuses(self, job_id):
        """The JOB_STATUS_CHANGE statuses of a job, in order."""
        with self._cond:
            return [
                e["data"]["status"]
                for e in self.events
                if e.get("event") == "JOB_STATUS_CHANGE" and e["data"].get("id") == job_id
            ]

    def names(self):
        with self._cond:
            return [e.get("event") for e in self.events]

    async def _shutdown(self):
        pump = getattr(self, "_pump", None)
        if pump is not None:
            pump.cancel()
            try:
                await pump
            except BaseException:  # noqa: BLE001 - cancelled
                pass
        if self.client is not None:
            try:
                await self.client.disconnect()
            except Exception:  # noqa: BLE001 - the daemon may be gone
                pass

    def close(self):
        if self.loop.is_closed():
            return
        try:
            if self.loop.is_running():
                try:
                    self._call(self._shutdown(), timeout=10)
                except Exception:  # noqa: BLE001
                    pass
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Writer:
    """A guest: a thread that pwrite+fsyncs random blocks into the flat file, keeping a
    model (bytearray) of what the disk must hold. Between writes it reads back a random
    sample and compares it with the model. `pending` is the write in progress (issued,
    not yet fsync'd) when the thread stops or fails."""

    def __init__(
        self,
        path,
        model: bytearray,
        seed=0,
        block_sizes=(4096, 16384, 65536),
        pause=0.002,
        sample=256 * 1024,
        regions=None,
    ):
        import random as _random
        import threading

        self.path = str(path)
        self.model = model
        self.rnd = _random.Random(seed)
        self.block_sizes = block_sizes
        self.pause = pause
        self.sample = sample
        self.regions = regions or [(0, len(model))]
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()  # held around a write and its model update
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.writes = 0
        self.samples = 0
        self.error = None
        self.mismatch = None
        self.pending = None  # (off, old bytes, new bytes)
        self.seq = 0

    def start(self):
        self.fd = os.open(self.path, os.O_RDWR)
        self.thread.start()
        return self

    def _one_write(self):
        bs = self.rnd.choice(self.block_sizes)
        lo, hi = self.rnd.choice(self.regions)
        off = self.rnd.randrange(lo, hi - bs + 1) // 4096 * 4096
        self.seq += 1
        data = self.rnd.randbytes(bs)
        with self.lock:
            self.pending = (off, bytes(self.model[off : off + bs]), data)
            n = os.pwrite(self.fd, data, off)
            assert n == bs, n
            os.fsync(self.fd)
            self.model[off : off + bs] = data
            self.pending = None
            self.writes += 1

    def _one_sample(self):
        n = self.sample
        off = self.rnd.randrange(0, len(self.model) - n + 1) // 512 * 512
        with self.lock:
            got = os.pread(self.fd, n, off)
            want = bytes(self.model[off : off + n])
        self.samples += 1
        if got != want:
            self.mismatch = (off, n, _first_diff(got, want))
            raise AssertionError(
                f"sampled read at {off}+{n} differs from the model at {self.mismatch[2]}"
            )

    def _run(self):
        import time as _time

        try:
            while not self.stop_flag.is_set():
                self._one_write()
                self._one_sample()
                if self.pause:
                    _time.sleep(self.pause)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self, expect_error=False):
        self.stop_flag.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "writer thread hung"
        try:
            os.close(self.fd)
        except OSError:
            pass
        if not expect_error and self.error is not None:
            raise AssertionError(
                f"writer failed after {self.writes} writes: {self.error!r}"
            ) from self.error
        return self

    @contextlib.contextmanager
    def quiesce(self):
        """`with writer.quiesce():` the guest writes nothing (no write in flight)."""
        with self.lock:
            yield


def _first_diff(a, b):
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


def compare_with_pending(got: bytes, model: bytearray, pending, sector=512):
    """got == model, except that the write in flight at a crash (pending) may have
    landed, partly or not at all: each sector of it is the old or the new content."""
    if pending is None:
        assert got == model, f"differs from the model at {_first_diff(got, model)}"
        return
    off, old, new = pending
    end = off + len(new)
    assert got[:off] == model[:off], f"differs at {_first_diff(got[:off], model[:off])}"
    assert got[end:] == model[end:], f"differs at {end + _first_diff(got[end:], model[end:])}"
    for s in range(0, len(new), sector):
        part = got[off + s : off + s + sector]
        assert part in (old[s : s + sector], new[s : s + sector]), f"torn sector at {off + s}"


def settle_pending_write(got: bytes, model: bytearray, pending):
    """compare_with_pending, then whatever of the write in flight landed is the new truth:
    the model takes it."""
    compare_with_pending(got, model, pending)
    if pending is not None:
        off, _old, new = pending
        model[off : off + len(new)] = got[off : off + len(new)]


# ------------------------------------------------------------- crash-point sweeps

CRASH_PRELUDE = r"""
import os, random, signal
import qcow.rawio as _rawio
_CRASH_AT, _CRASH_MODE, _CRASH_SEED = {crash_at!r}, {mode!r}, {seed!r}
_count = [0]
_log = {{}}      # path -> [(offset, old bytes, new bytes, size before)] since its last sync
_rnd = random.Random(_CRASH_SEED)
_pwrite, _pwritev, _sync = _rawio.RawIO.pwrite, _rawio.RawIO.pwritev, _rawio.RawIO.sync

def _remember(self, offset, data):
    if _CRASH_MODE == "powercut":
        _log.setdefault(self.path, []).append(
            (offset, os.pread(self.fd, len(data), offset), bytes(data),
             os.fstat(self.fd).st_size))

def _w(self, data, offset):
    _remember(self, offset, data)
    _pwrite(self, data, offset)

def _wv(self, buffers, offset):
    _remember(self, offset, b"".join(bytes(b) for b in buffers))
    _pwritev(self, buffers, offset)

def _crash():
    # powercut: every file goes back to its state at its last sync, plus a random
    # subset of the later writes (replayed in order): what a power cut may leave
    for path, log in _log.items():
        fd = os.open(path, os.O_WRONLY)
        for off, old, _new, size in reversed(log):
            os.pwrite(fd, old, off)
            os.ftruncate(fd, max(size, 0)) if off + len(old) >= size else None
        for off, _old, new, _size in log:
            if _rnd.random() < 0.5:
                os.pwrite(fd, new, off)
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)

def _s(self):
    _count[0] += 1
    if _CRASH_AT and _count[0] == _CRASH_AT:
        _crash()
    _sync(self)
    _log.pop(self.path, None)
    if _CRASH_AT == 0:
        with open({count_file!r}, "w") as f:
            f.write(str(_count[0]))

_rawio.RawIO.pwrite, _rawio.RawIO.pwritev, _rawio.RawIO.sync = _w, _wv, _s
"""


def crash_script(image, progress_file, crash_at, how, seed, count_file, **kw):
    """offline_script with a crash at the `crash_at`-th flush barrier (fdatasync) of any
    image: 'kill' (SIGKILL: what was written stays) or 'powercut' (writes since the
    file's last barrier are lost, or a random subset of them kept). crash_at=0 only
    counts the barriers into count_file."""
    return CRASH_PRELUDE.format(
        crash_at=crash_at, mode=how, seed=seed, count_file=str(count_file)
    ) + offline_script(image, progress_file, **kw)
