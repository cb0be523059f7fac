"""Writing guest data into a qcow2 image: cluster allocation, copy-on-write of partly
written clusters, zero clusters and subclusters, and unallocation (the restartable
commit's "forget"). `Qcow2Image` takes these methods from `ClusterWriter`; they use its
tables, caches and locks (see qcow/image.py for the ordering rules they follow).

A write is two-phase, so that `below` (the chain beneath, which takes the chain's lock)
is never called with this layer's lock held: plan under the lock which copy-on-write
ranges a write needs from below, read them without the lock, then write under the
lock if the plan still holds, else plan again. Ordering: data (guest and copy-on-write)
reaches the file before the L2 entry that points at it is written back, and refcounts
before the L2 entry that uses the clusters they count (the caches' dependency and the
flush barrier enforce it).
"""

import errno
from array import array

from .bitmaps import bitmap_regions, region_clusters
from .header import (
    EXT_BITMAPS,
)
from .l2_table import (
    COMPRESSED,
    DATA,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    SC_ALL_ZERO,
    SC_ALLOC_MASK,
    UNALLOCATED,
    compressed_host_clusters,
    is_owned,
    sc_allocated,
    sc_zeroed,
)


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


class ClusterWriter:
    """The write half of `Qcow2Image` (a mixin: no state of its own)."""

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
            self.io.pwrite_header(h.pack_cluster0(), 0)
            self.io.sync()
            for c in clusters:
                self.refcounts.free(c)
        elif h.version >= 3 and h.autoclear_features:
            h.autoclear_features = 0
            self.io.pwrite_header(*h.pack_fields("autoclear_features"))
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
        return table  # the same entries as before: what the layer maps is unchanged

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
            self._extents_std(out, (entry,), 0, cstart + a, cstart + b)
        return out

    def write(self, off, data, below):
        """Write guest data at this layer; partial clusters copy the rest from
        this layer's current view (copy-on-write from `below` where unallocated).

        Clusters this layer owns, one after the other in the file, are overwritten in
        place at once (fast_host: the one fast path of every write, a guest's or a
        commit's). Otherwise two phases, so that `below` (the chain beneath: it takes
        the chain's lock) is never called with this layer's lock held: plan which bytes
        the copy-on-write needs from below, read them without the lock, then write
        under the lock if the plan still holds (a concurrent write to this layer may
        have changed it: plan again). The plan depends on this layer's L2 entries
        alone, which change only with a bump of `map_stamp` under this lock: an
        unchanged stamp says it holds without planning again."""
        with self.lock:
            self._prepare_write()
            host = self.fast_host(off, len(data), for_write=True)
            if host is not None:  # owned clusters, one after the other: in place
                self.io.pwrite(data, host)
                return
            fill = _Fill()
            need, planned = self._below_ranges(off, len(data)), self.map_stamp.value
            if not need:
                self._write_locked(off, data, fill.read)
                return
        while True:
            fill.fetch(below, need)
            with self.lock:
                if self.map_stamp.value != planned:
                    need, planned = self._below_ranges(off, len(data)), self.map_stamp.value
                if fill.covers(need):
                    self._write_locked(off, data, fill.read)
                    return

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
        return self._entry_in(self.l2_cache.get(l2off), l2i)

    def _entry_in(self, table, l2i):
        """(L2 entry, subcluster bitmap) of slot l2i of an L2 table."""
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
        owned = is_owned(entry)
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
        try:
            self._write_clusters(off, data, below)
        finally:
            # entries changed (fresh clusters, zero clusters turned data): the chain's
            # read map forgets, after the change (also after a failure part way)
            self.map_stamp.bump()

    def _write_clusters(self, off, data, below):
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
            if a == 0 and end - off >= cs:
                k = self._unowned_run(table, l2i, (end - off) >> cb)
                if k:  # whole clusters into fresh ones: nothing to copy, nothing per cluster
                    self._flush_batch(batch)
                    batch = []
                    self._write_fresh_run(table, l2i, cstart, mv[pos : pos + (k << cb)])
                    pos += k << cb
                    off = cstart + (k << cb)
                    continue
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
        entry, bitmap = self._entry_in(table, l2i)
        host = entry & L2E_OFFSET_MASK
        owned, sa, sb, sc_bits = self._write_span(entry, bitmap, a, b)
        if owned:
            if ext:
                in_place.add(
                    host + sa, self._compose(entry, bitmap, cstart, sa, sb, a, b, chunk, below)
                )
                new_bitmap = sc_allocated(bitmap, sc_bits)
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
        new_bitmap = sc_allocated(bitmap, sc_bits) if ext else 0
        return (table, l2i, cstart, entry, new_bitmap, sa, bufs, sb - sa)

    def _unowned_run(self, table, l2i, limit):
        """How many clusters from l2i on (at most `limit`, within this table) this layer
        does not own: a whole-cluster write gives each a fresh cluster."""
        step = 2 if self.extended_l2 else 1
        stop = min(l2i + limit, self.l2_entries) * step
        i = l2i * step
        while i < stop:
            if is_owned(table[i]):
                break
            i += step
        return i // step - l2i

    def _write_fresh_run(self, table, l2i, cstart, data):
        """Whole clusters [cstart, cstart+len(data)), none owned by this layer, into
        fresh contiguous clusters: the data in one request, then the L2 entries (in the
        cache: they reach the disk only after a barrier, so after the data)."""
        cb = self.cluster_bits
        n = len(data) >> cb
        base = self._alloc_fresh(n)
        self.io.pwrite(data, base)
        for k in range(n):
            entry, bitmap = self._entry_in(table, l2i + k)
            self._point_fresh(
                table, l2i + k, base + (k << cb), entry, sc_allocated(bitmap, SC_ALLOC_MASK)
            )
        pos = self._l2_entry_pos(cstart)
        entry_size = self.cluster_size // self.l2_entries
        self.l2_cache.put_back(self._l2_table_offset(cstart), table, pos, pos + n * entry_size)

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
        base = self._alloc_fresh(len(batch))
        if (
            len(batch) > 1
            and all(item[7] == cs for item in batch[:-1])
            and all(item[5] == 0 for item in batch)
        ):  # one request for them all
            self.io.pwritev([buf for item in batch for buf in item[6]], base)
        else:
            for k, item in enumerate(batch):
                self.io.pwritev(item[6], base + (k << cb) + item[5])
        for k, (table, l2i, cstart, entry, new_bitmap, *_data) in enumerate(batch):
            self._point_fresh(table, l2i, base + (k << cb), entry, new_bitmap)
            # the table may have been evicted since the batch took it: put it back
            self.l2_cache.put_back(self._l2_table_offset(cstart), table, self._l2_entry_pos(cstart))

    def _alloc_fresh(self, n):
        """n contiguous fresh clusters (their refcounts raised in the cache): the host
        offset of the first. The image's end moves past them at once."""
        base = self.refcounts.alloc(n)
        self.file_size = max(self.file_size, base + (n << self.cluster_bits))
        return base

    def _point_fresh(self, table, l2i, host, old, bitmap):
        """Point entry l2i at the fresh cluster `host`, now this image's own (bitmap:
        its subclusters, extended L2), and drop what the `old` entry held."""
        if self.extended_l2:
            table[2 * l2i] = host | QCOW_OFLAG_COPIED
            table[2 * l2i + 1] = bitmap
        else:
            table[l2i] = host | QCOW_OFLAG_COPIED
        if old:
            self._free_entry_clusters(old)

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
                    SC_ALL_ZERO if self.extended_l2 else 0,
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
        self.map_stamp.bump()
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
        table[2 * l2i + 1] = sc_zeroed(table[2 * l2i + 1], bits)
        self.map_stamp.bump()
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
