"""Persistent dirty bitmaps: qcowfs does not maintain them, so the first write drops
them (extension and clusters) instead of leaving stale bitmaps and leaked clusters.

Before, a write through the mount cleared the autoclear bit only: QEMU then saw every
bitmap as inconsistent and `qemu-img check` reported their clusters as leaks.
"""

from __future__ import annotations

import json

from mount_fixtures import read_file
from qemu_helpers import apply_ops, create, qemu_check, qemu_img
from test_commit_support import flat

M = 1 << 20


def _bitmaps(image):
    info = json.loads(qemu_img("info", "--output=json", image).stdout)
    return [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def _chain_with_bitmaps(d):
    base = create(str(d / "base.qcow2"), 16 * M)
    apply_ops(base, [("w", 0, 8 * M, 0x11)])
    top = create(str(d / "top.qcow2"), 16 * M, backing="base.qcow2")
    qemu_img("bitmap", "--add", top, "bm0")
    qemu_img("bitmap", "--add", "-g", "4096", top, "bm1")
    apply_ops(top, [("w", M, M, 0x22), ("w", 9 * M, 2 * M, 0x33)])  # dirty bits on disk
    assert _bitmaps(top) == ["bm0", "bm1"]
    return base, top


def test_first_write_drops_bitmaps_and_check_stays_clean(tmp_path, mounter):
    base, top = _chain_with_bitmaps(tmp_path)
    model = bytearray(flat(top))
    m = mounter(top)
    with open(m.disk, "r+b") as f:
        f.seek(5 * M)
        f.write(b"\x44" * 65536)
        model[5 * M : 5 * M + 65536] = b"\x44" * 65536
    assert read_file(m.disk) == model
    m.unmount()
    rc, report = qemu_check(top)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report
    assert _bitmaps(top) == []
    assert flat(top) == model
    cp = qemu_img("info", top)
    assert "inconsistent" not in cp.stderr and "lacking bitmap support" not in cp.stderr


def test_read_only_mount_and_no_write_keep_bitmaps(tmp_path, mounter):
    _base, top = _chain_with_bitmaps(tmp_path)
    for args in (("--read-only",), ()):
        m = mounter(top, *args)
        assert len(read_file(m.disk)) == 16 * M
        m.unmount()
        assert _bitmaps(top) == ["bm0", "bm1"], args
        rc, report = qemu_check(top)
        assert rc == 0, report
