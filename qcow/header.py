"""The qcow2 header (cluster 0): fixed fields, header extensions, backing file name.

Parsing validates everything opening depends on, so a hostile header is refused with
one `CorruptImage`/`UnsupportedImage` line before any table is read. Serialising keeps
unknown extensions byte-for-byte (the spec asks us to preserve them).
"""

import json
import os
import struct
from contextlib import nullcontext
from typing import NamedTuple

from .construct_types import Bytes, Const, Int8ub, Int32ub, Int64ub, Padding, Struct
from .errors import CorruptImage, UnsupportedImage

QCOW_MAGIC = b"QFI\xfb"

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# compatible_features bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441
# qcowfs's own (QEMU ignores and keeps unknown extensions): set on a layer that a commit
# dropped from its chain (or a restartable commit drained); data = the base it was
# committed into. Such a file is a leftover of that commit, not an image anyone may
# depend on (the stranding guard skips it).
EXT_QCOWFS_DRAINED = 0x71667364
# qcowfs's own: a commit job's intent, recorded in the overlay of its top before its
# first write and removed when it completes or is cancelled; data = JSON {"job-id",
# "mode", "top", "base", "force", "speed"}. Still there at mount: the commit was interrupted
# (kill -9, crash) and the mount resumes it.
EXT_QCOWFS_COMMIT = 0x71667363

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU refuses clusters over 2 MiB
MAX_L1_BYTES = 32 << 20  # QEMU's cap on the L1 table
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's cap on the refcount table
MAX_BACKING_NAME = 1023

