"""A bounded, write-back cache of cluster-sized metadata tables.

One instance holds L2 tables, another refcount blocks. A cache may *depend on* another:
before any dirty table of this cache reaches the disk, every dirty table of the cache it
depends on is written and a flush barrier (fdatasync) is issued. The L2 cache depends on
the refcount cache, which gives QEMU's rule "refcount blocks before the table that points
to the clusters they count", and the same barrier makes guest data written into newly
allocated clusters durable before the L2 entry that points at it.
"""

from collections import OrderedDict


class TableCache:
    def __init__(self, rawio, table_size, capacity, decode, encode, depends_on=None):
        self.io = rawio
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self.decode = decode
        self.encode = encode
        self.depends_on = depends_on
        self._tables = OrderedDict()   # host offset -> table
        self._dirty = set()

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
        """Put a table that exists only in memory so far (a new allocation): dirty."""
        self._insert(offset, table)
        self._dirty.add(offset)

    def mark_dirty(self, offset):
        self._dirty.add(offset)

    def drop(self, offset):
        """Forget a table whose cluster was freed (its contents no longer matter)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def has_dirty(self):
        return bool(self._dirty)

    def _insert(self, offset, table):
        self._tables[offset] = table
        while len(self._tables) > self.capacity:
            victim = next(iter(self._tables))
            if victim in self._dirty:
                # Writing one dirty table costs a barrier: write them all behind the
                # same one, so a stream of new tables pays one per cache-full.
                self._write_back(list(self._dirty))
            del self._tables[victim]

    def _write_back(self, offsets):
        # The ordering rule of this cache: dependencies reach the disk first.
        if self.depends_on is not None and self.depends_on.has_dirty():
            self.depends_on.flush()
        if self.depends_on is not None:
            self.io.sync()
        for off in sorted(offsets):
            self.io.pwrite(self.encode(self._tables[off]), off)
            self._dirty.discard(off)

    def flush(self):
        """Write every dirty table (dependencies first). No fdatasync of its own."""
        if self._dirty:
            self._write_back(list(self._dirty))
