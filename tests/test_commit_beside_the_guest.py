"""What a commit costs a writing guest, at the format layer (no mount): the CPU share it
leaves the guest, and the header writes it makes on the active image without waiting
for the guest's writes."""

from __future__ import annotations

import threading

import pytest
from qemu_helpers import apply_ops, convert_raw, create, qemu_check, qemu_info_chain

from commit.engine import GUEST_SHARE, guest_pause, start_commit
from qcow.chain import open_chain
from qcow.header import EXT_QCOWFS_COMMIT
from qcow.image import Qcow2Image

K = 1024
M = 1024 * K


def test_the_copy_pauses_by_its_own_cpu_time_not_the_steps_wall_time():
    # 3 ms of the copy's CPU in a 6 ms step (the guest had the other 3): the copy has
    # 30% of the CPU once it pauses 4 ms more
    assert guest_pause(0.003, 0.006, share=0.7) == pytest.approx(0.004)
    # the guest kept the CPU for most of the step already: no pause
    assert guest_pause(0.001, 0.010, share=0.7) < 0
    # alone on the CPU, the copy pauses until the guest had its share
    cpu = 0.002
    pause = guest_pause(cpu, cpu)
    assert cpu / (cpu + pause) == pytest.approx(1 - GUEST_SHARE)


def test_a_commit_leaves_the_guests_writes_to_the_guests_flush(tmp_path):
    """A commit of top into base writes two headers on the active image: its intent
    record (set, then removed) and the new backing file. Neither relies on the guest's
    writes to the active image, whose fdatasync took 200 ms under load: cluster 0 alone
    is made durable each time. The guest's writes stay for the guest's own flush, and
    QEMU reads the chain that results."""
    base = create(tmp_path / "base.qcow2", 4 * M)
    apply_ops(base, [("w", 0, 4 * M, 0x11)])
    top = create(tmp_path / "top.qcow2", 4 * M, backing=base)
    apply_ops(top, [("w", M, M, 0x22)])
    active = create(tmp_path / "active.qcow2", 4 * M, backing=top)
    chain = open_chain(active, writable=True)
    try:
        chain.write(3 * M, b"\x33" * (64 * K))  # the guest's, not flushed
        layer = chain.layers[0]
        synced = []
        real_sync = layer.io.sync
        layer.io.sync = lambda: (synced.append(layer.io.unsynced), real_sync())
        records = []
        real_durable = layer.io.pwrite_header_durable

        def durable(data):
            records.append(len(data))
            real_durable(data)

        layer.io.pwrite_header_durable = durable
        _target, _stranded, steps = start_commit(chain, top=str(top))
        for _step in steps:
            pass
        assert [x.path for x in chain.layers] == [str(active), str(base)]
        assert synced == [] and layer.io.unsynced, "the commit synced the guest's writes"
        assert len(records) == 3  # intent set, backing file, intent removed
        assert layer.header.extension(EXT_QCOWFS_COMMIT) is None
    finally:
        chain.close()
    assert [layer["filename"] for layer in qemu_info_chain(active)] == [str(active), str(base)]
    want = bytearray(b"\x11" * 4 * M)
    want[M : 2 * M] = b"\x22" * M
    want[3 * M : 3 * M + 64 * K] = b"\x33" * (64 * K)
    assert convert_raw(active) == bytes(want)
    for img in (active, base):
        assert qemu_check(img)[0] == 0


def test_a_header_write_waits_for_a_durable_header_write_in_flight(tmp_path):
    """A header made durable by itself is written without the layer's lock; a header
    write taken after it (a table move's, under the lock) must not land first, or the
    older header would overwrite it on disk."""
    img_path = create(tmp_path / "a.qcow2", 4 * M)
    img = Qcow2Image(str(img_path), writable=True)
    try:
        io = img.io
        with img.lock:
            older = img.header.pack_cluster0()
            io.header_idle.clear()  # as _rewrite_cluster0 does, data taken
        img.header.size = 8 * M  # a later change, written under the lock
        later = threading.Thread(target=lambda: io.pwrite_header(*img.header.pack_fields("size")))
        later.start()
        later.join(0.2)
        assert later.is_alive(), "a header write went out while an older one was in flight"
        io.pwrite_header_durable(older)
        later.join(10)
        assert not later.is_alive()
        with open(img_path, "rb") as f:
            assert int.from_bytes(f.read(32)[24:32], "big") == 8 * M
    finally:
        img.close()
