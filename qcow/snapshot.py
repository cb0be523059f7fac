"""The internal snapshot table.

qcowfs never creates or reverts snapshots; it parses the table to validate it at open,
to know which clusters a snapshot shares with the active L1 (refcount > 1, no
QCOW_OFLAG_COPIED: copy before writing) and to walk snapshot L1 tables in `check`.
"""

from collections import namedtuple

from .construct_types import Int16ub, Int32ub, Int64ub, Struct
from .errors import CorruptImage

snapshot_entry = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
ENTRY_FIXED = 40
MAX_SNAPSHOTS = 65536
MAX_EXTRA = 1024


# disk_size: None when the entry's extra data does not hold it
Snapshot = namedtuple("Snapshot", "id name l1_table_offset l1_size disk_size")


def parse_snapshot_table(f_pread, hdr, file_size, path):
    """Parse `hdr.nb_snapshots` entries at `hdr.snapshots_offset`; validate each."""
    if hdr.nb_snapshots == 0:
        return []
    if hdr.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(path, f"too many snapshots ({hdr.nb_snapshots})")
    cs = hdr.cluster_size
    off = hdr.snapshots_offset
    snaps = []
    for _ in range(hdr.nb_snapshots):
        raw = f_pread(ENTRY_FIXED, off)
        if len(raw) < ENTRY_FIXED:
            raise CorruptImage(path, "snapshot table runs past the end of the file")
        e = snapshot_entry.parse(raw)
        if e.extra_data_size > MAX_EXTRA:
            raise CorruptImage(path, "snapshot extra data too large")
        var_len = e.extra_data_size + e.id_str_size + e.name_size
        rest = f_pread(var_len, off + ENTRY_FIXED)
        if len(rest) < var_len:
            raise CorruptImage(path, "snapshot table runs past the end of the file")
        extra = rest[: e.extra_data_size]
        ids = rest[e.extra_data_size : e.extra_data_size + e.id_str_size]
        name = rest[e.extra_data_size + e.id_str_size :]
        disk_size = int.from_bytes(extra[8:16], "big") if len(extra) >= 16 else None
        if e.l1_size and (
            e.l1_table_offset % cs
            or e.l1_table_offset < cs
            or e.l1_table_offset + e.l1_size * 8 > file_size
        ):
            raise CorruptImage(
                path, "snapshot L1 table is misaligned or beyond the end of the file"
            )
        if e.l1_size * 8 > 32 << 20:
            raise CorruptImage(path, "snapshot L1 table too large")
        snaps.append(
            Snapshot(
                ids.decode("utf-8", "replace"),
                name.decode("utf-8", "replace"),
                e.l1_table_offset,
                e.l1_size,
                disk_size,
            )
        )
        off += ENTRY_FIXED + var_len
        off += -off % 8
    return snaps
