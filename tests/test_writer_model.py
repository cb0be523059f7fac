"""Model-based test of the qcow2 writer.

One hypothesis state machine per configuration of the coverage matrix (cluster size,
refcount width, compat, extended L2, backing file with data or none, internal snapshot
or none). Rules: unaligned and cluster-straddling writes, zero writes, discards,
flushes and close/reopen. Invariant: `chain.read` of the whole (small) disk equals a
bytearray model. At the end of every example: `qemu-img check` finds nothing (no
errors, no leaks), `qemu-img convert -O raw` equals the model, the snapshot (if any)
still reads what it held when it was taken, and the backing file is unchanged.

The starting images are built by qemu-img/qemu-io only, and the starting model is
QEMU's own view of them (`qemu-img convert`).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from qemu_helpers import K, M, apply_ops, convert_raw, create, make_raw, qemu_check, qemu_img

import qcow


@dataclass(frozen=True)
class Config:
    name: str
    cluster_size: int
    refcount_bits: int = 16
    compat: str = "1.1"
    extended_l2: bool = False
    backing: str | None = None  # None, "qcow2" (same size) or "raw-short"
    snapshot: bool = False
    size: int = 0  # virtual size; 0: chosen from the cluster size
    slow: bool = False

    @property
    def disk_size(self):
        if self.size:
            return self.size
        cs = self.cluster_size
        # a few L2 tables' worth where that stays small, never cluster-aligned
        per_l2 = cs * (cs // (16 if self.extended_l2 else 8))
        return min(max(3 * per_l2, 8 * cs), max(16 * cs, 1 * M)) - 1536


CONFIGS = [
    Config("c512", 512),
    Config("c512-rb1-backing", 512, refcount_bits=1, backing="qcow2"),
    Config("c512-snap-rb64", 512, refcount_bits=64, snapshot=True),
    Config("c512-v2-backing-snap", 512, compat="0.10", backing="qcow2", snapshot=True),
    Config("c4k-rb1", 4 * K, refcount_bits=1),
    Config("c4k-rb64-backing-snap", 4 * K, refcount_bits=64, backing="qcow2", snapshot=True),
    Config("c4k-v2", 4 * K, compat="0.10"),
    Config("c4k-v2-rawshort", 4 * K, compat="0.10", backing="raw-short"),
    Config("c64k", 64 * K),
    Config("c64k-rawshort-snap", 64 * K, backing="raw-short", snapshot=True),
    Config("c64k-rb1-backing", 64 * K, refcount_bits=1, backing="qcow2"),
    Config("c64k-v2-snap", 64 * K, compat="0.10", snapshot=True),
    Config("extl2-64k", 64 * K, extended_l2=True),
    Config("extl2-64k-backing-snap", 64 * K, extended_l2=True, backing="qcow2", snapshot=True),
    Config(
        "extl2-32k-rb64-rawshort", 32 * K, refcount_bits=64, extended_l2=True, backing="raw-short"
    ),
    Config("extl2-16k-rb1-backing", 16 * K, refcount_bits=1, extended_l2=True, backing="qcow2"),
    Config("c2m", 2 * M, size=6 * M + 4 * K, slow=True),
    Config("c2m-rb1-backing", 2 * M, refcount_bits=1, backing="qcow2", size=5 * M - 512, slow=True),
    Config("c2m-v2-snap", 2 * M, compat="0.10", snapshot=True, size=5 * M, slow=True),
    Config(
        "extl2-2m-rb64-backing-snap",
        2 * M,
        refcount_bits=64,
        extended_l2=True,
        backing="qcow2",
        snapshot=True,
        size=6 * M - 512,
        slow=True,
    ),
]


def _create_opts(cfg: Config):
    opts = {"cluster_size": cfg.cluster_size, "compat": cfg.compat}
    if cfg.compat != "0.10":
        opts["refcount_bits"] = cfg.refcount_bits
    if cfg.extended_l2:
        opts["extended_l2"] = "on"
    return opts


def build_images(cfg: Config, d: Path):
    """(active path, backing path or None) built with qemu-img/qemu-io."""
    size = cfg.disk_size
    cs = cfg.cluster_size
    backing = None
    backing_args = {}
    if cfg.backing == "qcow2":
        backing = create(d / "base.qcow2", size, cluster_size=64 * K)
        apply_ops(
            backing,
            [
                ("w", 0, size // 3, "base"),
                ("w", size // 2 + 333, size // 4, ("rand", "base")),
                ("w", size - 4 * K, 4 * K, 0xB1),
            ],
        )
        backing_args = dict(backing="base.qcow2", backing_fmt="qcow2")
    elif cfg.backing == "raw-short":
        # shorter than the active image and not cluster-aligned: past its end the
        # guest reads zeros, whatever the copy-on-write code finds there
        short = (size // 2) // 512 * 512 + 512 + 7
        backing = make_raw(d / "base.raw", short, writes=[(0, short, ("rand", "rawbase"))])
        backing_args = dict(backing="base.raw", backing_fmt="raw")
    active = create(d / "active.qcow2", size, **backing_args, **_create_opts(cfg))
    if cfg.snapshot:
        apply_ops(
            active,
            [
                ("w", 0, min(size, 5 * cs // 2 + 100), "presnap"),
                ("w", size // 2 - 1000, min(cs, 64 * K) + 2000, 0x5A),
                (
                    "w",
                    size - 3 * cs // 2 if size > 2 * cs else size // 2,
                    min(cs, size // 2),
                    ("rand", "presnap"),
                ),
            ],
        )
        qemu_img("snapshot", "-c", "s1", active)
        # some clusters already copied by QEMU, others still shared with s1
        apply_ops(active, [("w", cs // 2, 100, 0x6B)])
    return active, backing


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ranges(size, cs):
    """(offset, length) biased to cluster and subcluster edges and small/odd sizes."""
    nclusters = -(-size // cs)
    edge = st.builds(
        lambda c, dlt: c * cs + dlt,
        st.integers(0, nclusters),
        st.sampled_from([0, 0, 1, -1, 511, -512, 512, cs // 2, cs // 32]),
    )
    offset = st.one_of(st.integers(0, size - 1), edge).map(lambda o: min(max(o, 0), size - 1))
    length = st.one_of(
        st.integers(1, 2 * cs + 1000),
        st.integers(1, 4).map(lambda k: k * cs),
        st.integers(1, 4).map(lambda k: k * cs // 32),
        st.integers(1, 600),
        st.integers(1, size),
    )

    @st.composite
    def draw(draw_):
        off = draw_(offset)
        n = draw_(length)
        return off, max(1, min(n, size - off))

    return draw()


def make_machine(cfg: Config):
    size = cfg.disk_size
    cs = cfg.cluster_size

    class WriterMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            self.dir = Path(tempfile.mkdtemp(prefix="qcowfs-model-"))
            self.path, self.backing = build_images(cfg, self.dir)
            self.backing_sha = _sha(self.backing) if self.backing else None
            self.model = bytearray(convert_raw(self.path))
            assert len(self.model) == size
            self.snap_model = convert_raw(self.path, "s1") if cfg.snapshot else None
            self.chain = qcow.open_chain(self.path, writable=True)
            self.log = []

        def _note(self, *op):
            self.log.append(op)

        @rule(r=ranges(size, cs), seed=st.integers(0, 2**32 - 1))
        def write(self, r, seed):
            off, n = r
            data = random.Random(seed).randbytes(n)
            self._note("write", off, n)
            self.chain.write(off, data)
            self.model[off : off + n] = data

        @rule(
            c=st.integers(0, (size - 1) // cs),
            a=st.integers(-600, cs - 1),
            n=st.integers(1, 1200),
            seed=st.integers(0, 2**32 - 1),
        )
        def write_near_edge(self, c, a, n, seed):
            """A small write at, inside or across the start of cluster c."""
            off = min(max(c * cs + a, 0), size - 1)
            self.write((off, min(n, size - off)), seed)

        @rule(r=ranges(size, cs))
        def write_zeroes(self, r):
            off, n = r
            self._note("write_zeroes", off, n)
            self.chain.write_zeroes(off, n)
            self.model[off : off + n] = bytes(n)

        @rule(r=ranges(size, cs))
        def discard(self, r):
            off, n = r
            self._note("discard", off, n)
            self.chain.discard(off, n)
            self.model[off : off + n] = bytes(n)

        @rule()
        def flush(self):
            self._note("flush")
            self.chain.flush()

        @rule()
        def reopen(self):
            self._note("reopen")
            self.chain.close()
            self.chain = None
            self.chain = qcow.open_chain(self.path, writable=True)

        @precondition(lambda self: getattr(self, "chain", None) is not None)
        @invariant()
        def reads_match_model(self):
            got = self.chain.read(0, size)
            if got != self.model:
                bad = next(i for i in range(size) if got[i] != self.model[i])
                raise AssertionError(
                    f"chain.read differs from the model at byte {bad} "
                    f"(cluster {bad // cs}); ops: {self.log}"
                )

        def teardown(self):
            chain = getattr(self, "chain", None)
            try:
                if chain is None:
                    return
                chain.close()
                rc, rep = qemu_check(self.path)
                assert (
                    rc == 0
                    and rep.get("check-errors", 0) == 0
                    and not rep.get("corruptions")
                    and not rep.get("leaks")
                ), (rc, rep, qemu_img("check", self.path, check=False).stdout, self.log)
                assert convert_raw(self.path) == bytes(self.model), (
                    f"qemu-img convert differs from the model; ops: {self.log}"
                )
                if cfg.snapshot:
                    assert convert_raw(self.path, "s1") == self.snap_model, (
                        f"snapshot s1 changed; ops: {self.log}"
                    )
                if self.backing:
                    assert _sha(self.backing) == self.backing_sha, "backing file modified"
            finally:
                if getattr(self, "dir", None):
                    shutil.rmtree(self.dir, ignore_errors=True)

    WriterMachine.__name__ = f"WriterMachine_{cfg.name}"
    return WriterMachine


def _params():
    out = []
    for cfg in CONFIGS:
        marks = [pytest.mark.slow] if cfg.slow else []
        out.append(pytest.param(cfg, id=cfg.name, marks=marks))
    return out


@pytest.mark.parametrize("cfg", _params())
def test_writer_model(cfg):
    machine = make_machine(cfg)
    examples = int(os.environ.get("QCOWFS_MODEL_EXAMPLES", "15"))
    steps = int(os.environ.get("QCOWFS_MODEL_STEPS", "20"))
    if cfg.slow:
        examples = max(3, examples // 3)
    run = machine.TestCase
    run.settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    run().runTest()


def test_matrix_is_valid_for_qemu(tmp_path):
    """Every configuration builds with QEMU and has the properties its name claims."""
    import json

    for cfg in CONFIGS:
        d = tmp_path / cfg.name
        d.mkdir()
        active, backing = build_images(cfg, d)
        info = json.loads(qemu_img("info", "--output=json", active).stdout)
        data = info["format-specific"]["data"]
        assert info["cluster-size"] == cfg.cluster_size
        assert data["compat"] == cfg.compat
        assert data["refcount-bits"] == cfg.refcount_bits
        assert bool(data.get("extended-l2")) == cfg.extended_l2
        assert bool(info.get("snapshots")) == cfg.snapshot
        assert (backing is not None) == (cfg.backing is not None)
        rc, rep = qemu_check(active)
        assert rc == 0, rep
