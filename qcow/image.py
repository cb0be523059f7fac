"""One qcow2 image (a layer of a chain): cluster mapping, reads, and writes.

The image knows nothing of the chain above it; what lies beneath it comes in as a
`below(offset, length) -> bytes` callable (the backing chain's view, zeros past a short
backing file's end), used for copy-on-write of partially written clusters.

Ordering rules (crash safety; a crash may leak clusters, never corrupt):
- guest data and copy-on-write data before the L2 entry that points at it, and refcount
  blocks before the L2 entry that uses the clusters they count: the L2 cache depends on
  the refcount cache, and a flush barrier precedes every L2 write-back (table_cache);
- an L2 table before the L1 entry that points at it (`flush`: barrier, then L1);
- a cleared L2 entry before the refcount decrement of the cluster it dropped
  (`Refcounts.free` defers; `flush` applies after the barrier);
- a new L1 table before the header that points at it, and the header before the old
  table is freed (`resize`);
- the header last: backing name/format are rewritten only after everything else of the
  image is durable (`set_backing`).
"""

import copy
import errno
import os
import struct
from array import array

from . import compressed
from .bitmaps import bitmap_regions, region_clusters
from .errors import CorruptImage, QcowError, UnsupportedImage, eio
from .header import (
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_DATA_FILE,
    EXT_FDE,
    EXT_QCOWFS_DRAINED,
    HEADER_PROBE_BYTES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    parse_header,
)
from .l2_table import (
    COMPRESSED,
    DATA,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    SC_ALLOC_MASK,
    SC_ZERO_SHIFT,
    UNALLOCATED,
    ZERO,
    compressed_descriptor,
    compressed_host_clusters,
    table_from_bytes,
    table_to_bytes,
)
from .layer import UNMAPPED
from .lockdep import make_lock
from .rawio import RawIO
from .refcount import Refcounts
from .runs import append_run
from .snapshot import parse_snapshot_table

_NOT_PLAIN = QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO


def append_extent(out, start, length, kind, aux):
    """Append (start, length, kind, aux), merged into the previous run when it continues
    it (same kind, and the host offset continues too; COMPRESSED never merges: aux is
    its L2 entry)."""
    append_run(out, (start, length, kind, aux), host_index=3)


class _Fill:
    """Bytes read from `below` for a write's copy-on-write, keyed by guest range."""

    def __init__(self):
        self.got = {}

    def covers(self, need):
        return all(r in self.got for r in need)

    def fetch(self, below, need):
        for s, ln in need:
            if (s, ln) not in self.got:
                self.got[(s, ln)] = below(s, ln) if below is not None else bytes(ln)

    def read(self, s, ln):
        """[s, s+ln) out of the fetched range holding it (no copy)."""
        data = self.got.get((s, ln))
        if data is not None:
            return data
        for (fs, fln), data in self.got.items():
            if fs <= s and s + ln <= fs + fln:
                return memoryview(data)[s - fs : s - fs + ln]
        raise KeyError((s, ln))


class _HostRun:
    """In-place writes whose host offsets continue each other, sent as one pwritev."""

    def __init__(self, io):
        self.io = io
        self.bufs = []
        self.start = self.end = 0

    def add(self, host, bufs):
        """Buffers to write one after the other from host."""
        if self.bufs and host != self.end:
            self.flush()
        if not self.bufs:
            self.start = host
        self.bufs += bufs
        self.end = host + sum(len(b) for b in bufs)

    def flush(self):
        if self.bufs:
            self.io.pwritev(self.bufs, self.start)
            self.bufs = []


