"""The chain's read map (qcow.read_map): small reads found again without the layer walk,
and forgotten at every change of what a layer maps.

The unit tests drive `ReadMap` alone. The chain tests warm the map with reads, change
the mapping in each way a layer can (a write into fresh clusters, zero writes, discard,
a drained intermediate, a grown base, layers leaving the chain), and read again: a map
that kept its old answer would serve the bytes of the old place. QEMU's view of the
images (`qemu-img convert`) is the reference where the images are final.
"""

from __future__ import annotations

from types import SimpleNamespace

from qemu_helpers import K, M, apply_ops, convert_raw, create

import qcow
from qcow import read_map
from qcow.read_map import MapStamp, ReadMap


def _layers(*sizes, cluster=64 * K):
    return [SimpleNamespace(cluster_size=cluster, virtual_size=s) for s in sizes]


# ---- ReadMap alone ------------------------------------------------------------------


def test_hit_inside_the_granule_learned():
    stamp = MapStamp()
    m = ReadMap(stamp)
    layers = _layers(M, M)
    assert m.lookup(layers, 64 * K + 512, 4 * K) is None
    m.learn(layers, 64 * K + 512, 4 * K, layers[1], 10 * M + 512)
    # another read in the same 64 KiB granule: the same cluster, its own offset in it
    assert m.lookup(layers, 64 * K + 8 * K, 4 * K) == (layers[1], 10 * M + 8 * K)
    assert m.lookup(layers, 128 * K, 4 * K) is None  # another granule


def test_granule_is_the_smallest_cluster_and_reads_across_it_are_not_kept():
    stamp = MapStamp()
    m = ReadMap(stamp)
    layers = [
        SimpleNamespace(cluster_size=4 * K, virtual_size=M),
        SimpleNamespace(cluster_size=64 * K, virtual_size=M),
    ]
    m.lookup(layers, 0, 512)
    m.learn(layers, 0, 512, layers[1], 0)
    assert m.lookup(layers, 4 * K, 512) is None  # the next 4 KiB may be another layer's
    assert m.lookup(layers, 3 * K, 512) == (layers[1], 3 * K)  # the same granule
    m.lookup(layers, 7 * K, 2 * K)
    m.learn(layers, 7 * K, 2 * K, layers[1], 7 * K)  # crosses a granule: not kept
    assert m.lookup(layers, 7 * K, 512) is None
    assert m.lookup(layers, 8 * K, 512) is None


def test_nothing_kept_past_the_shortest_layer():
    m = ReadMap(MapStamp())
    layers = _layers(M, 64 * K + 512, M)  # a short middle layer, ending inside a granule
    m.lookup(layers, 64 * K, 512)
    m.learn(layers, 64 * K, 512, layers[2], 64 * K)
    # below the short layer's end, every layer has the granule's first 512 bytes
    assert m.lookup(layers, 64 * K, 512) == (layers[2], 64 * K)
    assert m.lookup(layers, 64 * K + 512, 512) is None  # zeros there, not layers[2]'s data
    m.lookup(layers, 64 * K + 512, 512)
    m.learn(layers, 64 * K + 512, 512, layers[2], 64 * K + 512)  # past it: not kept
    assert m.lookup(layers, 64 * K + 1024, 512) is None


def test_a_bump_or_a_new_layer_list_forgets():
    stamp = MapStamp()
    m = ReadMap(stamp)
    layers = _layers(M, M)
    m.lookup(layers, 0, 4 * K)
    m.learn(layers, 0, 4 * K, layers[1], 0)
    assert m.lookup(layers, 0, 4 * K) is not None
    stamp.bump()
    assert m.lookup(layers, 0, 4 * K) is None
    m.learn(layers, 0, 4 * K, layers[1], 0)
    assert m.lookup(list(layers), 0, 4 * K) is None  # the chain switched lists


def test_a_walk_that_raced_a_change_is_not_kept():
    """The walk after a lookup may have read a table before a change the stamp then
    announced: what it found is not kept."""
    stamp = MapStamp()
    m = ReadMap(stamp)
    layers = _layers(M, M)
    assert m.lookup(layers, 0, 4 * K) is None
    stamp.bump()  # a layer changed what it maps while the walk ran
    m.learn(layers, 0, 4 * K, layers[1], 0)
    assert m.lookup(layers, 0, 4 * K) is None


def test_stamps_never_repeat():
    stamp = MapStamp()
    seen = {stamp.value}
    for _ in range(1000):
        stamp.bump()
        assert stamp.value not in seen
        seen.add(stamp.value)


