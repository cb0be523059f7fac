"""A bounded, write-back cache of cluster-sized metadata tables.

One instance holds L2 tables, another refcount blocks. A cache may *depend on* another:
before any dirty table of this cache reaches the disk, every dirty table of the cache it
depends on is written and a flush barrier (fdatasync) is issued. The L2 cache depends on
the refcount cache, which gives QEMU's rule "refcount blocks before the table that points
to the clusters they count", and the same barrier makes guest data written into newly
allocated clusters durable before the L2 entry that points at it.

A dependent cache never evicts a dirty table: writing it would need that barrier while
the image's lock is held. It grows past its capacity instead, until the image's flush
(`take_dirty`, then `written`) writes the tables with the barrier outside the lock.
A cache without a dependency writes dirty tables back on eviction (no barrier needed).
All of it runs under the owning image's lock.
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
        self._tables = OrderedDict()  # host offset -> table
        self._dirty = {}  # host offset -> version of its last change
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
        """Put a table that exists only in memory so far (a new allocation): dirty."""
        self._insert(offset, table)
        self.mark_dirty(offset)

    def mark_dirty(self, offset):
        self._version += 1
        self._dirty[offset] = self._version

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
        for off in sorted(self._dirty):
            self.io.pwrite(self.encode(self._tables[off]), off)
        self._dirty.clear()

    def flush(self):
        """Write every dirty table (dependencies first, with a barrier), holding the
        image's lock throughout: for rare structural changes and refcount blocks."""
        if self._dirty:
            self._write_back()

    def take_dirty(self):
        """[(offset, version, encoded table)] of every dirty table, still dirty (and so
        still cached) until `written` says that version reached the file."""
        return [
            (off, version, self.encode(self._tables[off]))
            for off, version in sorted(self._dirty.items())
        ]

    def written(self, tables):
        for off, version, _raw in tables:
            if self._dirty.get(off) == version:
                del self._dirty[off]
