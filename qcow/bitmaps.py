"""Persistent dirty bitmaps (the bitmaps extension): the clusters they occupy.

qcowfs does not maintain bitmaps. QEMU's own answer to a writer without bitmap support
is the autoclear bit: cleared, and every bitmap is "inconsistent" and its clusters
leak. qcowfs instead drops the extension on an image's first write and frees the
bitmaps' clusters (Qcow2Image._prepare_write), so `qemu-img check` stays clean and no
stale bitmap can be mistaken for a valid one.

Directory entry (qcow2.rst "Bitmaps extension"): bitmap_table_offset u64,
bitmap_table_size u32, flags u32, type u8, granularity_bits u8, name_size u16,
extra_data_size u32, then extra data and name, padded to 8. A bitmap table entry holds
a data cluster's offset in bits 9-55 (0: all zeros or all ones, no cluster).
"""

import struct

from .header import EXT_BITMAPS
from .l2_table import L1E_OFFSET_MASK

_DIR_ENTRY = struct.Struct(">QIIBBHI")


def bitmap_regions(image):
    """[(host offset, bytes)] of the bitmap directory, every bitmap table and every
    bitmap data cluster of `image` (none without the extension)."""
    ext = image.header.extension(EXT_BITMAPS)
    if not ext or len(ext) < 24:
        return []
    _nb, _reserved, dir_size, dir_off = struct.unpack(">IIQQ", ext[:24])
    regions = [(dir_off, dir_size)]
    raw = image.io.pread(dir_size, dir_off)
    pos = 0
    while pos + _DIR_ENTRY.size <= len(raw):
        table_off, table_size, _flags, _type, _gran, name_size, extra = _DIR_ENTRY.unpack_from(
            raw, pos
        )
        regions.append((table_off, table_size * 8))
        for (entry,) in struct.iter_unpack(">Q", image.io.pread(table_size * 8, table_off)):
            if entry & L1E_OFFSET_MASK:
                regions.append((entry & L1E_OFFSET_MASK, image.cluster_size))
        pos += _DIR_ENTRY.size + extra + name_size
        pos += -pos % 8
    return regions


def region_clusters(image, regions):
    """The clusters the regions cover that may be freed: aligned, inside the file and
    counted once (a bitmap cluster is never shared), each listed once."""
    cb, cs = image.cluster_bits, image.cluster_size
    end = image.io.size()
    clusters = set()
    for off, n in regions:
        if off % cs or off + n > end or off < cs:
            continue
        clusters.update(range(off >> cb, -(-(off + n) // cs)))
    return sorted(c for c in clusters if image.refcounts.get(c) == 1)
