"""Refcounts: the refcount table, refcount blocks of every width (1..64 bits), and
cluster allocation.

Ordering rules enforced here:
- a new refcount block is written and flushed before the refcount table entry that
  points at it;
- a new, larger refcount table is written and flushed (with the blocks that count its
  own clusters) before the header points at it, and the old table is freed only after;
- decrements are *deferred*: `free()` queues clusters, and the image's flush calls
  `apply_frees()` with what it took at its cut only once the L2/L1 entries that dropped
  them are durable, so a crash can leak a cluster but never leave an entry pointing at
  a cluster with refcount 0;
- space past the file's end is reserved (fallocated) before a cluster there is counted
  (`_reserve`): a new L2 table or refcount block first written at a later flush has its
  space already, so a full file system fails the write that needs space, at once and
  with nothing changed, never the flush of what was acknowledged before. The file grows
  RESERVE_AHEAD at a time (exactly what is needed when that much does not fit); a clean
  close cuts the unused tail (`trim`), and a tail a crash leaves is only zeros past the
  last cluster, which QEMU accepts and a later allocation reuses.
"""

import errno
import struct
from array import array

from .errors import CorruptImage
from .l2_table import table_from_bytes, table_to_bytes
from .table_cache import TableCache

REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
# bytes reserved past what an allocation that grows the file needs: one fallocate per
# step instead of one per allocated cluster
RESERVE_AHEAD = 1 << 20


def refblock_get(block, index, order):
    bits = 1 << order
    if bits < 8:
        bitpos = index * bits
        return (block[bitpos >> 3] >> (bitpos & 7)) & ((1 << bits) - 1)
    nbytes = bits >> 3
    return int.from_bytes(block[index * nbytes : (index + 1) * nbytes], "big")


def refblock_set(block, index, order, value):
    bits = 1 << order
    if bits < 8:
        bitpos = index * bits
        mask = ((1 << bits) - 1) << (bitpos & 7)
        i = bitpos >> 3
        block[i] = (block[i] & ~mask) | ((value << (bitpos & 7)) & mask)
    else:
        nbytes = bits >> 3
        block[index * nbytes : (index + 1) * nbytes] = value.to_bytes(nbytes, "big")


