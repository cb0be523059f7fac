"""Creating an empty qcow2 overlay (what `qemu-img create -b BACKING -F FMT` makes), so a
live snapshot needs no qemu-img at run time.

Layout (version 3, refcount_bits 16, no lazy refcounts, compression deflate):
cluster 0 the header, its extensions (backing format) and the backing file name;
cluster 1 the refcount table; cluster 2 its one refcount block; then the L1 table,
all zero. One refcount block covers cluster_size / 2 clusters, far more than this
metadata needs. The file is written and synced whole before anyone may name it.
"""

import os

from .errors import QcowError
from .header import (
    COMPRESSION_DEFLATE,
    EXT_BACKING_FORMAT,
    MAX_BACKING_NAME,
    QCOW_MAGIC,
    Extension,
    Header,
)
from .paths import absolute

DEFAULT_CLUSTER_BITS = 16  # QEMU's default cluster size, 64 KiB
REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default
HEADER_LENGTH = 112  # what QEMU writes (with the compression type byte)


def overlay_layout(virtual_size, cluster_bits=DEFAULT_CLUSTER_BITS):
    """(l1_size, l1_offset, number of clusters) of a fresh image of `virtual_size`."""
    cs = 1 << cluster_bits
    l1_size = -(-virtual_size // (cs * (cs // 8)))
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    return l1_size, 3 * cs, 3 + l1_clusters


def overlay_bytes(virtual_size, backing_name, backing_format, cluster_bits=DEFAULT_CLUSTER_BITS):
    """The whole file of an empty overlay, as bytes."""
    cs = 1 << cluster_bits
    if len(backing_name.encode()) > MAX_BACKING_NAME:
        raise QcowError(
            None, f"backing file name longer than {MAX_BACKING_NAME} bytes: {backing_name}"
        )
    l1_size, l1_offset, nclusters = overlay_layout(virtual_size, cluster_bits)
    h = Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=virtual_size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=cs,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=REFCOUNT_ORDER,
        header_length=HEADER_LENGTH,
        compression_type=COMPRESSION_DEFLATE,
        extensions=[Extension(EXT_BACKING_FORMAT, backing_format.encode())],
        backing_name=backing_name,
    )
    out = bytearray(nclusters * cs)
    cluster0 = h.pack_cluster0()
    assert cluster0[:4] == QCOW_MAGIC
    out[: len(cluster0)] = cluster0
    out[cs : cs + 8] = (2 * cs).to_bytes(8, "big")  # refcount table -> block
    for c in range(nclusters):  # every cluster used once
        out[2 * cs + 2 * c : 2 * cs + 2 * c + 2] = (1).to_bytes(2, "big")
    return bytes(out)


def create_overlay(
    path, virtual_size, backing_name, backing_format, cluster_bits=DEFAULT_CLUSTER_BITS
):
    """Create `path` (it must not exist) as an empty qcow2 image over `backing_name`,
    durably (file and directory entry synced). QcowError if it exists or cannot be made."""
    data = overlay_bytes(virtual_size, backing_name, backing_format, cluster_bits)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise QcowError(path, "already exists; a snapshot creates a new image") from None
    except OSError as e:
        raise QcowError(path, f"cannot create: {e.strerror}") from None
    try:
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(os.path.dirname(absolute(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise QcowError(path, f"cannot create: {e.strerror}") from None
