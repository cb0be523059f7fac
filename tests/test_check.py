"""Refcount structures under growth, `qcowfs check [--repair]`, and dirty images.

- An image with 512-byte clusters and 1-bit refcounts, small at first, written by
  `chain.write` past what its first refcount block covers (4096 clusters = 2 MiB of
  file) and, in a slow test, past what its first refcount table covers (64 blocks =
  128 MiB of file), so that the table is moved: `qemu-img check` finds nothing and the
  data reads back.
- `qcowfs check` exit codes on crafted images (0 clean, 3 leaks, 2 corruptions, 1 not
  qcow2 / unreadable), agreeing with `qemu-img check`; `--repair` fixes both kinds.
- A dirty lazy-refcounts image is repaired when opened for writing (and left alone when
  opened read-only).
"""

from __future__ import annotations

import json
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

import qcow

HDR_INCOMPATIBLE = 72
HDR_COMPATIBLE = 80


# ------------------------------------------------------------------ helpers


def refcount_entry(path, cluster):
    """(file offset of the refcount entry of `cluster`, its width in bits)."""
    lay = qcow2_layout(path)
    cs, order = lay["cluster_size"], lay["refcount_order"]
    bits = 1 << order
    per_block = cs * 8 // bits
    raw = Path(path).read_bytes()
    (block,) = struct.unpack_from(
        ">Q", raw, lay["refcount_table_offset"] + 8 * (cluster // per_block)
    )
    block &= ~0x1FF
    assert block, "no refcount block for that cluster"
    return block + (cluster % per_block) * bits // 8, bits


def set_refcount16(path, cluster, value):
    off, bits = refcount_entry(path, cluster)
    assert bits == 16
    patch(path, off, "H", value)


def get_refcount16(path, cluster):
    off, bits = refcount_entry(path, cluster)
    assert bits == 16
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">H", f.read(2))[0]