class Refcounts:
    """Refcounts of one image. Loaded lazily: reading an image never touches them."""

    def __init__(self, image, cache_tables):
        self.image = image
        self.io = image.io
        h = image.header
        self.cluster_bits = h.cluster_bits
        self.cs = h.cluster_size
        self.order = h.refcount_order
        self.max_refcount = (1 << (1 << self.order)) - 1
        self.rb_entries = self.cs * 8 >> self.order
        raw = self.io.pread_exact(h.refcount_table_clusters * self.cs, h.refcount_table_offset)
        self.table = table_from_bytes(raw)
        for e in self.table:
            off = e & REFT_OFFSET_MASK
            if off and (off % self.cs or e & ~REFT_OFFSET_MASK):
                raise CorruptImage(image.path, "refcount table entry is misaligned")
        self.cache = TableCache(self.io, self.cs, cache_tables, bytearray, bytes)
        self.free_hint = 0
        self.pending_free = []
        # first cluster index past everything allocated: new structures go there
        file_end = -(-self.io.size() // self.cs)
        self.end = max(file_end, self._last_counted() + 1)
        self.reserved = file_end  # clusters below this have disk space

    # --- lookups --------------------------------------------------------

    def _block(self, cluster, create):
        bi = cluster // self.rb_entries
        off = self.table[bi] & REFT_OFFSET_MASK if bi < len(self.table) else 0
        if off == 0:
            if not create:
                return None, 0
            off = self._new_refblock(bi)
        return self.cache.get(off), off

    def get(self, cluster):
        block, _ = self._block(cluster, False)
        if block is None:
            return 0
        return refblock_get(block, cluster % self.rb_entries, self.order)

    def add(self, cluster, delta):
        block, off = self._block(cluster, True)
        i = cluster % self.rb_entries
        value = refblock_get(block, i, self.order) + delta
        if value < 0:
            raise CorruptImage(self.image.path, f"refcount of cluster {cluster} drops below 0")
        if value > self.max_refcount:
            raise CorruptImage(self.image.path, f"refcount of cluster {cluster} overflows")
        refblock_set(block, i, self.order, value)
        self.cache.mark_dirty(off, (i << self.order) >> 3)
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster
        return value

    def _last_counted(self):
        """The highest cluster with a non-zero refcount (-1 if none). After a crash
        the file may end before clusters whose refcounts were already durable: they
        are leaks, and must not be handed out again as if free."""
        for bi in range(len(self.table) - 1, -1, -1):
            off = self.table[bi] & REFT_OFFSET_MASK
            if not off:
                continue
            block = self.cache.get(off)
            used = len(bytes(block).rstrip(b"\0"))  # bytes up to the last non-zero
            if used:
                last = (used * 8 - 1) >> self.order  # the entry holding that byte
                while not refblock_get(block, last, self.order):
                    last -= 1
                return bi * self.rb_entries + last
        return -1

    # --- allocation -----------------------------------------------------

    def alloc(self, n=1):
        """Allocate n contiguous clusters; returns the host offset of the first.

        Refcounts are raised in the cache only: the caller writes its data, and the L2
        cache's dependency on this cache writes them before any L2 entry using them.
        """
        start = self._find_free(n)
        self._reserve(start + n)
        self.end = max(self.end, start + n)
        done = start
        try:
            while done < start + n:
                done = self._count_run(done, start + n)  # may need a new refcount block
        except BaseException:
            for c in range(start, done):  # nothing half-allocated stays counted
                self.add(c, -1)
            raise
        self.free_hint = start + n
        return start << self.cluster_bits

    def _count_run(self, c, stop):
        """Raise the refcounts of clusters [c, stop) by one, as far as c's refcount block
        reaches; returns where it stopped. Free clusters (all zero) in a block of whole
        bytes per entry are set in one slice assignment."""
        block, off = self._block(c, True)
        i = c % self.rb_entries
        k = min(stop - c, self.rb_entries - i)
        nbytes = (1 << self.order) >> 3
        if nbytes and not any(block[i * nbytes : (i + k) * nbytes]):
            block[i * nbytes : (i + k) * nbytes] = (1).to_bytes(nbytes, "big") * k
            step = self.cache.slice_size
            for sl in range(i * nbytes // step, ((i + k) * nbytes - 1) // step + 1):
                self.cache.mark_dirty(off, sl * step)
        else:
            for j in range(c, c + k):
                self.add(j, 1)
        return c + k

    def _reserve(self, end):
        """Disk space for every cluster below `end` (a cluster index) now: RESERVE_AHEAD
        more when it fits, else exactly that (ENOSPC only when even that lacks)."""
        if end <= self.reserved:
            return
        cb = self.cluster_bits
        ahead = end + (RESERVE_AHEAD >> cb)
        if ahead > end:
            try:
                self.io.reserve(self.reserved << cb, (ahead - self.reserved) << cb)
                self.reserved = ahead
                return
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
        self.io.reserve(self.reserved << cb, (end - self.reserved) << cb)
        self.reserved = end

    def trim(self):
        """Cut the reserved tail no cluster uses: the file ends after the last cluster
        ever allocated, as without reserving ahead. Only after a successful final flush
        (nothing in a cache still to be written, nothing counted past `end`)."""
        if self.reserved > self.end:
            self.io.truncate(self.end << self.cluster_bits)
            self.reserved = self.end

    def _find_free(self, n):
        c = self.free_hint
        run = 0
        while run < n:
            if c >= self.end:
                # everything past the end of the image is free
                return c - run
            if self.get(c) == 0:
                run += 1
            else:
                run = 0
            c += 1
        return c - run

    def _bump(self, n):
        """n contiguous clusters past everything allocated (for refcount structures)."""
        start = self.end
        self._reserve(start + n)
        self.end += n
        return start

    def _new_refblock(self, bi):
        if bi >= len(self.table):
            self._grow_table(bi + 1)
            off = self.table[bi] & REFT_OFFSET_MASK
            if off:
                return off
        c = self._bump(1)
        block = bytearray(self.cs)
        if c // self.rb_entries == bi:
            # the new block covers itself
            refblock_set(block, c % self.rb_entries, self.order, 1)
        else:
            # its count lives in another block: durable before the table names it
            self.add(c, 1)
            self.cache.flush()
        off = c << self.cluster_bits
        self.io.pwrite(block, off)
        self.io.sync()  # block (and its count) durable before the entry
        self.table[bi] = off
        self._write_table_entry(bi)
        return off

    def _write_table_entry(self, bi):
        h = self.image.header
        self.io.pwrite(struct.pack(">Q", self.table[bi]), h.refcount_table_offset + bi * 8)

    def _grow_table(self, min_entries):
        """Move the refcount table to a larger place at the end of the image."""
        h = self.image.header
        entries_per_cluster = self.cs // 8
        new_clusters = max(h.refcount_table_clusters * 2, -(-min_entries // entries_per_cluster))
        while True:
            t = self.end
            # blocks for the table's own clusters and for themselves, placed after it:
            # the blocks must cover [t, t + new_clusters + len(missing)) (a fixpoint)
            nmiss = -1
            missing = []
            while len(missing) != nmiss:
                nmiss = len(missing)
                first_bi = t // self.rb_entries
                last_bi = (t + new_clusters + nmiss) // self.rb_entries
                missing = [
                    bi
                    for bi in range(first_bi, last_bi + 1)
                    if bi >= len(self.table) or not self.table[bi]
                ]
            need = max(last_bi + 1, min_entries, len(self.table))
            if new_clusters * entries_per_cluster >= need:
                break
            new_clusters *= 2
        new = array("Q", bytes(new_clusters * self.cs))
        new[: len(self.table)] = self.table
        blocks = {}
        rb_base = t + new_clusters
        for k, bi in enumerate(missing):
            new[bi] = (rb_base + k) << self.cluster_bits
            blocks[bi] = bytearray(self.cs)
        self._reserve(rb_base + len(missing))  # all of it, before anything is written
        self.end = rb_base + len(missing)
        # counts for the new table and the new blocks: in new blocks, or via the cache
        for c in list(range(t, t + new_clusters)) + [rb_base + k for k in range(len(missing))]:
            bi = c // self.rb_entries
            if bi in blocks:
                blk = blocks[bi]
                i = c % self.rb_entries
                refblock_set(blk, i, self.order, refblock_get(blk, i, self.order) + 1)
        for bi, blk in blocks.items():
            self.io.pwrite(blk, new[bi] & REFT_OFFSET_MASK)
        self.io.pwrite(table_to_bytes(new), t << self.cluster_bits)
        old_off, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        self.table = new
        for c in list(range(t, t + new_clusters)) + [rb_base + k for k in range(len(missing))]:
            if c // self.rb_entries not in blocks:
                self.add(c, 1)
        self.cache.flush()
        self.io.sync()  # new table and its blocks durable first
        h.refcount_table_offset = t << self.cluster_bits
        h.refcount_table_clusters = new_clusters
        self.io.pwrite_header(*h.pack_fields("refcount_table_offset", "refcount_table_clusters"))
        self.io.sync()  # header switched before the old table is freed
        for c in range(old_off >> self.cluster_bits, (old_off >> self.cluster_bits) + old_clusters):
            self.add(c, -1)

    # --- freeing (deferred) ---------------------------------------------

    def free(self, cluster, count=1):
        """Queue a decrement; applied once the metadata that dropped it is durable."""
        self.pending_free.extend(range(cluster, cluster + count))

    def take_pending_frees(self):
        pending, self.pending_free = self.pending_free, []
        return pending

    def apply_frees(self, clusters):
        for c in clusters:
            self.add(c, -1)

    def flush(self):
        self.cache.flush()
