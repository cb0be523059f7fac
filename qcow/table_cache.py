"""A bounded, write-back cache of cluster-sized metadata tables.

One instance holds L2 tables, another refcount blocks. A cache may *depend on* another:
before any dirty table of this cache reaches the disk, every dirty table of the cache it
depends on is written and a flush barrier (fdatasync) is issued. The L2 cache depends on
the refcount cache, which gives QEMU's rule "refcount blocks before the table that points
to the clusters they count", and the same barrier makes guest data written into newly
allocated clusters durable before the L2 entry that points at it.

Dirtiness is tracked per slice of a table (4 KiB, as QEMU's l2-cache-entry-size): a
write-back writes only the slices changed since the table was last written, so a flush
after a few allocations costs a few KiB, not a whole table (2 MiB with 2 MiB clusters).
A table that exists only in memory (a new allocation) is dirty as a whole.

A dependent cache never evicts a dirty table: writing it would need that barrier while
the image's lock is held. It grows past its capacity instead, until the image's flush
(`take_dirty`, then `written`) writes the tables with the barrier outside the lock.
A cache without a dependency writes dirty tables back on eviction (no barrier needed).
All of it runs under the owning image's lock.
"""

from collections import OrderedDict

SLICE_SIZE = 4096  # bytes written back at a time: a file system block, a page


class TableCache:
    def __init__(self, rawio, table_size, capacity, decode, encode, depends_on=None):
        self.io = rawio
        self.table_size = table_size
        self.slice_size = min(table_size, SLICE_SIZE)
        self.capacity = max(2, capacity)
        self.decode = decode
        self.encode = encode
        self.depends_on = depends_on
        self._tables = OrderedDict()  # host offset -> table
        self._dirty = {}  # host offset -> {slice index: version of its last change}
        self._version = 0

    def get(self, offset):
        t = self._tables.get(offset)
        if t is not None:
            self._tables.move_to_end(offset)
            return t
        t = self.decode(self.io.pread_exact(self.table_size, offset))
        self._insert(offset, t)
        return t

    def peek(self, offset):
        """The cached table or None; no I/O, no LRU update (the fast path's lookup)."""
        return self._tables.get(offset)

    def install(self, offset, table):
        """Put a table that exists only in memory so far (a new allocation): all of it
        dirty (its cluster on disk may hold anything)."""
        self._insert(offset, table)
        self.mark_dirty(offset)

    def put_back(self, offset, table, pos, end=None):
        """Mark bytes [pos, end) (byte `pos` alone by default) of a table dirty, caching
        it again if it was evicted since the caller took it (it was clean then: only
        those bytes differ from the disk)."""
        if offset not in self._tables:
            self._insert(offset, table)
        self.mark_dirty(offset, pos, end)

    def mark_dirty(self, offset, pos=None, end=None):
        """Bytes [pos, end) of the table at `offset` changed (byte `pos` alone when end
        is None; the whole table when pos is None)."""
        self._version += 1
        slices = self._dirty.setdefault(offset, {})
        if pos is None:
            pos, end = 0, self.table_size
        if end is None:
            slices[pos // self.slice_size] = self._version
        else:
            step = self.slice_size
            slices.update(dict.fromkeys(range(pos // step, (end - 1) // step + 1), self._version))

    def has_dirty(self):
        return bool(self._dirty)

    def over_capacity(self):
        return len(self._tables) > self.capacity

    def _insert(self, offset, table):
        self._tables[offset] = table
        if len(self._tables) <= self.capacity:
            return
        if self.depends_on is None:
            if self._dirty:
                self._write_back()
            while len(self._tables) > self.capacity:
                self._tables.popitem(last=False)
            return
        for victim in [off for off in self._tables if off not in self._dirty and off != offset]:
            if len(self._tables) <= self.capacity:
                break
            del self._tables[victim]

    def _write_back(self):
        # The ordering rule of this cache: dependencies reach the disk first.
        if self.depends_on is not None:
            if self.depends_on.has_dirty():
                self.depends_on.flush()
            self.io.sync()
        for file_offset, raw, _offset, _slices in self.take_dirty():
            self.io.pwrite(raw, file_offset)
        self._dirty.clear()

    def flush(self):
        """Write every dirty slice (dependencies first, with a barrier), holding the
        image's lock throughout: for rare structural changes and refcount blocks."""
        if self._dirty:
            self._write_back()

    def take_dirty(self):
        """[(file offset, encoded bytes, table offset, {slice: version})] for every run
        of consecutive dirty slices of a table, still dirty (and so the table still
        cached) until `written` says those versions reached the file."""
        out = []
        for offset, slices in sorted(self._dirty.items()):
            table = self._tables[offset]
            per_slice = self.slice_size // getattr(table, "itemsize", 1)  # table items
            run = {}
            for s in sorted(slices):
                if run and s - 1 not in run:
                    out.append(self._encode_run(offset, table, per_slice, run))
                    run = {}
                run[s] = slices[s]
            out.append(self._encode_run(offset, table, per_slice, run))
        return out

    def _encode_run(self, offset, table, per_slice, run):
        first, end = min(run), max(run) + 1
        raw = self.encode(table[first * per_slice : end * per_slice])
        return offset + first * self.slice_size, raw, offset, run

    def written(self, runs):
        for _file_offset, _raw, offset, run in runs:
            slices = self._dirty.get(offset)
            if slices is None:
                continue
            for s, version in run.items():
                if slices.get(s) == version:
                    del slices[s]
            if not slices:
                del self._dirty[offset]