def leaky_image(d: Path, name="leak.qcow2", **opts):
    """A clean image with a freed cluster inside the file; returns (path, freed cluster)."""
    p = create(d / name, 4 * M, **opts)
    apply_ops(
        p,
        [
            ("w", 0, 64 * K, 0x11),
            ("w", 64 * K, 64 * K, 0x22),
            ("w", 128 * K, 64 * K, 0x33),
            ("d", 64 * K, 64 * K),
        ],
    )
    lay = qcow2_layout(p)
    used = {e & 0x00FF_FFFF_FFFF_FE00 for _w, _g, e in lay["data_entries"]}
    cs = lay["cluster_size"]
    for c in range(1, lay["file_size"] // cs):
        if c * cs not in used and get_refcount16(p, c) == 0:
            return p, c
    raise AssertionError("no free cluster inside the file")


def data_cluster(path):
    lay = qcow2_layout(path)
    _where, _guest, entry = lay["data_entries"][0]
    return (entry & 0x00FF_FFFF_FFFF_FE00) // lay["cluster_size"]


def assert_qemu_clean(path):
    rc, rep = qemu_check(path)
    assert (
        rc == 0
        and not rep.get("leaks")
        and not rep.get("corruptions")
        and rep.get("check-errors", 0) == 0
    ), qemu_img("check", path, check=False)


# ------------------------------------------------------------ refcount growth


def _fill(chain, off, total, seed, step=1 * M + 1536):
    model = {}
    rng = random.Random(seed)
    pos = off
    while pos < off + total:
        n = min(step, off + total - pos)
        data = rng.randbytes(n)
        chain.write(pos, data)
        model[pos] = data
        pos += n
    return model


def _verify(path, model):
    raw = convert_raw(path)
    for off, data in model.items():
        assert raw[off : off + len(data)] == data, f"data at {off} differs"


def test_refcount_block_growth_1bit_512(workdir):
    p = create(workdir / "grow.qcow2", 16 * M, cluster_size=512, refcount_bits=1)
    assert Path(p).stat().st_size < 64 * K
    with qcow.open_chain(p, writable=True) as chain:
        model = _fill(chain, 7, 5 * M, "grow")  # file > 2 MiB: new blocks
        chain.flush()
        model.update(_fill(chain, 9 * M + 511, M, "grow2"))
        chain.write_zeroes(10 * M, 700 * K)  # frees clusters...
        model.update(_fill(chain, 14 * M, M + 3, "grow3"))  # ...and reuses them
    lay = qcow2_layout(p)
    assert lay["file_size"] > 2 * M
    assert_qemu_clean(p)
    model[10 * M] = bytes(700 * K)
    # (the overlapping zero range is compared last, overriding the earlier data)
    raw = convert_raw(p)
    for off, data in model.items():
        if off == 10 * M:
            continue
        for a in range(off, off + len(data), 64 * K):
            b = min(a + 64 * K, off + len(data))
            if b <= 10 * M or a >= 10 * M + 700 * K:
                assert raw[a:b] == data[a - off : b - off], f"data at {a} differs"
    assert raw[10 * M : 10 * M + 700 * K] == bytes(700 * K)


@pytest.mark.slow
def test_refcount_table_relocation_1bit_512(workdir):
    """Past 128 MiB of file the first refcount table (one 512-byte cluster: 64 blocks)
    is full: the table moves to a larger place, and QEMU agrees with the result."""
    p = create(workdir / "reloc.qcow2", 160 * M, cluster_size=512, refcount_bits=1)
    old_table = qcow2_layout(p)["refcount_table_offset"]
    with qcow.open_chain(p, writable=True) as chain:
        model = _fill(chain, 0, 131 * M, "reloc", step=4 * M)
    lay = qcow2_layout(p)
    assert lay["refcount_table_offset"] != old_table
    assert lay["refcount_table_clusters"] > 1
    assert lay["file_size"] > 128 * M
    assert_qemu_clean(p)
    _verify(p, model)


def test_refcount_table_relocation_16bit_512(workdir):
    """Same with 16-bit refcounts: one block covers 256 clusters, the first table
    8 MiB of file, so the relocation happens soon."""
    p = create(workdir / "reloc16.qcow2", 24 * M, cluster_size=512)
    old_table = qcow2_layout(p)["refcount_table_offset"]
    with qcow.open_chain(p, writable=True) as chain:
        model = _fill(chain, 3, 10 * M, "reloc16")
        chain.flush()
        model.update(_fill(chain, 12 * M, 3 * M, "reloc16b", step=512 * 7))
    lay = qcow2_layout(p)
    assert lay["refcount_table_offset"] != old_table
    assert_qemu_clean(p)
    _verify(p, model)


# ------------------------------------------------------------ qcowfs check


def test_check_clean(workdir, qcowfs):
    p = create(workdir / "clean.qcow2", 4 * M)
    apply_ops(p, [("w", 0, 100 * K, 0x42)])
    cp = qcowfs("check", p)
    assert cp.returncode == 0, cp
    assert "No errors were found on the image." in cp.stdout


def test_check_leak_exit_3_and_repair(workdir, qcowfs):
    p, c = leaky_image(workdir)
    set_refcount16(p, c, 1)
    rc, rep = qemu_check(p)
    assert rc == 3 and rep.get("leaks") == 1, rep
    before = convert_raw(p)
    cp = qcowfs("check", p)
    assert cp.returncode == 3, cp
    assert "1 leaked clusters were found on the image." in cp.stdout, cp.stdout
    cp = qcowfs("check", "--repair", p)
    assert cp.returncode == 0, cp
    assert_qemu_clean(p)
    assert get_refcount16(p, c) == 0
    assert convert_raw(p) == before
    assert qcowfs("check", p).returncode == 0


def test_check_corruption_exit_2_and_repair(workdir, qcowfs):
    p = create(workdir / "corrupt.qcow2", 4 * M)
    apply_ops(p, [("w", 0, 200 * K, "corrupt")])
    before = convert_raw(p)
    c = data_cluster(p)
    set_refcount16(p, c, 0)
    rc, rep = qemu_check(p)
    assert rc == 2, rep
    cp = qcowfs("check", p)
    assert cp.returncode == 2, cp
    assert "errors were found on the image" in cp.stdout
    # the same count as QEMU (refcount too low, and OFLAG_COPIED without refcount 1)
    assert f"{rep['corruptions']} errors were found" in cp.stdout, (cp.stdout, rep)
    cp = qcowfs("check", "--repair", p)
    assert cp.returncode == 0, cp
    assert_qemu_clean(p)
    assert get_refcount16(p, c) == 1
    assert convert_raw(p) == before


def test_check_leak_and_corruption_together(workdir, qcowfs):
    p, free = leaky_image(workdir, "both.qcow2")
    used = data_cluster(p)
    set_refcount16(p, free, 3)
    set_refcount16(p, used, 0)
    rc, rep = qemu_check(p)
    assert rc == 2 and rep.get("leaks") == 1
    assert qcowfs("check", p).returncode == 2
    assert qcowfs("check", "--repair", p).returncode == 0
    assert_qemu_clean(p)


def test_check_refcount_too_high_on_shared_cluster(workdir, qcowfs):
    """Refcount 2 on a cluster that only the active L1 uses: a leak *and* a wrong
    OFLAG_COPIED (QEMU counts that as an error); repair fixes both."""
    p = create(workdir / "copied.qcow2", 4 * M)
    apply_ops(p, [("w", 0, 64 * K, 0x5A)])
    set_refcount16(p, data_cluster(p), 2)
    rc, rep = qemu_check(p)
    assert rc == 2
    cp = qcowfs("check", p)
    assert cp.returncode == 2, cp
    assert qcowfs("check", "--repair", p).returncode == 0
    assert_qemu_clean(p)


def test_check_misaligned_data_entry_counts_and_repairs_as_qemu(workdir, qcowfs):
    """An L2 entry whose data offset is moved off the cluster grid: QEMU still counts it
    over the clusters [offset, offset + cluster) touches (one corruption for the entry,
    one for the next cluster, now referenced twice; no leak). The same counts here, and
    a repair must not free the cluster the entry points into: it leaves the image as
    `qemu-img check -r all` leaves it."""
    p = create(workdir / "misaligned.qcow2", 4 * M)
    apply_ops(p, [("w", 0, 512 * K, 0x61)])
    where, _guest, entry = qcow2_layout(p)["data_entries"][1]
    patch(p, where, "Q", entry + 512)
    ours = workdir / "ours.qcow2"
    ours.write_bytes(Path(p).read_bytes())
    rc, rep = qemu_check(p)
    assert rc == 2 and (rep["corruptions"], rep.get("leaks", 0)) == (2, 0), rep
    cp = qcowfs("check", "--output", "json", ours)
    assert cp.returncode == 2, cp
    mine = json.loads(cp.stdout)
    assert (mine["corruptions"], mine.get("leaks", 0)) == (2, 0), mine
    qemu_img("check", "-r", "all", p, check=False)
    qcowfs("check", "-r", "all", ours)
    (rc_ours, after_ours), (rc_qemu, after_qemu) = qemu_check(ours), qemu_check(p)
    after_ours.pop("filename"), after_qemu.pop("filename")
    assert (rc_ours, after_ours) == (rc_qemu, after_qemu)
    assert ours.read_bytes() == Path(p).read_bytes()


def test_check_not_qcow2_exit_1(workdir, qcowfs):
    raw = workdir / "disk.raw"
    raw.write_bytes(b"\0" * 65536)
    cp = qcowfs("check", str(raw))
    assert cp.returncode == 1, cp
    assert str(raw) in cp.stderr and "Traceback" not in cp.stderr
    cp = qcowfs("check", str(workdir / "missing.qcow2"))
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp
    cp = qcowfs("check", "--repair", str(raw))
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp
    assert raw.read_bytes() == b"\0" * 65536


def test_check_with_snapshot_is_clean(workdir, qcowfs):
    p = create(workdir / "snap.qcow2", 4 * M)
    apply_ops(p, [("w", 0, 300 * K, "snap")])
    qemu_img("snapshot", "-c", "s1", p)
    apply_ops(p, [("w", 64 * K, 64 * K, 0x77)])
    assert qcowfs("check", p).returncode == 0
    with qcow.open_chain(p, writable=True) as chain:
        chain.write(100, b"after" * 100)
    assert qcowfs("check", p).returncode == 0
    assert_qemu_clean(p)


def test_check_reports_like_qemu_on_random_leaks(workdir):
    """Several leaked clusters: the same count as qemu-img."""
    import contextlib
    import io

    from fusefs import cli

    p = create(workdir / "many.qcow2", 8 * M, cluster_size=4 * K)
    apply_ops(p, [("w", 0, M, 0x11), ("d", 100 * K, 200 * K), ("d", 600 * K, 12 * K)])
    lay = qcow2_layout(p)
    used = {e & 0x00FF_FFFF_FFFF_FE00 for _w, _g, e in lay["data_entries"]}
    free = [
        c
        for c in range(1, lay["file_size"] // 4096)
        if c * 4096 not in used and get_refcount16(p, c) == 0
    ]
    assert len(free) >= 5
    for c in free[:5]:
        set_refcount16(p, c, 1 + c % 3)
    rc, rep = qemu_check(p)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ours = cli.main(["check", p])
    assert (rc, rep.get("leaks")) == (3, 5)
    assert ours == 3 and "5 leaked clusters" in out.getvalue(), out.getvalue()


# ------------------------------------------------------------ dirty images


def dirty_lazy_image(d: Path, name="dirty.qcow2"):
    """A lazy-refcounts image left 'dirty' with a leaked cluster, as after a crash."""
    p, c = leaky_image(d, name, lazy_refcounts="on")
    lay = qcow2_layout(p)
    assert lay["compatible"] & 1
    set_refcount16(p, c, 1)
    patch(p, HDR_INCOMPATIBLE, "Q", lay["incompatible"] | 1)
    return p, c


def test_dirty_image_repaired_on_writable_open(workdir):
    p, c = dirty_lazy_image(workdir)
    info = qemu_img("info", "--output=json", "-U", p).stdout
    assert '"dirty-flag": true' in info
    with qcow.open_chain(p, writable=True) as chain:
        guest = chain.read(0, chain.virtual_size)
        chain.write(5 * 512, b"w" * 512)
    assert qcow2_layout(p)["incompatible"] & 1 == 0
    assert get_refcount16(p, c) == 0
    assert_qemu_clean(p)
    expect = bytearray(guest)
    expect[5 * 512 : 6 * 512] = b"w" * 512
    assert convert_raw(p) == bytes(expect)


def test_dirty_image_untouched_when_read_only(workdir):
    p, _c = dirty_lazy_image(workdir, "dirty-ro.qcow2")
    before = Path(p).read_bytes()
    with qcow.open_chain(p) as chain:
        chain.read(0, chain.virtual_size)
    assert Path(p).read_bytes() == before


def test_dirty_image_repaired_by_check_repair(workdir, qcowfs):
    p, _c = dirty_lazy_image(workdir, "dirty-cli.qcow2")
    cp = qcowfs("check", "--repair", p)
    assert cp.returncode == 0, cp
    assert qcow2_layout(p)["incompatible"] & 1 == 0
    assert_qemu_clean(p)