# byte offset and format of the fields rewritten on their own (the header's layout is
# qcow2.rst's; everything else is written whole, by pack_cluster0)
_FIELDS = {
    "size": (24, ">Q"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "incompatible_features": (72, ">Q"),
    "autoclear_features": (88, ">Q"),
}

HEADER_PROBE_BYTES = 4096  # header, extensions and backing name usually fit in it
SECTOR_SIZE = 512  # QEMU's unit of a disk's size
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104

header_v2 = Struct(
    "magic" / Const(QCOW_MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

header_v3_tail = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

compression_type_field = Struct("compression_type" / Int8ub, Padding(7))

extension_head = Struct("type" / Int32ub, "length" / Int32ub)

feature_entry = Struct("type" / Int8ub, "bit" / Int8ub, "name" / Bytes(46))

FEATURE_KINDS = {0: "incompatible", 1: "compatible", 2: "autoclear"}


# Plain classes, not dataclasses: building a dataclass runs generated code through exec,
# about a millisecond each, and every command's start builds these.


class Extension:
    """One header extension: its type and its data, padding excluded."""

    __slots__ = ("type", "data")

    def __init__(self, type, data):
        self.type = type
        self.data = data


class Header:
    """The header's fields, named as in the spec; those a v2 header lacks take the
    values a v2 image implies."""

    def __init__(
        self,
        *,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible_features=0,
        compatible_features=0,
        autoclear_features=0,
        refcount_order=4,
        header_length=V2_HEADER_LEN,
        compression_type=COMPRESSION_DEFLATE,
        extensions=None,
        backing_name=None,
    ):
        self.version = version
        self.backing_file_offset = backing_file_offset
        self.backing_file_size = backing_file_size
        self.cluster_bits = cluster_bits
        self.size = size
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        self.extensions = [] if extensions is None else extensions  # in file order, no EXT_END
        self.backing_name = backing_name

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def virtual_size(self):
        """The disk's size: QEMU counts whole 512-byte sectors, so a size field that is
        no multiple of 512 (qemu-img never writes one) loses its last partial sector."""
        return self.size // SECTOR_SIZE * SECTOR_SIZE

    @property
    def extended_l2(self):
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def refcount_bits(self):
        return 1 << self.refcount_order

    def extension(self, ext_type):
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext.data
        return None

    @property
    def backing_format(self):
        data = self.extension(EXT_BACKING_FORMAT)
        return data.decode("utf-8", "replace") if data is not None else None

    @property
    def drained_into(self):
        data = self.extension(EXT_QCOWFS_DRAINED)
        return data.decode("utf-8", "replace") if data is not None else None

    @property
    def pending_commit(self):
        """The commit intent record (a dict), or None; a record that does not parse is
        reported as {"error": ...} rather than refusing the image (QEMU ignores it)."""
        data = self.extension(EXT_QCOWFS_COMMIT)
        if data is None:
            return None
        try:
            record = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"error": "unreadable commit record"}
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("job-id", "mode", "top", "base")
        ):
            return {"error": "unreadable commit record"}
        return record

    def feature_names(self):
        """{(kind, bit): name} from the feature name table extension, if any."""
        data = self.extension(EXT_FEATURE_TABLE) or b""
        names = {}
        for i in range(len(data) // 48):
            e = feature_entry.parse(data[i * 48 : (i + 1) * 48])
            names[(FEATURE_KINDS.get(e.type, str(e.type)), e.bit)] = e.name.split(b"\0", 1)[
                0
            ].decode("utf-8", "replace")
        return names

    # --- serialisation --------------------------------------------------

    def _fields_of(self, struct):
        """This header's values for the named fields of `struct` (the layout is the
        Struct's; the magic is a Const)."""
        return {sc.name: getattr(self, sc.name) for sc in struct.subcons if sc.name != "magic"}

    def pack_fixed(self):
        """The fixed part of the header (72, or header_length bytes for v3)."""
        raw = header_v2.build(self._fields_of(header_v2))
        if self.version < 3:
            return raw
        raw += header_v3_tail.build(self._fields_of(header_v3_tail))
        if self.header_length > V3_HEADER_LEN:
            tail = compression_type_field.build(dict(compression_type=self.compression_type))
            raw += tail + bytes(max(0, self.header_length - V3_HEADER_LEN - len(tail)))
        return raw[: self.header_length]

    def pack_cluster0(self):
        """Fixed header + extensions + end marker + backing name, as cluster 0 holds them.

        Sets backing_file_offset/size to where the name lands. Raises ValueError if it
        does not fit in one cluster (callers check before writing anything).
        """
        out = bytearray(self.pack_fixed())
        for ext in self.extensions:
            out += extension_head.build(dict(type=ext.type, length=len(ext.data)))
            out += ext.data + bytes(-len(ext.data) % 8)
        out += extension_head.build(dict(type=EXT_END, length=0))
        if self.backing_name is not None:
            name = self.backing_name.encode()
            self.backing_file_offset = len(out)
            self.backing_file_size = len(name)
            out += name
        else:
            self.backing_file_offset = 0
            self.backing_file_size = 0
        if len(out) > self.cluster_size:
            raise ValueError("header, extensions and backing name exceed cluster 0")
        out[: len(self.pack_fixed())] = self.pack_fixed()
        return bytes(out)

    def pack_fields(self, *names):
        """(bytes, offset) of these fixed-header fields, adjacent and in this order, with
        their current values: one write updates them in place."""
        offset = _FIELDS[names[0]][0]
        raw = b""
        for name in names:
            at, fmt = _FIELDS[name]
            assert at == offset + len(raw), f"header fields {names} are not adjacent"
            raw += struct.pack(fmt, getattr(self, name))
        return raw, offset

    def set_extension(self, ext_type, data):
        for ext in self.extensions:
            if ext.type == ext_type:
                if data is None:
                    self.extensions.remove(ext)
                else:
                    ext.data = data
                return
        if data is not None:
            # the backing format goes first, as QEMU writes it
            self.extensions.insert(0, Extension(ext_type, data))


def parse_header(cluster0: bytes, file_size: int, path) -> Header:
    """Parse and validate the header from the first bytes of the file (one cluster)."""
    if len(cluster0) < V2_HEADER_LEN or cluster0[:4] != QCOW_MAGIC:
        raise CorruptImage(path, "not a qcow2 image (bad magic)")
    h = header_v2.parse(cluster0)
    if h.version not in (2, 3):
        raise UnsupportedImage(path, f"unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(
            path,
            f"invalid cluster_bits {h.cluster_bits} "
            f"(must be {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})",
        )
    hdr = Header(**{k: v for k, v in h.items() if k not in ("magic", "_io")})
    cs = hdr.cluster_size
    if hdr.version >= 3:
        if len(cluster0) < V3_HEADER_LEN:
            raise CorruptImage(path, "truncated v3 header")
        t = header_v3_tail.parse(cluster0[V2_HEADER_LEN:])
        hdr.incompatible_features = t.incompatible_features
        hdr.compatible_features = t.compatible_features
        hdr.autoclear_features = t.autoclear_features
        hdr.refcount_order = t.refcount_order
        hdr.header_length = t.header_length
        if hdr.header_length < V3_HEADER_LEN or hdr.header_length % 8 or hdr.header_length > cs:
            raise CorruptImage(path, f"invalid header_length {hdr.header_length}")
        if hdr.header_length > V3_HEADER_LEN:
            hdr.compression_type = cluster0[V3_HEADER_LEN]
    else:
        hdr.header_length = V2_HEADER_LEN
    if hdr.refcount_order > 6:
        raise CorruptImage(path, f"invalid refcount_order {hdr.refcount_order}")

    _parse_extensions(hdr, cluster0, path)

    unknown = hdr.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = hdr.feature_names()
        bits = [b for b in range(64) if unknown >> b & 1]
        desc = ", ".join(names.get(("incompatible", b), f"bit {b}") for b in bits)
        raise UnsupportedImage(path, f"unsupported incompatible features: {desc}")
    if hdr.compression_type not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
        raise UnsupportedImage(path, f"unknown compression type {hdr.compression_type}")
    if hdr.compression_type != COMPRESSION_DEFLATE and not (
        hdr.incompatible_features & INCOMPAT_COMPRESSION
    ):
        raise CorruptImage(path, "compression type set without its incompatible bit")
    if hdr.extended_l2 and hdr.cluster_bits < 14:
        raise CorruptImage(path, "extended L2 entries need clusters of 16 KiB or more")

    # backing file name
    if hdr.backing_file_offset:
        end = hdr.backing_file_offset + hdr.backing_file_size
        if (
            hdr.backing_file_size > MAX_BACKING_NAME
            or end > cs
            or hdr.backing_file_offset < hdr.header_length
        ):
            raise CorruptImage(path, "backing file name is too long or outside cluster 0")
        raw = cluster0[hdr.backing_file_offset : end]
        if len(raw) != hdr.backing_file_size:
            raise CorruptImage(path, "backing file name runs past end of file")
        try:
            hdr.backing_name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptImage(path, "backing file name is not valid UTF-8") from None
        if not hdr.backing_name or "\0" in hdr.backing_name:
            raise CorruptImage(path, "backing file name is empty or contains NUL")

    _check_tables(hdr, file_size, path)
    return hdr


def _parse_extensions(hdr, cluster0, path):
    if hdr.version < 3:
        # v2 images may still carry extensions directly after the 72-byte header
        off = V2_HEADER_LEN
    else:
        off = hdr.header_length
    limit = hdr.backing_file_offset or hdr.cluster_size
    limit = min(limit, len(cluster0))
    seen = set()
    while True:
        if off + 8 > limit:
            if hdr.version < 3 and off == V2_HEADER_LEN:
                return  # v2 header with no extension area
            raise CorruptImage(path, "header extensions run past their space")
        e = extension_head.parse(cluster0[off : off + 8])
        off += 8
        if e.type == EXT_END:
            return
        if off + e.length > limit:
            raise CorruptImage(path, f"header extension 0x{e.type:08x} runs past its space")
        data = bytes(cluster0[off : off + e.length])
        off += e.length + (-e.length % 8)
        if e.type in seen and e.type != 0:
            raise CorruptImage(path, f"duplicate header extension 0x{e.type:08x}")
        seen.add(e.type)
        hdr.extensions.append(Extension(e.type, data))


def _region_ok(off, length, cs, file_size):
    return off % cs == 0 and off >= cs and off + length <= file_size


def _check_tables(hdr, file_size, path):
    cs = hdr.cluster_size
    # L1: must cover exactly what the virtual size needs (no more than QEMU allows)
    l2_entries = cs // (16 if hdr.extended_l2 else 8)
    needed = -(-hdr.size // (cs * l2_entries))
    if hdr.l1_size < needed:
        raise CorruptImage(path, f"L1 table too small ({hdr.l1_size} < {needed} entries)")
    if hdr.l1_size * 8 > MAX_L1_BYTES or hdr.l1_size > max(needed, 1) * 2 + 1024:
        raise CorruptImage(
            path, f"L1 size {hdr.l1_size} is far beyond what the virtual size needs ({needed})"
        )
    if hdr.l1_size and not _region_ok(hdr.l1_table_offset, hdr.l1_size * 8, cs, file_size):
        raise CorruptImage(
            path, "L1 table is misaligned, overlaps the header or lies beyond the end of the file"
        )
    rt_len = hdr.refcount_table_clusters * cs
    if hdr.refcount_table_clusters == 0 or rt_len > MAX_REFTABLE_BYTES:
        raise CorruptImage(
            path, f"invalid refcount table size ({hdr.refcount_table_clusters} clusters)"
        )
    if not _region_ok(hdr.refcount_table_offset, rt_len, cs, file_size):
        raise CorruptImage(
            path,
            "refcount table is misaligned, overlaps the header or lies beyond the end of the file",
        )
    if hdr.nb_snapshots and not _region_ok(hdr.snapshots_offset, 0, cs, file_size):
        raise CorruptImage(path, "snapshot table is misaligned or beyond the end of file")


class HeaderInfo(NamedTuple):
    format: str
    backing_name: str | None
    backing_format: str | None
    virtual_size: int
    drained_into: str | None  # see EXT_QCOWFS_DRAINED


def read_backing_info(path, file=None):
    """HeaderInfo from the header alone, no locks; from `file` (opened by the caller,
    left open) when given.

    For scans over many files (the stranding guard): usually one 4 KiB read per file;
    the whole first cluster only when the header area is larger. A raw file gives
    HeaderInfo('raw', None, None, size, None). Corrupt qcow2 raises CorruptImage.
    """
    with open(path, "rb") if file is None else nullcontext(file) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_PROBE_BYTES)
        if head[:4] != QCOW_MAGIC:
            return HeaderInfo("raw", None, None, size, None)
        try:
            hdr = parse_header(head, size, path)
        except CorruptImage:
            cluster_bits = struct.unpack_from(">I", head, 20)[0] if len(head) >= 24 else 0
            if not (
                MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS
                and (1 << cluster_bits) > len(head)
            ):
                raise
            f.seek(0)
            hdr = parse_header(f.read(1 << cluster_bits), size, path)
    return HeaderInfo(
        "qcow2", hdr.backing_name, hdr.backing_format, hdr.virtual_size, hdr.drained_into
    )
