"""What the chain needs of a layer: the one interface `Qcow2Image` and `RawImage` share.

The chain never asks which format a layer is (crosvm's `DiskFile` idea): anything a format
does not have (tables to cache, a dirty flag) is a no-op there; only a qcow2 layer yields
COMPRESSED runs, so only it has `read_compressed(entry)`. Locks: `lock` (class "layer")
guards the layer's metadata and is never held while calling `below`; `flush_lock` (class
"flush") serialises its flushes (qcow.lockdep gives the order).
"""

from collections.abc import Callable
from typing import Protocol

from .read_map import MapStamp

# (start, length, kind, aux): kind is qcow.l2_table's UNALLOCATED, ZERO, DATA or
# COMPRESSED; aux the host offset (DATA, preallocated ZERO) or the L2 entry (COMPRESSED)
Run = tuple[int, int, int, object]
Below = Callable[[int, int], bytes]  # the chain's view beneath a layer (copy-on-write)
UNMAPPED = -1  # fast_host for a read: nothing at this layer, the backing file answers


class Layer(Protocol):
    path: str  # absolute
    filename: str  # as the chain shows it (QEMU's "filename")
    format: str  # "qcow2" or "raw"
    virtual_size: int
    cluster_size: int  # raw: the granularity commits copy in
    read_only: bool
    backing_name: str | None
    backing_format: str | None
    encrypted: bool
    has_cache: bool  # takes a share of the chain's cache budget
    map_stamp: MapStamp  # bumped after each change to what the layer maps (the read map)

    def extents(self, off: int, n: int, want_zero: bool = False) -> list[Run]: ...
    def data_runs(
        self, start: int, length: int, host: int, want_zero: bool
    ) -> list[tuple[int, int, bool, int]]: ...
    def fast_host(self, off: int, n: int, for_write: bool = False) -> int | None: ...
    def is_allocated(self, off: int, n: int) -> list[tuple[int, int, bool]]: ...
    def write(self, off: int, data, below: Below | None) -> None: ...
    def write_zeroes(self, off: int, n: int, below: Below | None) -> None: ...
    def writeback_if_full(self) -> None: ...
    def why_not_resizable(self) -> str | None: ...
    def resize(self, new_size: int) -> None: ...
    def flush(self) -> None: ...
    def share_cache(self, nbytes: int) -> None: ...
    def repair_if_dirty(self) -> None: ...
    def mark_clean(self) -> None: ...
    def close(self) -> None: ...
