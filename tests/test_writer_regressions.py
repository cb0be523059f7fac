"""Minimal reproductions of writer bugs found while testing the writer (one test each).

Each test names the fault it pins down; the full model-based and crash tests
(test_writer_model.py, test_crash.py) find them too, but less directly.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest
from qemu_helpers import (
    K,
    M,
    apply_ops,
    convert_raw,
    create,
    patch,
    qcow2_layout,
    qemu_check,
    qemu_img,
)
from recording_io import Journal, recording_factory

import qcow
from qcow.image import Qcow2Image


def _zeros(off, n):
    return bytes(n)


def _assert_no_corruption(path):
    rc, rep = qemu_check(path)
    assert rc in (0, 3) and not rep.get("corruptions") and rep.get("check-errors", 0) == 0, (
        qemu_img("check", path, check=False)
    )


# --- 1. a new L2 table exists only in the cache, past the end of the file ----------


def test_zero_write_then_read_in_fresh_l2_table(workdir):
    """write_zeroes of a whole cluster allocates an L2 table (in the cache only) and no
    data cluster; the next access must not take the L2 offset, which lies past the end
    of the file, for a corrupt L1 entry (it raised EIO)."""
    p = create(workdir / "z.qcow2", M)
    with qcow.open_chain(p, writable=True) as chain:
        chain.write_zeroes(0, 64 * K)
        assert chain.read(0, 512) == bytes(512)
        chain.write(64 * K, b"x" * 100)
    assert convert_raw(p)[64 * K : 64 * K + 100] == b"x" * 100
    _assert_no_corruption(p)


def test_multi_cluster_write_into_fresh_image(workdir):
    """A write covering several clusters under a new L2 table: the second cluster's
    lookup of that table must not fail (same cause as above)."""
    p = create(workdir / "m.qcow2", 4 * M, cluster_size=4 * K)
    data = random.Random(1).randbytes(40 * K)
    with qcow.open_chain(p, writable=True) as chain:
        chain.write(0, data)
        assert chain.read(0, len(data)) == data
    assert convert_raw(p)[: len(data)] == data


# --- 2. a batch of fresh clusters outlives the eviction of its L2 table -------------


def test_write_spanning_more_l2_tables_than_the_cache_holds(workdir):
    """With 512-byte clusters an L2 table covers 32 KiB; a write over 6 of them with a
    4-table cache evicted tables the pending batch still had to update (KeyError at
    flush, or entries lost)."""
    p = create(workdir / "e.qcow2", M, cluster_size=512)
    data = random.Random(2).randbytes(6 * 32 * K)
    img = Qcow2Image(p, writable=True, cache_bytes=4 * 512)
    try:
        img.write(0, data, below=_zeros)
    finally:
        img.close()
    assert convert_raw(p)[: len(data)] == data
    rc, _ = qemu_check(p)
    assert rc == 0


# --- 3. a refcount block that does not count itself -----------------------------


def test_every_synced_prefix_is_consistent_when_refblocks_are_added(workdir):
    """A large write into a 512-byte-cluster image needs new refcount blocks placed
    past the data, outside the range they cover; their own refcount lives in another
    (possibly also new) block. The refcount table entry must not become durable before
    that count: a crash right after any fdatasync must leave no corruption."""
    p = create(workdir / "rb.qcow2", 3 * M, cluster_size=512)
    apply_ops(p, [("w", 0, 2 * K, 0x11)])
    j = Journal(Path(p).read_bytes())
    img = Qcow2Image(p, writable=True, rawio_factory=recording_factory(j))
    img.write(100 * K + 3, random.Random(3).randbytes(1300 * K), below=_zeros)
    img.close()
    syncs = [i for i, e in enumerate(j.events) if e[0] == "sync"]
    assert len(syncs) > 3
    bad = []
    for s in syncs:
        state = workdir / f"prefix{s}.qcow2"
        state.write_bytes(j.replay(s + 1))
        rc, rep = qemu_check(state)
        if rc not in (0, 3) or rep.get("corruptions"):
            bad.append((s, qemu_img("check", state, check=False).stderr.strip()))
        state.unlink()
    assert not bad, f"corrupt after a crash right after these syncs: {bad[:3]}"


# --- 4. refcounts past the end of the file (a crash can leave them) -----------------


def test_refcount_beyond_eof_is_not_free_space(workdir):
    """A crash can make a refcount increment durable while the write that extended the
    file is lost: the cluster past EOF is counted (QEMU's check does not even report
    it). The allocator took every cluster past EOF as free and counted it again:
    refcount 2 under an entry with QCOW_OFLAG_COPIED is a corruption (with 1-bit
    refcounts: CorruptImage 'overflows')."""
    p = create(workdir / "eof.qcow2", 4 * M)
    apply_ops(p, [("w", 0, 64 * K, 0x11)])
    lay = qcow2_layout(p)
    cs = lay["cluster_size"]
    eof_cluster = -(-lay["file_size"] // cs)
    raw = Path(p).read_bytes()
    (block,) = struct.unpack_from(">Q", raw, lay["refcount_table_offset"])
    patch(p, block + 2 * eof_cluster, "H", 1)  # counted, but past EOF
    assert qemu_check(p)[0] == 0  # invisible to QEMU's check
    with qcow.open_chain(p, writable=True) as chain:
        chain.write(M, os.urandom(3 * cs))
    _assert_no_corruption(p)


# --- 5. the dirty-image repair must wait for the locks ---------------------------


def test_dirty_repair_waits_for_the_lock(workdir):
    """Opening a dirty lazy-refcounts image for writing repairs it, which writes. While
    another process holds the image for writing (here: QEMU's write-permission lock
    bytes, taken with OFD locks on our own descriptor), the open must fail with
    ImageLockConflict and leave the file exactly as it was."""
    import fcntl

    import pytest

    from qcow.errors import ImageLockConflict

    p = create(workdir / "dirty.qcow2", 4 * M, lazy_refcounts="on")
    apply_ops(p, [("w", 0, 64 * K, 0x11)])
    patch(p, 72, "Q", qcow2_layout(p)["incompatible"] | 1)  # dirty
    before = Path(p).read_bytes()
    fd = os.open(p, os.O_RDWR)
    try:
        # what a QEMU writer holds: perms 100 (read), 101 (write); unshared 201 (write)
        for byte in (100, 101, 201):
            fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, byte, 1, 0))
        with pytest.raises(ImageLockConflict):
            qcow.open_chain(p, writable=True)
        assert Path(p).read_bytes() == before, "repaired before the lock was taken"
    finally:
        os.close(fd)


# --- 6. a cluster freed and reused while a read of it is in flight -----------------


def test_read_in_flight_does_not_see_a_reused_cluster(workdir):
    """A read plans its host offsets under the chain lock and reads outside it. If the
    guest range is discarded, the chain flushed (the freed cluster's refcount drops)
    and another guest range written (the cluster is reused) before the read's pread
    runs, the read returns the other range's data: neither the old data nor zeros.
    Frees must not be applied while reads that may use the freed clusters are in flight."""
    import threading

    cs = 64 * K
    p = create(workdir / "race.qcow2", 4 * M)
    old, other = b"A" * cs, b"B" * cs
    with qcow.open_chain(p, writable=True) as chain:
        chain.write(0, old)
        chain.flush()
        layer = chain.layers[0]
        io = layer.io
        planned, release = threading.Event(), threading.Event()
        real_pread, real_preadinto = io.pread, io.preadinto

        def slow_pread(length, offset):
            if threading.current_thread().name == "reader":
                planned.set()
                release.wait(10)
            return real_pread(length, offset)

        def slow_preadinto(buf, offset):
            if threading.current_thread().name == "reader":
                planned.set()
                release.wait(10)
            return real_preadinto(buf, offset)

        io.pread, io.preadinto = slow_pread, slow_preadinto
        result = {}
        reader = threading.Thread(
            name="reader", target=lambda: result.setdefault("r", chain.read(0, cs))
        )
        reader.start()
        try:
            assert planned.wait(10)
            chain.discard(0, cs)  # frees the cluster (deferred)...
            chain.flush()  # ...refcount 0 once the L2 entry is durable
            chain.write(M, other)  # allocation may take the freed cluster
        finally:
            release.set()
            reader.join(10)
        io.pread, io.preadinto = real_pread, real_preadinto
    assert result["r"] in (old, bytes(cs)), "the read returned another range's data"


# --- 7. refcount table relocation: the new blocks' own counts -----------------------


def test_refcount_table_growth_counts_every_new_block(workdir):
    """When the refcount table moves, new refcount blocks are placed right after the
    new table; the range they must cover was estimated as "table + 2 clusters", so
    when more than 3 blocks are new (a large table, small blocks: 512-byte clusters,
    64-bit refcounts, i.e. 64 clusters per block) the last ones land in a block range
    nobody counts: refcount 0 for a refcount block. Driven through the internal
    `_grow_table` at every alignment of the new table's start (reaching this through
    guest writes needs a 512 MiB image file)."""
    bad = []
    fresh = Path(
        create(workdir / "gt.qcow2", 64 * M, cluster_size=512, refcount_bits=64)
    ).read_bytes()
    for tmod in range(64):
        p = workdir / f"gt{tmod}.qcow2"
        p.write_bytes(fresh)
        img = Qcow2Image(str(p), writable=True)
        try:
            img.refcounts.end = 64 * 64 + tmod  # where the new table will start
            img.refcounts._grow_table(300 * 64)  # 300 clusters: spans ~5 blocks
            img.flush()
        finally:
            img.close()
        rc, rep = qemu_check(p)
        if rc != 0:
            bad.append((tmod, qemu_img("check", p, check=False).stderr.strip()))
        os.unlink(p)
    assert not bad, bad[:2]


# --- 8. whole clusters over every kind of cluster the layer does not own ------------


@pytest.mark.parametrize("extended_l2", [False, True], ids=["std", "extl2"])
def test_whole_cluster_run_over_clusters_not_owned(workdir, extended_l2):
    """A write of whole clusters goes to fresh clusters in one request for each run the
    layer does not own: compressed, unallocated over a backing file, zero, and shared
    with a snapshot (COPIED clear). The run stops at an owned cluster, which is
    overwritten in place. The replaced clusters are freed (compressed ones whole) and
    the snapshot keeps its own: `qemu-img check` finds no leak, QEMU reads the write."""
    cs = 64 * K
    opts = {"extended_l2": "on"} if extended_l2 else {}
    base = create(workdir / "b.qcow2", M, cluster_size=cs, **opts)
    apply_ops(base, [("w", 0, M, 0x11)])
    top = create(workdir / "t.qcow2", M, backing=base, cluster_size=cs, **opts)
    apply_ops(top, [("c", 0, cs, 0x22), ("w", 3 * cs, 2 * cs, 0x33)])
    qemu_img("snapshot", "-c", "s1", top)  # clusters 0, 3 and 4 now shared
    apply_ops(top, [("z", 2 * cs, cs), ("w", 4 * cs, cs, 0x44)])  # 4: owned again
    before = convert_raw(top, "s1")
    owned_at = _host_offsets(top, 7, cs)[4]
    data = random.Random(8).randbytes(7 * cs)
    with qcow.open_chain(top, writable=True) as chain:
        chain.write(0, data)
    assert convert_raw(top)[: 7 * cs] == data
    assert convert_raw(top)[7 * cs :] == b"\x11" * (M - 7 * cs)
    assert convert_raw(top, "s1") == before
    rc, rep = qemu_check(top)
    assert rc == 0 and not rep.get("leaks"), qemu_img("check", top, check=False).stdout
    after = _host_offsets(top, 7, cs)
    assert after[4] == owned_at, "the owned cluster moved"
    for run in ((0, 1, 2, 3), (5, 6)):  # each run went to contiguous fresh clusters
        assert [after[c] - after[run[0]] for c in run] == [k * cs for k in range(len(run))]


def _host_offsets(img, n, cs):
    """Host offset of each of the first n clusters in img itself (None: not there)."""
    out = [None] * n
    for e in json.loads(qemu_img("map", "--output=json", img).stdout):
        if e["depth"] == 0 and e.get("offset") is not None:
            for c in range(e["start"] // cs, min(n, (e["start"] + e["length"]) // cs)):
                out[c] = e["offset"] + c * cs - e["start"]
    return out


# --- 9. a write planned before another write changed the cluster --------------------


def test_write_plans_again_when_the_cluster_changed_while_it_read_below(workdir):
    """A partial write reads its copy-on-write data from below without the layer's
    lock; another write allocates the same cluster meanwhile (its stamp bump makes the
    first plan again). The cluster is then the layer's own: the first write goes in
    place, and the cluster is not put together again from the fill it read, which
    would lose the other write."""
    cs = 64 * K
    base = create(workdir / "b.qcow2", M, cluster_size=cs)
    apply_ops(base, [("w", 0, M, 0x11)])
    top = create(workdir / "t.qcow2", M, backing=base, cluster_size=cs)
    img = Qcow2Image(top, writable=True)
    try:

        def below(off, n):
            if not calls:
                calls.append((off, n))
                img.write(16 * K, b"\xbb" * 4 * K, lambda o, ln: b"\x11" * ln)
            return b"\x11" * n

        calls = []
        img.write(4 * K, b"\xaa" * 4 * K, below)
        assert calls, "the write read nothing from below"
        img.flush()
    finally:
        img.close()
    want = bytearray(b"\x11" * M)
    want[4 * K : 8 * K] = b"\xaa" * 4 * K
    want[16 * K : 20 * K] = b"\xbb" * 4 * K
    assert convert_raw(top) == bytes(want)
    _assert_no_corruption(top)
