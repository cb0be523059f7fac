"""Crash consistency of the qcow2 writer, CrashMonkey / dm-log-writes style.

The image is opened through a recording RawIO (tests/recording_io.py) and driven with
random writes, zero writes, discards and flushes. A "crash" after the first k recorded
events leaves: the file as it was at the start, every write before the last completed
fdatasync, and a random subset of the writes after it. For each crash state:

- `qemu-img check` finds no corruption (leaks are allowed), and `qcowfs check` agrees
  with it on the number of leaked clusters;
- every byte not written since the last completed `flush()` reads back as it was at
  that flush; bytes written since then read as one of the values they have had;
- `qcowfs check --repair` leaves the image clean for `qemu-img check` and does not
  change what the guest reads;
- the crashed image (unrepaired, as after a kill -9 and a remount) can be opened for
  writing again, and new writes leave no corruption behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu_helpers import K, M, apply_ops, convert_raw, create, qemu_check, qemu_img, run_qcowfs
from recording_io import Journal, recording_factory

import qcow
from fusefs import cli
from qcow.image import Qcow2Image


def _zeros(off, n):
    return bytes(n)


@dataclass(frozen=True)
class CrashConfig:
    name: str
    cluster_size: int
    size: int
    refcount_bits: int = 16
    compat: str = "1.1"
    extended_l2: bool = False
    snapshot: bool = False
    prefill: bool = True
    cache_tables: int = 0  # 0: default cache; else a tiny cache (evictions)
    big_write: int = 0  # one large sequential write of this many bytes
    ops: int = 30
    crash_points: int = 14


CONFIGS = [
    CrashConfig("c64k", 64 * K, 4 * M),
    CrashConfig("c4k-smallcache", 4 * K, 2 * M, cache_tables=4),
    CrashConfig("c512-rb16-big", 512, 3 * M, big_write=M + 300 * K),
    CrashConfig(
        "c512-rb1-smallcache", 512, 3 * M, refcount_bits=1, cache_tables=5, big_write=700 * K
    ),
    CrashConfig("c4k-rb64-snap", 4 * K, 2 * M, refcount_bits=64, snapshot=True),
    CrashConfig("c4k-v2-snap", 4 * K, 2 * M, compat="0.10", snapshot=True),
    CrashConfig("extl2-32k", 32 * K, 4 * M, extended_l2=True),
    CrashConfig(
        "c512-reftable-growth", 512, 12 * M, prefill=False, big_write=9 * M, ops=12, crash_points=10
    ),
]


def build_image(cfg: CrashConfig, d: Path) -> str:
    opts = {"cluster_size": cfg.cluster_size, "compat": cfg.compat}
    if cfg.compat != "0.10":
        opts["refcount_bits"] = cfg.refcount_bits
    if cfg.extended_l2:
        opts["extended_l2"] = "on"
    p = create(d / "crash.qcow2", cfg.size, **opts)
    if cfg.prefill:
        cs = cfg.cluster_size
        apply_ops(
            p,
            [
                ("w", 0, 3 * cs + 100, "pre"),
                ("w", cfg.size // 2 - 777, 5 * cs, ("rand", "pre")),
                ("z", cfg.size // 4 // cs * cs, 2 * cs),
            ],
        )
    if cfg.snapshot:
        qemu_img("snapshot", "-c", "s1", p)
    return p


class Workload:
    """Drives a recorded Qcow2Image and remembers what the guest was told."""

    def __init__(self, path, cfg: CrashConfig, seed):
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.model = bytearray(convert_raw(path))
        self.journal = Journal(Path(path).read_bytes())
        self.journal.mark("flushed", bytes(self.model))
        cache = cfg.cache_tables * cfg.cluster_size if cfg.cache_tables else 32 << 20
        self.img = Qcow2Image(
            path, writable=True, cache_bytes=cache, rawio_factory=recording_factory(self.journal)
        )

    def op(self, kind, off, data):
        """Record the op as started (its range may be old or new after a crash)."""
        self.journal.mark("op", off, data)
        if kind == "write":
            self.img.write(off, data, below=_zeros)
        elif kind == "zero":
            self.img.write_zeroes(off, len(data), below=_zeros)
        self.model[off : off + len(data)] = data

    def flush(self):
        self.img.flush()
        self.journal.mark("flushed", bytes(self.model))

    def run(self):
        cfg, rng = self.cfg, self.rng
        cs, size = cfg.cluster_size, cfg.size
        big_at = rng.randrange(cfg.ops) if cfg.big_write else -1
        for i in range(cfg.ops):
            if i == big_at:
                off = rng.randrange(0, size - cfg.big_write) // 512 * 512 + 3
                self.op("write", off, rng.randbytes(cfg.big_write))
                continue
            r = rng.random()
            off = rng.choice([rng.randrange(size), rng.randrange(size // cs) * cs])
            n = min(
                size - off,
                rng.choice(
                    [rng.randrange(1, 600), rng.randrange(1, 3 * cs), cs * rng.randrange(1, 5)]
                ),
            )
            if r < 0.55:
                self.op("write", off, rng.randbytes(n))
            elif r < 0.75:
                self.op("zero", off, bytes(n))
            elif r < 0.85:
                self.op("zero", off, bytes(n))  # a discard is a zero write here
            else:
                self.flush()
        self.img.close()
        self.journal.mark("flushed", bytes(self.model))


def _segments(later_ops, size):
    bounds = {0, size}
    for off, data in later_ops:
        bounds.add(off)
        bounds.add(off + len(data))
    b = sorted(bounds)
    return zip(b, b[1:], strict=False)


def check_content(got: bytes, flushed: bytes, later_ops, where):
    """Bytes untouched since the flush equal `flushed`; the others are old or new."""
    assert len(got) == len(flushed), where
    for a, b in _segments(later_ops, len(got)):
        seg = got[a:b]
        cands = [flushed[a:b]] + [
            d[a - off : b - off] for off, d in later_ops if off <= a and b <= off + len(d)
        ]
        if seg in cands:
            continue
        assert len(cands) > 1, (
            f"{where}: flushed data lost in guest range "
            f"[{a}, {b}) (first bad byte "
            f"{a + next(i for i in range(b - a) if seg[i] != flushed[a + i])})"
        )
        # torn at cluster granularity mostly: compare 512-byte pieces, bytes if need be
        for p in range(0, b - a, 512):
            piece = seg[p : p + 512]
            if any(c[p : p + 512] == piece for c in cands):
                continue
            for i in range(p, p + len(piece)):
                assert any(c[i] == seg[i] for c in cands), (
                    f"{where}: byte {a + i} is neither its flushed nor a later-written value"
                )


def _our_check(path, repair=False):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli.main(["check", *(["--repair"] if repair else []), str(path)])
    return rc, out.getvalue()


def verify_crash_state(
    state: bytes, d: Path, tag: str, flushed: bytes, later_ops, rng: random.Random
):
    p = d / f"{tag}.qcow2"
    p.write_bytes(state)
    rc, rep = qemu_check(p)
    text = qemu_img("check", p, check=False).stdout
    assert rc in (0, 3) and rep.get("check-errors", 0) == 0 and not rep.get("corruptions"), (
        f"{tag}: qemu-img check rc={rc}\n{text}"
    )
    ours_rc, ours_out = _our_check(p)
    assert ours_rc == rc, f"{tag}: qcowfs check rc={ours_rc}, qemu-img {rc}\n{ours_out}\n{text}"
    guest = convert_raw(p)
    check_content(guest, flushed, later_ops, tag)
    with qcow.open_chain(p) as chain:
        assert chain.read(0, chain.virtual_size) == guest, f"{tag}: our reader differs"

    # remount without repair (kill -9, then mount again) and keep writing
    q = d / f"{tag}-reopened.qcow2"
    shutil.copyfile(p, q)
    model = bytearray(guest)
    with qcow.open_chain(q, writable=True) as chain:
        size = chain.virtual_size
        for _ in range(4):
            off = rng.randrange(size)
            data = rng.randbytes(min(size - off, rng.choice([777, 64 * K + 5, 300 * K])))
            chain.write(off, data)
            model[off : off + len(data)] = data
    rc2, rep2 = qemu_check(q)
    assert rc2 in (0, 3) and not rep2.get("corruptions") and rep2.get("check-errors", 0) == 0, (
        f"{tag}: writing after the crash corrupted the image: "
        f"{qemu_img('check', q, check=False).stdout}"
    )
    assert convert_raw(q) == bytes(model), f"{tag}: writes after the crash read back wrong"

    # repair
    rrc, rout = _our_check(p, repair=True)
    assert rrc == 0, f"{tag}: qcowfs check --repair exit {rrc}\n{rout}"
    rc3, rep3 = qemu_check(p)
    assert rc3 == 0 and not rep3.get("leaks") and not rep3.get("corruptions"), (
        f"{tag}: not clean after repair: {qemu_img('check', p, check=False).stdout}"
    )
    assert convert_raw(p) == guest, f"{tag}: repair changed the guest's data"
    for f in (p, q):
        f.unlink()


def crash_points(journal: Journal, n, rng):
    """Crash positions: random ones, and just after some fdatasyncs."""
    total = len(journal.events)
    syncs = [i + 1 for i, e in enumerate(journal.events) if e[0] == "sync"]
    pts = {total}
    pts.update(rng.sample(syncs, min(len(syncs), n // 3)))
    while len(pts) < n + 1 and len(pts) < total:
        pts.add(rng.randrange(1, total + 1))
    return sorted(pts)


def _flushed_and_later(journal: Journal, upto):
    fi, marker = journal.last_marker("flushed", upto)
    # ops started since (the last one may still be in flight at the crash)
    later = [(e[1], e[2]) for e in journal.events[fi + 1 : upto] if e[0] == "op"]
    return marker[1], later


def run_crash_test(cfg: CrashConfig, seed, d: Path):
    path = build_image(cfg, d)
    w = Workload(path, cfg, seed)
    w.run()
    journal = w.journal
    # every write went through RawIO: replaying the whole journal gives the file
    assert journal.replay() == Path(path).read_bytes(), (
        "the journal misses writes: something wrote to the image bypassing RawIO"
    )
    assert convert_raw(path) == bytes(w.model)
    rc, rep = qemu_check(path)
    assert rc == 0, qemu_img("check", path, check=False).stdout
    rng = random.Random(f"crash-{seed}")
    for k in crash_points(journal, cfg.crash_points, rng):
        flushed, later = _flushed_and_later(journal, k)
        state = journal.crash_state(k, rng, keep_prob=rng.choice([0.2, 0.5, 0.9]))
        verify_crash_state(bytes(state), d, f"s{seed}-k{k}", flushed, later, rng)


def _params():
    out = []
    for cfg in CONFIGS:
        for seed in (1, 2):
            marks = [pytest.mark.slow] if cfg.size > 8 * M else []
            out.append(pytest.param(cfg, seed, id=f"{cfg.name}-seed{seed}", marks=marks))
    return out


@pytest.mark.parametrize("cfg,seed", _params())
def test_crash_consistency(cfg, seed, workdir):
    run_crash_test(cfg, seed, workdir)


def test_journal_records_vectored_batches(workdir):
    """A multi-cluster write into fresh clusters (the batched, vectored path) is
    recorded: the recorded journal replays to the very file on disk."""
    p = create(workdir / "v.qcow2", 4 * M, cluster_size=4 * K)
    j = Journal(Path(p).read_bytes())
    img = Qcow2Image(p, writable=True, rawio_factory=recording_factory(j))
    img.write(0, os.urandom(40 * K), below=_zeros)
    img.close()
    assert any(e[0] == "write" and len(e[2]) >= 40 * K for e in j.events)
    assert j.replay() == Path(p).read_bytes()


def test_crash_repair_via_cli(workdir):
    """One crash state repaired by the real console command (`python -m fusefs`)."""
    cfg = CrashConfig("cli", 4 * K, 2 * M, cache_tables=4)
    path = build_image(cfg, workdir)
    w = Workload(path, cfg, 7)
    w.run()
    j = w.journal
    rng = random.Random(7)
    # a crash just before the last fdatasync of a flush that freed clusters, keeping
    # most writes: leaks are likely
    syncs = [i for i, e in enumerate(j.events) if e[0] == "sync"]
    state = j.crash_state(syncs[-1], rng, keep_prob=0.9)
    p = workdir / "cli.qcow2"
    p.write_bytes(state)
    rc, _ = qemu_check(p)
    assert rc in (0, 3)
    cp = run_qcowfs("check", "--repair", str(p))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert qemu_check(p)[0] == 0