class Qcow2Image:
    format = "qcow2"

    has_cache = True

    def __init__(
        self,
        path,
        writable=False,
        cache_bytes=32 << 20,
        metadata_only=False,
        rawio_factory=RawIO,
        filename=None,
        reuse_ok=None,
    ):
        self.path = path
        self.filename = filename or path  # as the chain shows it (QEMU's filename)
        self.read_only = not writable
        self.io = rawio_factory(path, writable)
        # Lock order (qcow.lockdep): chain -> flush -> layer. `lock` guards the
        # metadata and is never held while calling `below` (the chain) or across a
        # fdatasync of a steady-state flush; `flush_lock` serialises flushes and
        # header rewrites and is held across their barriers. Guest reads take only
        # `lock`, briefly.
        self.lock = make_lock("layer")
        self.flush_lock = make_lock("flush")
        # the chain's say: False while a read that may use freed clusters is in flight
        self.reuse_ok = reuse_ok or (lambda: True)
        try:
            self._open(cache_bytes, metadata_only)
        except BaseException:
            self.io.close()
            raise

    def _open(self, cache_bytes, metadata_only):
        file_size = self.io.size()
        head = self.io.pread(HEADER_PROBE_BYTES, 0)
        if len(head) >= 24:
            cb = struct.unpack_from(">I", head, 20)[0]
            if HEADER_PROBE_BYTES < (1 << min(cb, 30)) <= (2 << 20):
                head = self.io.pread(1 << cb, 0)
        self.header = h = parse_header(head, file_size, self.path)
        self.file_size = file_size
        self.encrypted = h.crypt_method != 0
        if (h.incompatible_features & INCOMPAT_DATA_FILE) or h.extension(EXT_DATA_FILE):
            raise UnsupportedImage(self.path, "external data files are not supported")
        if self.encrypted and not metadata_only:
            raise UnsupportedImage(self.path, "encrypted images are not supported")
        if h.extension(EXT_FDE) is not None and not self.encrypted:
            raise CorruptImage(self.path, "full disk encryption header without encryption")
        if h.incompatible_features & INCOMPAT_CORRUPT and not self.read_only:
            raise CorruptImage(
                self.path, "image is marked corrupt; repair it with 'qemu-img check -r all' first"
            )
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.extended_l2 = h.extended_l2
        self.l2_entries = cs // (16 if self.extended_l2 else 8)
        self.subcluster_bits = h.cluster_bits - (5 if self.extended_l2 else 0)
        self.virtual_size = h.size
        self.backing_name = h.backing_name
        self.backing_format = h.backing_format
        self.l1 = table_from_bytes(self.io.pread_exact(h.l1_size * 8, h.l1_table_offset))
        self.l1_dirty = set()
        self.snapshots = parse_snapshot_table(self.io.pread_exact, h, file_size, self.path)
        capacity = max(4, cache_bytes // cs)
        self.l2_cache = None
        self.refcounts = None
        self._decompressed = (None, None)  # last compressed entry read, and its cluster
        self._preallocated = None
        self.prepared_for_write = False
        if not self.read_only:
            self.refcounts = Refcounts(self, max(4, capacity // 4))
        self.l2_cache = self._new_l2_cache(capacity)
        # lazy refcounts left dirty by a crash: rebuilt by repair_if_dirty(), which the
        # opener calls once it holds the image's locks (the repair writes)
        self.needs_repair = not self.read_only and bool(h.incompatible_features & INCOMPAT_DIRTY)

    def repair_if_dirty(self):
        if self.needs_repair:
            from .check import check_refcounts_and_tables

            check_refcounts_and_tables(self, repair=True)
            self.mark_clean()
            self.needs_repair = False

    def _new_l2_cache(self, capacity):
        from .table_cache import TableCache

        return TableCache(
            self.io,
            self.cluster_size,
            capacity,
            table_from_bytes,
            table_to_bytes,
            depends_on=self.refcounts.cache if self.refcounts else None,
        )

    # --- mapping (read side) ------------------------------------------------

    def _l2_offset(self, l1i):
        if l1i >= len(self.l1):
            return 0
        off = self.l1[l1i] & L1E_OFFSET_MASK
        if off and (off & (self.cluster_size - 1) or off >= self._size_for_check(off)):
            raise eio(self.path, f"L1 entry {l1i} points to an invalid L2 table offset 0x{off:x}")
        return off

    def _size_for_check(self, host):
        """The end of the image: the file's size, or past it what has been allocated
        but not yet written (a new L2 table lives in the cache until the next flush)."""
        if host >= self.file_size:
            self.file_size = self.io.size()
            if self.refcounts is not None:
                self.file_size = max(self.file_size, self.refcounts.end << self.cluster_bits)
        return self.file_size

    def _host(self, host, where):
        if host & (self.cluster_size - 1):
            raise eio(
                self.path,
                f"L2 entry for guest offset 0x{where:x} has a misaligned host offset 0x{host:x}",
            )
        if host >= self._size_for_check(host):
            raise eio(
                self.path,
                f"L2 entry for guest offset 0x{where:x} points outside the file (0x{host:x})",
            )
        return host

    def fast_host(self, off, n, for_write=False):
        """Host offset of [off, off+n) when it lies in one plain data cluster whose L2
        table is cached (for writes: owned, QCOW_OFLAG_COPIED, in an image already
        prepared for writing); for reads UNMAPPED when this layer maps nothing there
        (the read goes on to the backing file); else None, and the caller takes the
        general path. The per-request fast path of the mount."""
        cb = self.cluster_bits
        ci = off >> cb
        if (
            (off + n - 1) >> cb != ci
            or self.extended_l2
            or (for_write and not self.prepared_for_write)
        ):
            return None
        l1i, l2i = divmod(ci, self.l2_entries)
        if l1i >= len(self.l1):
            return None
        l2off = self.l1[l1i] & L1E_OFFSET_MASK
        if not l2off:
            return None if for_write else UNMAPPED
        table = self.l2_cache.peek(l2off)
        if table is None:
            return None
        entry = table[l2i]
        if not entry:
            return None if for_write else UNMAPPED
        if entry & _NOT_PLAIN or (for_write and not entry & QCOW_OFLAG_COPIED):
            return None
        host = entry & L2E_OFFSET_MASK
        if not host or host & (self.cluster_size - 1) or host >= self.file_size:
            return None
        return host + (off & (self.cluster_size - 1))

    def extents(self, off, n, want_zero=False):
        """Runs (start, length, kind, aux) covering [off, off+n) of this layer alone.

        kind is UNALLOCATED, ZERO (aux: host offset if preallocated, else None), DATA
        (aux: host offset of `start`) or COMPRESSED (aux: the L2 entry; one cluster).
        want_zero changes nothing here (see data_runs).
        """
        out = []
        end = off + n
        cb = self.cluster_bits
        cs = self.cluster_size
        with self.lock:
            while off < end:
                ci = off >> cb
                l1i, l2i = divmod(ci, self.l2_entries)
                stop = min(end, (l1i + 1) * self.l2_entries << cb)
                l2off = self._l2_offset(l1i)
                if not l2off:
                    append_extent(out, off, stop - off, UNALLOCATED, None)
                    off = stop
                    continue
                table = self.l2_cache.get(l2off)
                while off < stop:
                    cstart = off & ~(cs - 1)
                    cend = min(stop, cstart + cs)
                    if self.extended_l2:
                        self._extents_ext(out, table, l2i, cstart, off, cend)
                    else:
                        self._extents_std(out, table[l2i], cstart, off, cend)
                    off = cend
                    l2i += 1
        return out

    def _extents_std(self, out, entry, cstart, off, cend):
        if entry & QCOW_OFLAG_COMPRESSED:
            out.append((off, cend - off, COMPRESSED, entry))
            return
        host = entry & L2E_OFFSET_MASK
        if entry & QCOW_OFLAG_ZERO and self.header.version >= 3:
            aux = self._host(host, cstart) + off - cstart if host else None
            append_extent(out, off, cend - off, ZERO, aux)
        elif host:
            append_extent(out, off, cend - off, DATA, self._host(host, cstart) + off - cstart)
        else:
            append_extent(out, off, cend - off, UNALLOCATED, None)

    def _extents_ext(self, out, table, l2i, cstart, off, cend):
        entry, bitmap = table[2 * l2i], table[2 * l2i + 1]
        if entry & QCOW_OFLAG_COMPRESSED:
            if bitmap:
                raise eio(self.path, f"compressed cluster at 0x{cstart:x} has a subcluster bitmap")
            out.append((off, cend - off, COMPRESSED, entry))
            return
        host = entry & L2E_OFFSET_MASK
        if bitmap & (bitmap >> SC_ZERO_SHIFT) & SC_ALLOC_MASK:
            raise eio(self.path, f"cluster at 0x{cstart:x} has subclusters both allocated and zero")
        if host:
            self._host(host, cstart)
        scb = self.subcluster_bits
        while off < cend:
            sc = (off - cstart) >> scb
            send = min(cend, cstart + ((sc + 1) << scb))
            if bitmap >> sc & 1:
                if not host:
                    raise eio(
                        self.path, f"allocated subcluster without a host cluster at 0x{cstart:x}"
                    )
                append_extent(out, off, send - off, DATA, host + off - cstart)
            elif bitmap >> (SC_ZERO_SHIFT + sc) & 1:
                append_extent(out, off, send - off, ZERO, host + off - cstart if host else None)
            else:
                append_extent(out, off, send - off, UNALLOCATED, None)
            off = send

    def data_runs(self, start, length, host, want_zero):
        """[(start, length, zero, host)] of a DATA run, for block status: with want_zero
        and an image that looks preallocated, holes in the file inside data clusters
        read as zeros (what `qemu-img map` reports)."""
        if want_zero and self.looks_preallocated():
            return [
                (start + hs - host, hl, not is_data, hs)
                for hs, hl, is_data in self.io.data_runs(host, length)
            ]
        return [(start, length, False, host)]

    def share_cache(self, nbytes):
        """The chain's share of its cache budget for this layer's L2 tables."""
        self.l2_cache.capacity = max(4, nbytes // self.cluster_size)

    def looks_preallocated(self):
        """QEMU's guess (qcow2_detect_metadata_preallocation) that clusters were
        allocated without being written: more clusters counted than the file really
        occupies. Only then does `qemu-img map` ask the file system for holes inside
        data clusters, so `qcowfs map` does the same to report the same extents."""
        if self._preallocated is None:
            refcounts = self.refcounts or Refcounts(self, 16)
            st = os.fstat(self.io.fd)
            real = st.st_blocks * 512 // self.cluster_size
            threshold = max(real * 10 // 9, real + 2)
            allocated = 0
            self._preallocated = False
            for c in range(-(-st.st_size // self.cluster_size)):
                if refcounts.get(c):
                    allocated += 1
                    if allocated > threshold:
                        self._preallocated = True
                        break
        return self._preallocated

    def read_compressed(self, entry):
        """The whole decompressed cluster of a compressed L2 entry (EIO if broken)."""
        last_entry, data = self._decompressed
        if last_entry == entry:
            return data
        host, length = compressed_descriptor(entry, self.cluster_bits)
        if host >= self._size_for_check(host) or host < self.cluster_size:
            raise eio(
                self.path, f"compressed cluster descriptor points outside the file (0x{host:x})"
            )
        raw = self.io.pread(length, host)
        try:
            data = compressed.decompress(raw, self.cluster_size, self.header.compression_type)
        except ValueError as e:
            raise eio(self.path, f"compressed cluster at 0x{host:x}: {e}") from None
        self._decompressed = (entry, data)
        return data

    def is_allocated(self, off, n):
        """[(start, length, allocated)] at this layer (zero clusters count as allocated)."""
        out = []
        for s, ln, kind, _ in self.extents(off, n):
            append_run(out, (s, ln, kind != UNALLOCATED))
        return out

    # --- writing ----------------------------------------------------------

    def _check_writable(self):
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path}: image is opened read-only")

    def _prepare_write(self):
        """Before the first modification: clear autoclear bits we do not maintain, and
        drop persistent bitmaps (qcow.bitmaps), which would go stale: the header
        without them is durable before their clusters are freed (deferred frees)."""
        if self.prepared_for_write:
            return
        self._check_writable()
        h = self.header
        if h.version >= 3 and h.extension(EXT_BITMAPS) is not None:
            clusters = region_clusters(self, bitmap_regions(self))
            h.autoclear_features = 0
            h.set_extension(EXT_BITMAPS, None)
            self.io.pwrite(h.pack_cluster0(), 0)
            self.io.sync()
            for c in clusters:
                self.refcounts.free(c)
        elif h.version >= 3 and h.autoclear_features:
            h.autoclear_features = 0
            self.io.pwrite(*h.pack_fields("autoclear_features"))
            self.io.sync()
        self.prepared_for_write = True

    def _l2_for_write(self, l1i):
        """The L2 table for L1 index l1i, allocated or made private (COPIED) first."""
        l1e = self.l1[l1i]
        l2off = self._l2_offset(l1i)
        if l2off and l1e & QCOW_OFLAG_COPIED:
            return self.l2_cache.get(l2off)
        new = self.refcounts.alloc(1)
        if l2off:
            # shared with a snapshot: copy it; the copies of its entries keep COPIED
            # clear, since their clusters are counted once per table referencing them
            table = array("Q", self.l2_cache.get(l2off))
            self.refcounts.free(l2off >> self.cluster_bits)
        else:
            table = array("Q", bytes(self.cluster_size))
        self.l2_cache.install(new, table)
        self.l1[l1i] = new | QCOW_OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return table

    def _free_entry_clusters(self, entry):
        """Queue the refcount drop of whatever an L2 entry being replaced owned."""
        if entry & QCOW_OFLAG_COMPRESSED:
            for c in compressed_host_clusters(entry, self.cluster_bits):
                self.refcounts.free(c)
        else:
            host = entry & L2E_OFFSET_MASK
            if host:
                self.refcounts.free(host >> self.cluster_bits)

    def _view(self, entry, bitmap, cstart, a, b, below):
        """This layer's current content of guest [cstart+a, cstart+b) (for COW)."""
        if entry & QCOW_OFLAG_COMPRESSED:
            return self.read_compressed(entry)[a:b]
        runs = self._cluster_extents(entry, bitmap, cstart, a, b)
        if below is not None and len(runs) == 1 and runs[0][2] == UNALLOCATED:
            return below(cstart + a, b - a)  # all of it from beneath, as it came
        out = bytearray(b - a)
        for s, ln, kind, aux in runs:
            rel = s - cstart - a
            if kind == DATA:
                self.io.preadinto(memoryview(out)[rel : rel + ln], aux)
            elif kind == UNALLOCATED and below is not None:
                out[rel : rel + ln] = below(s, ln)
        return out

    def _cluster_extents(self, entry, bitmap, cstart, a, b):
        out = []
        if self.extended_l2:
            tbl = array("Q", [entry, bitmap])
            self._extents_ext(out, tbl, 0, cstart, cstart + a, cstart + b)
        else:
            self._extents_std(out, entry, cstart, cstart + a, cstart + b)
        return out

    def write(self, off, data, below):
        """Write guest data at this layer; partial clusters copy the rest from
        this layer's current view (copy-on-write from `below` where unallocated).

        Two phases, so that `below` (the chain beneath: it takes the chain's lock) is
        never called with this layer's lock held: plan which bytes the copy-on-write
        needs from below, read them without the lock, then write under the lock if the
        plan still holds (a concurrent write to this layer may have changed it: plan
        again)."""
        fill = _Fill()
        while True:
            with self.lock:
                self._prepare_write()
                need = self._below_ranges(off, len(data))
                if fill.covers(need):
                    self._write_locked(off, data, fill.read)
                    return
            fill.fetch(below, need)

    def _below_ranges(self, off, n):
        """The guest ranges a write of [off, off+n) would read from `below` now. A
        cluster this layer maps nothing of (standard L2) needs its bytes around the
        write: one read of the span [sa, sb) the fresh cluster gets, not two. Only the
        first and the last cluster can be partly written: a whole one keeps nothing."""
        out = []
        end = off + n
        cb, cs = self.cluster_bits, self.cluster_size
        first, last = off >> cb << cb, (end - 1) >> cb << cb
        for cstart in (first,) if first == last else (first, last):
            a, b = max(off, cstart) - cstart, min(cs, end - cstart)
            if a == 0 and b == cs:
                continue
            entry, bitmap = self._entry_at(cstart)
            _owned, sa, sb, _bits = self._write_span(entry, bitmap, a, b)
            if not entry and not self.extended_l2:
                if sa < a or b < sb:
                    out.append((cstart + sa, sb - sa))
            elif not entry & QCOW_OFLAG_COMPRESSED:
                for lo, hi in ((sa, a), (b, sb)):
                    if hi > lo:
                        out += [
                            (s, ln)
                            for s, ln, kind, _ in self._cluster_extents(
                                entry, bitmap, cstart, lo, hi
                            )
                            if kind == UNALLOCATED
                        ]
        return out

    def _entry_at(self, cstart):
        """(L2 entry, subcluster bitmap) of the cluster at guest offset cstart."""
        l1i, l2i = divmod(cstart >> self.cluster_bits, self.l2_entries)
        l2off = self._l2_offset(l1i)
        if not l2off:
            return 0, 0
        table = self.l2_cache.get(l2off)
        if self.extended_l2:
            return table[2 * l2i], table[2 * l2i + 1]
        return table[l2i], 0

    def _write_span(self, entry, bitmap, a, b):
        """How a write of [a, b) into a cluster with this entry is done:
        (owned: in place, [sa, sb): the bytes of the cluster written, their
        subcluster allocation bits). An owned cluster (QCOW_OFLAG_COPIED) is written in
        place, whole subclusters with extended L2; otherwise a fresh cluster gets
        [sa, sb), the whole cluster when there is old content to carry over."""
        cs = self.cluster_size
        host = entry & L2E_OFFSET_MASK
        compressed = entry & QCOW_OFLAG_COMPRESSED
        owned = bool(host and entry & QCOW_OFLAG_COPIED and not compressed)
        if self.extended_l2:
            if not owned and (host or compressed):
                return owned, 0, cs, SC_ALLOC_MASK
            scb = self.subcluster_bits
            sa = a >> scb << scb
            sb = min(cs, -(-b >> scb) << scb)
            return owned, sa, sb, ((1 << ((sb - 1 >> scb) + 1)) - 1) ^ ((1 << (sa >> scb)) - 1)
        if owned:
            return owned, a, b, 0  # in place (a zero cluster is rewritten whole)
        return owned, 0, cs, 0

    def _write_locked(self, off, data, below):
        mv = memoryview(data)
        end = off + len(mv)
        cb, cs = self.cluster_bits, self.cluster_size
        batch = []  # consecutive fresh clusters allocated together
        in_place = _HostRun(self.io)
        pos = 0
        table_l1i = table = None
        while off < end:
            ci = off >> cb
            l1i, l2i = divmod(ci, self.l2_entries)
            cstart = ci << cb
            a, b = off - cstart, min(cs, end - cstart)
            chunk = mv[pos : pos + b - a]
            if l1i != table_l1i:  # once per L2 table the write spans
                table_l1i, table = l1i, self._l2_for_write(l1i)
            fresh = self._write_cluster(table, l2i, cstart, a, b, chunk, below, in_place)
            if fresh is None:
                self._flush_batch(batch)
                batch = []
            else:
                batch.append(fresh)
            pos += b - a
            off = cstart + b
        self._flush_batch(batch)
        in_place.flush()

    def _write_cluster(self, table, l2i, cstart, a, b, chunk, below, in_place):
        """Write into one cluster. In place when this layer owns the cluster
        (QCOW_OFLAG_COPIED), through `in_place` (runs of them go out as one request);
        otherwise return what a fresh cluster must hold."""
        ext = self.extended_l2
        cs = self.cluster_size
        if ext:
            entry, bitmap = table[2 * l2i], table[2 * l2i + 1]
        else:
            entry, bitmap = table[l2i], 0
        host = entry & L2E_OFFSET_MASK
        owned, sa, sb, sc_bits = self._write_span(entry, bitmap, a, b)
        if owned:
            if ext:
                in_place.add(
                    host + sa, self._compose(entry, bitmap, cstart, sa, sb, a, b, chunk, below)
                )
                new_bitmap = (bitmap | sc_bits) & ~(sc_bits << SC_ZERO_SHIFT)
                if new_bitmap != bitmap:
                    table[2 * l2i + 1] = new_bitmap
                    self._l2_entry_dirty(cstart)
            elif entry & QCOW_OFLAG_ZERO:
                # preallocated zero cluster: it becomes data, zeros around the write
                buf = bytearray(cs)
                buf[a:b] = chunk
                in_place.add(host, [buf])
                table[l2i] = entry & ~QCOW_OFLAG_ZERO
                self._l2_entry_dirty(cstart)
            else:
                in_place.add(host + a, [chunk])
            return None
        bufs = self._compose(entry, bitmap, cstart, sa, sb, a, b, chunk, below)
        new_bitmap = (bitmap | sc_bits) & ~(sc_bits << SC_ZERO_SHIFT) if ext else 0
        return (table, l2i, cstart, entry, new_bitmap, sa, bufs, sb - sa)

    def _compose(self, entry, bitmap, cstart, sa, sb, a, b, chunk, below):
        """Buffers that make [sa, sb) of a cluster, in order: the current view before
        the write, the write's [a, b), the current view after it (written as one
        pwritev; nothing copied together)."""
        bufs = []
        if a > sa:
            bufs.append(self._view(entry, bitmap, cstart, sa, a, below))
        bufs.append(chunk)
        if sb > b:
            bufs.append(self._view(entry, bitmap, cstart, b, sb, below))
        return bufs

    def _l2_table_offset(self, cstart):
        return self.l1[(cstart >> self.cluster_bits) // self.l2_entries] & L1E_OFFSET_MASK

    def _l2_entry_pos(self, cstart):
        """Byte position of the L2 entry of the cluster at guest offset cstart in its table
        (the cache writes back only the slices holding changed entries)."""
        entry_size = self.cluster_size // self.l2_entries
        return (cstart >> self.cluster_bits) % self.l2_entries * entry_size

    def _l2_entry_dirty(self, cstart):
        self.l2_cache.mark_dirty(self._l2_table_offset(cstart), self._l2_entry_pos(cstart))

    def _flush_batch(self, batch):
        """Allocate fresh clusters for a run of consecutive clusters in one go, write
        their data in one request, then point the L2 entries at them (in the cache;
        the entries reach the disk only after a barrier)."""
        if not batch:
            return
        cb, cs = self.cluster_bits, self.cluster_size
        base = self.refcounts.alloc(len(batch))
        if (
            len(batch) > 1
            and all(item[7] == cs for item in batch[:-1])
            and all(item[5] == 0 for item in batch)
        ):  # one request for them all
            self.io.pwritev([buf for item in batch for buf in item[6]], base)
        else:
            for k, item in enumerate(batch):
                self.io.pwritev(item[6], base + (k << cb) + item[5])
        self.file_size = max(self.file_size, base + (len(batch) << cb))
        for k, (table, l2i, cstart, entry, new_bitmap, *_data) in enumerate(batch):
            host = base + (k << cb)
            if self.extended_l2:
                table[2 * l2i] = host | QCOW_OFLAG_COPIED
                table[2 * l2i + 1] = new_bitmap
            else:
                table[l2i] = host | QCOW_OFLAG_COPIED
            if entry:
                self._free_entry_clusters(entry)
            # the table may have been evicted since the batch took it: put it back
            self.l2_cache.put_back(self._l2_table_offset(cstart), table, self._l2_entry_pos(cstart))

    def write_zeroes(self, off, n, below):
        """Make [off, off+n) read as zeros at this layer, whatever lies beneath.

        Whole clusters become zero clusters (v3) or, on v2 without a backing file,
        unallocated; their old clusters are freed. Partial clusters and v2 images with a
        backing file get real zeros written (through `write`, outside this layer's lock:
        their copy-on-write may read from `below`).
        """
        end = off + n
        while off < end:
            with self.lock:
                self._prepare_write()
                off, writes, zero_bits = self._zero_clusters(off, end)
            for s, ln in writes:
                self.write(s, bytes(ln), below)
            if zero_bits:
                with self.lock:
                    self._set_zero_bits(*zero_bits)

    def _zero_clusters(self, off, end):
        """Zero whole clusters from `off` on, up to the first cluster that needs real
        zeros written: (where to go on, [(start, length)] to write as data, subclusters
        to mark zero after those writes or None)."""
        cb, cs = self.cluster_bits, self.cluster_size
        v3 = self.header.version >= 3
        while off < end:
            cstart = off & ~(cs - 1)
            cend = min(end, cstart + cs)
            l1i, l2i = divmod(cstart >> cb, self.l2_entries)
            if off == cstart and cend - cstart == cs and (v3 or self.backing_name is None):
                table = self._l2_for_write(l1i)
                self._set_entry(
                    table,
                    l2i,
                    cstart,
                    0 if not v3 or self.extended_l2 else QCOW_OFLAG_ZERO,
                    SC_ALLOC_MASK << SC_ZERO_SHIFT if self.extended_l2 else 0,
                )
            elif self.extended_l2:
                writes, zero_bits = self._zero_subclusters(cstart, off, cend)
                return cend, writes, zero_bits
            elif not self._reads_zero(off, cend):
                return cend, [(off, cend - off)], None
            off = cend
        return off, [], None

    def _set_entry(self, table, l2i, cstart, entry, bitmap):
        old = table[2 * l2i] if self.extended_l2 else table[l2i]
        if self.extended_l2:
            table[2 * l2i], table[2 * l2i + 1] = entry, bitmap
        else:
            table[l2i] = entry
        self._l2_entry_dirty(cstart)
        self._free_entry_clusters(old)

    def _reads_zero(self, off, cend):
        for _s, _ln, kind, _aux in self.extents(off, cend - off):
            if kind == UNALLOCATED and self.backing_name is not None:
                return False
            if kind in (DATA, COMPRESSED):
                return False
        return True

    def _zero_subclusters(self, cstart, off, cend):
        """Extended L2, part of a cluster: whole subclusters become zero subclusters
        (after the partial edges are written: a write into a cluster with old content
        reallocates it whole), the edges real zeros."""
        scb = self.subcluster_bits
        a, b = off - cstart, cend - cstart
        sa, sb = -(-a >> scb) << scb, b >> scb << scb
        entry, _bitmap = self._entry_at(cstart)
        if sa >= sb or entry & QCOW_OFLAG_COMPRESSED:
            return [(off, cend - off)], None
        writes = []
        if a < sa:
            writes.append((off, sa - a))
        if b > sb:
            writes.append((cstart + sb, b - sb))
        return writes, (cstart, sa, sb)

    def _set_zero_bits(self, cstart, sa, sb):
        scb = self.subcluster_bits
        l1i, l2i = divmod(cstart >> self.cluster_bits, self.l2_entries)
        table = self._l2_for_write(l1i)
        bits = ((1 << (sb >> scb)) - 1) ^ ((1 << (sa >> scb)) - 1)
        table[2 * l2i + 1] = (table[2 * l2i + 1] & ~bits) | (bits << SC_ZERO_SHIFT)
        self._l2_entry_dirty(cstart)

    def mark_unallocated(self, off, n):
        """Drop whole clusters of [off, off+n) from this layer (they read through to the
        backing file again). Used by the restartable commit only after base holds them
        durably. `off` and `n` are cluster-aligned (n may end at the virtual size)."""
        with self.lock:
            self._prepare_write()
            cb, cs = self.cluster_bits, self.cluster_size
            assert off % cs == 0
            end = min(off + n, -(-self.virtual_size // cs) * cs)
            for cstart in range(off, end, cs):
                l1i, l2i = divmod(cstart >> cb, self.l2_entries)
                if not self._l2_offset(l1i):
                    continue
                table = self._l2_for_write(l1i)
                self._set_entry(table, l2i, cstart, 0, 0)

    def resize(self, new_size):
        """Grow the virtual size (L1 first, header last). The new area is unallocated:
        `Chain.grow` zeroes it where a longer backing file would show through.
        Rare (once per commit into a smaller base), so it holds the layer's lock across
        its barriers."""
        with self.flush_lock, self.lock:
            self._prepare_write()
            old = self.virtual_size
            if new_size < old:
                raise QcowError(self.path, "shrinking is not supported")
            if new_size == old:
                return
            h = self.header
            needed = -(-new_size // (self.cluster_size * self.l2_entries))
            if needed > len(self.l1):
                self._grow_l1(needed)
            h.size = new_size
            self._flush()
            self.io.pwrite(*h.pack_fields("size"))  # header after the tables
            self.io.sync()
            self.virtual_size = new_size

    def _grow_l1(self, entries):
        cb, cs = self.cluster_bits, self.cluster_size
        h = self.header
        clusters = -(-entries * 8 // cs)
        self._flush()  # L2 tables durable before a new L1 names them
        new_off = self.refcounts.alloc(clusters)
        new = array("Q", self.l1)
        new.extend([0] * (entries - len(new)))
        raw = table_to_bytes(new)
        self.io.pwrite(raw + bytes(clusters * cs - len(raw)), new_off)
        self.refcounts.flush()
        self.io.sync()  # new L1 and its refcounts before the header
        old_off, old_len = h.l1_table_offset, len(self.l1)
        h.l1_table_offset, h.l1_size = new_off, entries
        self.io.pwrite(*h.pack_fields("l1_size", "l1_table_offset"))
        self.io.sync()  # header before freeing the old table
        self.l1 = new
        self.l1_dirty.clear()
        if old_len:
            self.refcounts.free(old_off >> cb, -(-old_len * 8 // cs))

    def set_backing(self, name, fmt):
        """Rewrite the backing file name and format in one header write (last)."""

        def change(h):
            h.backing_name = name
            h.set_extension(EXT_BACKING_FORMAT, fmt.encode() if name and fmt else None)

        self._rewrite_cluster0(change)
        self.backing_name = name
        self.backing_format = self.header.backing_format

    def mark_drained(self, base_path):
        """Record in the header that a restartable commit drained this layer into
        `base_path` (EXT_QCOWFS_DRAINED): it is a leftover from now on."""
        self._rewrite_cluster0(lambda h: h.set_extension(EXT_QCOWFS_DRAINED, base_path.encode()))

    def set_extension(self, ext_type, data):
        """Set (bytes) or remove (None) one header extension, header written last.
        QcowError if the header would no longer fit in cluster 0."""
        self._rewrite_cluster0(lambda h: h.set_extension(ext_type, data))

    def _rewrite_cluster0(self, change):
        """Apply `change` to the header and write cluster 0 in one request, after
        everything else of the image is durable (the header goes last)."""
        self.flush()
        with self.flush_lock:
            with self.lock:
                self._prepare_write()
                h = self.header
                saved = copy.deepcopy(h)
                change(h)
                try:
                    cluster0 = h.pack_cluster0()
                except ValueError:
                    self.header = saved
                    raise QcowError(
                        self.path,
                        "the header does not fit in its cluster (backing file name too long?)",
                    ) from None
                self.io.pwrite(cluster0, 0)
            self.io.sync()

    # --- durability -------------------------------------------------------

    def flush(self):
        """Make everything written so far durable, in the order the spec needs."""
        if self.read_only or self.io.fd < 0:
            return
        with self.flush_lock:
            self._flush()

    def _flush(self):
        """The flush itself; the caller holds `flush_lock`, so flushes run one at a time
        and only they write L2 tables and L1 entries.

        The metadata is cut under the layer's lock (refcount blocks written, dirty L2
        tables encoded, dirty L1 entries and queued frees taken), and the barriers run
        without it, so guest requests go on meanwhile. Order on disk:
        guest data and refcount blocks -> barrier -> L2 tables -> barrier -> L1 entries
        -> barrier -> refcount decrements of the clusters those entries dropped.
        A table modified after the cut stays dirty (and in the cache) for the next flush.
        """
        with self.lock:
            if self.io.fd < 0:
                return
            frees = self.refcounts.take_pending_frees()
            l1 = [(i, self.l1[i]) for i in sorted(self.l1_dirty)]
            self.l1_dirty.clear()
            l1_offset = self.header.l1_table_offset
            try:
                self.refcounts.flush()
                tables = self.l2_cache.take_dirty()
            except BaseException:
                self._uncut(frees, l1)
                raise
        try:
            self.io.sync()
            if tables:
                for file_offset, raw, _table, _slices in tables:
                    self.io.pwrite(raw, file_offset)
                self.io.sync()
                with self.lock:
                    self.l2_cache.written(tables)
            if l1:
                for i, entry in l1:
                    self.io.pwrite(struct.pack(">Q", entry), l1_offset + 8 * i)
                self.io.sync()
        except BaseException:
            with self.lock:
                self._uncut(frees, l1)
            raise
        if frees:
            with self.lock:
                if not self.reuse_ok():
                    # a read in flight may still use these clusters: a later flush
                    self._uncut(frees, [])
                    return
                self.refcounts.apply_frees(frees)
                self.refcounts.flush()
            self.io.sync()

    def _uncut(self, frees, l1):
        """Give back what a flush took but did not make durable."""
        self.refcounts.pending_free[:0] = frees
        for i, _entry in l1:
            self.l1_dirty.add(i)

    def writeback_if_full(self):
        """Flush when the L2 cache is over its capacity with dirty tables (it never
        evicts a dirty one: writing it would need a barrier under the layer's lock).
        Callers run it holding no lock."""
        if self.l2_cache is not None and self.l2_cache.over_capacity():
            self.flush()

    def mark_clean(self):
        h = self.header
        if h.version >= 3 and h.incompatible_features & INCOMPAT_DIRTY:
            self.flush()
            with self.flush_lock:
                with self.lock:
                    h.incompatible_features &= ~INCOMPAT_DIRTY
                    self.io.pwrite(*h.pack_fields("incompatible_features"))
                self.io.sync()

    def close(self):
        with self.flush_lock:  # a flush in another thread finishes first
            try:
                if not self.read_only and self.io.fd >= 0:
                    self._flush()
                    with self.lock:
                        self.refcounts.trim()  # the file clean: its unused tail goes
            finally:
                self.io.close()
