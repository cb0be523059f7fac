"""One qcow2 image (a layer of a chain): opening, cluster mapping, reads, header changes
and durability; the write path is in qcow/cluster_write.py (`ClusterWriter`).

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
import os
import struct
from array import array

from . import compressed
from .cluster_write import ClusterWriter
from .errors import CorruptImage, QcowError, UnsupportedImage, eio
from .header import (
    EXT_BACKING_FORMAT,
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
    NOT_PLAIN,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    SC_ALLOC_MASK,
    SC_ZERO_SHIFT,
    UNALLOCATED,
    ZERO,
    compressed_descriptor,
    table_from_bytes,
    table_to_bytes,
)
from .layer import UNMAPPED
from .lockdep import make_lock
from .rawio import RawIO
from .read_map import MapStamp
from .refcount import Refcounts
from .runs import append_run
from .snapshot import parse_snapshot_table


def append_extent(out, start, length, kind, aux):
    """Append (start, length, kind, aux), merged into the previous run when it continues
    it (same kind, and the host offset continues too; COMPRESSED never merges: aux is
    its L2 entry)."""
    append_run(out, (start, length, kind, aux), host_index=3)


class Qcow2Image(ClusterWriter):
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
        map_stamp=None,
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
        # bumped after every change to what this layer maps (the chain's read map)
        self.map_stamp = map_stamp or MapStamp()
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
        self.virtual_size = h.virtual_size
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
        """Host offset of [off, off+n) when it lies in plain data clusters of one cached
        L2 table that follow each other in the file, alike (for writes: owned,
        QCOW_OFLAG_COPIED, in an image already prepared for writing); for reads UNMAPPED
        when this layer maps nothing there (the read goes on to the backing file); else
        None, and the caller takes the general path. The per-request fast path of the
        mount, and of a commit's copy into clusters base owns."""
        cb = self.cluster_bits
        ci = off >> cb
        more = ((off + n - 1) >> cb) - ci  # clusters after the first
        if self.extended_l2 or (for_write and not self.prepared_for_write):
            return None
        l1i, l2i = divmod(ci, self.l2_entries)
        if l1i >= len(self.l1) or l2i + more >= self.l2_entries:
            return None
        l2off = self.l1[l1i] & L1E_OFFSET_MASK
        if not l2off:
            return None if for_write else UNMAPPED
        table = self.l2_cache.peek(l2off)
        if table is None:
            return None
        entry = table[l2i]
        if not entry:
            if for_write or any(table[l2i + 1 : l2i + 1 + more]):
                return None
            return UNMAPPED
        if entry & NOT_PLAIN or (for_write and not entry & QCOW_OFLAG_COPIED):
            return None
        host = entry & L2E_OFFSET_MASK
        if not host or host & (self.cluster_size - 1) or host + (more << cb) >= self.file_size:
            return None
        for k in range(1, more + 1):
            # the same flags, the next host cluster (offsets stay below the flag bits)
            if table[l2i + k] != entry + (k << cb):
                return None
        return host + (off & (self.cluster_size - 1))

    def extents(self, off, n, want_zero=False):
        """Runs (start, length, kind, aux) covering [off, off+n) of this layer alone.

        kind is UNALLOCATED (aux: the host offset of an unallocated subcluster of an
        allocated cluster, else None), ZERO (aux: host offset if preallocated, else
        None), DATA (aux: host offset of `start`) or COMPRESSED (aux: the L2 entry; one
        cluster).
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
                if not self.extended_l2:
                    self._extents_std(out, table, l2i, off, stop)
                    off = stop
                    continue
                while off < stop:
                    cstart = off & ~(cs - 1)
                    cend = min(stop, cstart + cs)
                    self._extents_ext(out, table, l2i, cstart, off, cend)
                    off = cend
                    l2i += 1
        return out

    def _extents_std(self, out, table, l2i, off, stop):
        """The runs of [off, stop), inside one standard L2 table from entry l2i on. The
        hot loop of every scan: the run being built stays in local variables, and goes
        to `out` (through append_extent, which may merge it) only when one ends."""
        cs = self.cluster_size
        zero_flag = QCOW_OFLAG_ZERO if self.header.version >= 3 else 0
        run_start, run_kind, run_aux = off, None, None
        while off < stop:
            cstart = off & ~(cs - 1)
            cend = min(stop, cstart + cs)
            entry = table[l2i]
            l2i += 1
            if entry & QCOW_OFLAG_COMPRESSED:
                if run_kind is not None:
                    append_extent(out, run_start, off - run_start, run_kind, run_aux)
                out.append((off, cend - off, COMPRESSED, entry))
                run_start, run_kind, off = cend, None, cend
                continue
            host = entry & L2E_OFFSET_MASK
            if host:
                host = self._host(host, cstart) + off - cstart
            else:
                host = None
            kind = ZERO if entry & zero_flag else DATA if host is not None else UNALLOCATED
            if kind != run_kind or not (
                (run_aux is None and host is None)
                or (run_aux is not None and host is not None and run_aux + off - run_start == host)
            ):
                if run_kind is not None:
                    append_extent(out, run_start, off - run_start, run_kind, run_aux)
                run_start, run_kind, run_aux = off, kind, host
            off = cend
        if run_kind is not None:
            append_extent(out, run_start, off - run_start, run_kind, run_aux)

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
            else:  # in an allocated cluster, its place in the file (QEMU reports it)
                append_extent(
                    out, off, send - off, UNALLOCATED, host + off - cstart if host else None
                )
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

    def why_not_resizable(self):
        """Why the virtual size must not change, or None. A v2 image's snapshots do not
        record their disk size: once it changed, none of them could be reverted to
        (QEMU refuses to resize such an image)."""
        if self.header.version < 3 and self.snapshots:
            return (
                "a v2 (compat=0.10) image with internal snapshots cannot be resized "
                "(its snapshots do not record their disk size); upgrade it first: "
                f"qemu-img amend -o compat=1.1 {self.path}"
            )
        return None

    def resize(self, new_size):
        """Grow the virtual size (L1 first, header last). The new area is unallocated:
        `Chain.grow` zeroes it where a longer backing file would show through.
        Rare (once per commit into a smaller base), so it holds the layer's lock across
        its barriers."""
        refusal = self.why_not_resizable()
        if refusal:
            raise QcowError(self.path, refusal)
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
            self.io.pwrite_header(*h.pack_fields("size"))  # header after the tables
            self.io.sync()
            self.virtual_size = new_size
            self.map_stamp.bump()

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
        self.io.pwrite_header(*h.pack_fields("l1_size", "l1_table_offset"))
        self.io.sync()  # header before freeing the old table
        self.l1 = new
        self.l1_dirty.clear()
        if old_len:
            self.refcounts.free(old_off >> cb, -(-old_len * 8 // cs))

    def set_backing(self, name, fmt, flush_first=True):
        """Rewrite the backing file name and format in one header write (last).
        flush_first: see `_rewrite_cluster0`."""

        def change(h):
            h.backing_name = name
            h.set_extension(EXT_BACKING_FORMAT, fmt.encode() if name and fmt else None)

        self._rewrite_cluster0(change, flush_first=flush_first)
        self.backing_name = name
        self.backing_format = self.header.backing_format

    def mark_drained(self, base_path, durable=True):
        """Record in the header that a commit drained this layer into `base_path`
        (EXT_QCOWFS_DRAINED): it is a leftover from now on. durable=False: see
        `_rewrite_cluster0` (an active commit's pivot, under the chain's lock)."""
        self._rewrite_cluster0(
            lambda h: h.set_extension(EXT_QCOWFS_DRAINED, base_path.encode()), durable
        )

    def set_extension(self, ext_type, data, flush_first=True):
        """Set (bytes) or remove (None) one header extension, header written last.
        QcowError if the header would no longer fit in cluster 0. flush_first: see
        `_rewrite_cluster0`."""
        self._rewrite_cluster0(lambda h: h.set_extension(ext_type, data), flush_first=flush_first)

    def _rewrite_cluster0(self, change, durable=True, flush_first=True):
        """Apply `change` to the header and write cluster 0 in one request, after
        everything else of the image is durable (the header goes last).

        flush_first=False: the change relies on nothing else written to this image
        (a commit's new backing file relies on base, flushed by the caller; its intent
        record on nothing), so cluster 0 alone is made durable, without waiting for
        the image's other writes: on the active image those are the guest's, whose
        fdatasync took 200 ms under load. The header's table offsets need no flush
        either: a change that moves a table is written after one.

        durable=False only writes it (no flush before, no sync after, not the flush
        lock a running fdatasync may hold): for a change that moves no table, made
        where a sync would stall the guest; the caller makes it durable before a later
        flush of the disk returns."""
        if not durable:
            with self.lock:
                self.io.pwrite_header(self._changed_cluster0(change), 0)
        elif not flush_first:
            with self.flush_lock:  # durable header writes one at a time
                with self.lock:
                    data = self._changed_cluster0(change)
                    self.io.header_idle.clear()
                self.io.pwrite_header_durable(data)  # not under the lock: it syncs
        else:
            self.flush()
            with self.flush_lock:
                with self.lock:
                    self.io.pwrite_header(self._changed_cluster0(change), 0)
                self.io.sync()

    def _changed_cluster0(self, change):
        """Cluster 0 with `change` applied to the header (the layer's lock held);
        QcowError, the header unchanged, if it no longer fits."""
        self._prepare_write()
        h = self.header
        saved = copy.deepcopy(h)
        change(h)
        try:
            return h.pack_cluster0()
        except ValueError:
            self.header = saved
            raise QcowError(
                self.path,
                "the header does not fit in its cluster (backing file name too long?)",
            ) from None

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
                    self.io.pwrite_header(*h.pack_fields("incompatible_features"))
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