def test_the_map_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(read_map, "MAX_GRANULES", 4)
    m = ReadMap(MapStamp())
    layers = _layers(M, M)
    for g in range(5):
        m.lookup(layers, g * 64 * K, 512)
        m.learn(layers, g * 64 * K, 512, layers[1], g * 64 * K)
    assert m.lookup(layers, 0, 512) is None
    assert m.lookup(layers, 4 * 64 * K, 512) is not None


# ---- through the chain ------------------------------------------------------------------


def _chain3(d, cluster_size=64 * K, base_size=4 * M):
    """base (0x11 everywhere) <- mid (0x22 in its second MiB) <- top (empty)."""
    base = create(d / "base.qcow2", base_size, cluster_size=cluster_size)
    apply_ops(base, [("w", 0, base_size, 0x11)])
    mid = create(d / "mid.qcow2", 4 * M, backing=base, cluster_size=cluster_size)
    apply_ops(mid, [("w", M, M, 0x22)])
    return create(d / "top.qcow2", 4 * M, backing=mid, cluster_size=cluster_size)


def _warm(chain, *offsets):
    for off in offsets:
        for k in range(4):
            chain.read(off + k * 4 * K, 4 * K)


def test_guest_writes_zeroes_and_discards_are_seen_at_once(workdir):
    top = _chain3(workdir)
    with qcow.open_chain(top, writable=True) as chain:
        chain.write(3 * M, b"\x66" * 512)  # top's L2 table exists: no L1 change below
        _warm(chain, 0)
        chain.write(0, b"\x33" * 64 * K)  # whole cluster: a fresh one in top
        assert chain.read(4 * K, 4 * K) == b"\x33" * 4 * K
        _warm(chain, M)
        assert chain.read(M, 4 * K) == b"\x22" * 4 * K
        chain.write(M + 512, b"\x44" * 512)  # partial: copy-on-write from mid
        assert chain.read(M, 4 * K) == b"\x22" * 512 + b"\x44" * 512 + b"\x22" * 3 * K
        _warm(chain, 2 * M)
        chain.write_zeroes(2 * M, 64 * K)
        assert chain.read(2 * M + 4 * K, 4 * K) == bytes(4 * K)
        _warm(chain, 0)
        chain.discard(0, 64 * K)  # afterwards: zeros, not top's old cluster
        assert chain.read(4 * K, 4 * K) == bytes(4 * K)
        chain.flush()
        view = chain.read(0, 4 * M)
    assert convert_raw(top) == view


def test_a_drained_intermediate_and_dropped_layers_are_seen_at_once(workdir):
    top = _chain3(workdir)
    with qcow.open_chain(top, writable=True) as chain:
        mid = chain.layers[1]
        _warm(chain, M, M + 64 * K)
        mid = chain.reopen(mid, writable=True)
        _warm(chain, M, M + 64 * K)
        # the restartable commit's forget (without the copy first, so that the old
        # place and the new one differ): the read goes through to base at once
        mid.mark_unallocated(M, 64 * K)
        assert chain.read(M + 4 * K, 4 * K) == b"\x11" * 4 * K
        assert chain.read(M + 64 * K, 4 * K) == b"\x22" * 4 * K
        base = chain.layers[2]
        base = chain.reopen(base, writable=True)
        base.write(M + 64 * K, b"\x55" * 64 * K, None)
        base.flush()
        _warm(chain, M + 64 * K)
        chain.drop_layers(chain.layers[0], base, "base.qcow2")
        assert [layer.path for layer in chain.layers] == [chain.layers[0].path, base.path]
        assert chain.read(M + 64 * K, 4 * K) == b"\x55" * 4 * K  # mid is gone


def test_a_grown_base_shows_zeros_past_its_old_end(workdir):
    """A short base: the map keeps nothing past it, and after base grows the new area
    reads as zeros, never as data learned before."""
    top = _chain3(workdir, base_size=M + 512)
    with qcow.open_chain(top, writable=True) as chain:
        _warm(chain, 0, M - 64 * K)
        assert chain.read(M, 4 * K) == b"\x22" * 4 * K
        assert chain.read(3 * M, 4 * K) == bytes(4 * K)
        base = chain.reopen(chain.layers[2], writable=True)
        chain.grow(base, 4 * M)
        assert chain.read(3 * M, 4 * K) == bytes(4 * K)
        assert chain.read(0, 4 * K) == b"\x11" * 4 * K
