"""L1 and L2 table entries: bit layouts and decoding (standard and extended L2).

An L2 table is exactly one cluster. With extended L2 entries each entry is 16 bytes:
the usual 64-bit descriptor followed by a 64-bit subcluster bitmap (bits 0-31
"allocated", bits 32-63 "reads as zero"), giving 32 subclusters per cluster.
Tables are held as `array('Q')` in host order, so one table costs exactly one cluster
of memory in the cache.
"""

import sys
from array import array

L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
# an L2 entry with either flag is not plain data at its host offset
NOT_PLAIN = QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO
L1E_RESERVED_MASK = 0x7F00_0000_0000_01FF
L2E_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE

SUBCLUSTERS = 32
SC_ALLOC_MASK = 0xFFFF_FFFF
SC_ZERO_SHIFT = 32
# an extended L2 bitmap whose every subcluster reads as zeros
SC_ALL_ZERO = SC_ALLOC_MASK << SC_ZERO_SHIFT


def is_owned(entry):
    """Whether an L2 entry is a cluster this image alone uses (QCOW_OFLAG_COPIED on a
    data cluster, not compressed): written in place, never copied first."""
    return bool(
        entry & QCOW_OFLAG_COPIED and entry & L2E_OFFSET_MASK and not entry & QCOW_OFLAG_COMPRESSED
    )


def sc_allocated(bitmap, sc_bits):
    """An extended L2 bitmap with the subclusters `sc_bits` allocated (no longer zero)."""
    return (bitmap | sc_bits) & ~(sc_bits << SC_ZERO_SHIFT)


def sc_zeroed(bitmap, sc_bits):
    """An extended L2 bitmap with the subclusters `sc_bits` reading as zeros."""
    return (bitmap & ~sc_bits) | (sc_bits << SC_ZERO_SHIFT)


_SWAP = sys.byteorder == "little"


def table_from_bytes(raw):
    """Big-endian on-disk table -> array('Q') in host order."""
    a = array("Q", raw)
    if _SWAP:
        a.byteswap()
    return a


def table_to_bytes(a):
    """array('Q') in host order -> big-endian bytes for the disk."""
    if not _SWAP:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


# Kinds a guest range can have within one layer.
UNALLOCATED = 0  # read through to the backing file (zeros past its end / without one)
ZERO = 1  # reads as zeros, allocated at this layer
DATA = 2  # plain data at a host offset
COMPRESSED = 3  # a compressed cluster (whole clusters only)


def compressed_descriptor(entry, cluster_bits):
    """(host byte offset, byte length to read) of a compressed L2 entry."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    nsect = (entry >> x) & ((1 << (cluster_bits - 8)) - 1)
    return offset, (nsect + 1) * 512 - (offset & 511)


def compressed_host_clusters(entry, cluster_bits):
    """Host cluster indexes a compressed cluster occupies (for refcounts)."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    nsect = (entry >> x) & ((1 << (cluster_bits - 8)) - 1)
    start = offset & ~511
    end = start + (nsect + 1) * 512
    return range(start >> cluster_bits, ((end - 1) >> cluster_bits) + 1)
