"""Where the chain's small reads were last found: guest granule -> (layer, host offset).

A 4 KiB read through the mount spends most of its Python walking the layers
(`Chain._fast_read_host`: one `fast_host` per layer, each an L1 and an L2 lookup). The
read map remembers the answer per granule (the smallest cluster of the chain, so one
granule lies in one cluster of every layer), and a read inside a granule it knows skips
the walk. Only plain data found by the fast walk is remembered; everything else takes
the walk every time.

Validity, with no lock of the layers' and no call from a layer up into the chain:
- A layer that changes what it maps (an L2 entry; its virtual size, which only grows)
  bumps the chain's `MapStamp` after the change, still under its own lock. A new or
  copied L2 table, a larger L1 table, hold the same entries: no bump. The map forgets
  everything when the stamp differs from the one it was filled under, or when the chain's
  layer list is another list (layers only ever get a new list).
- Stamps are unique (`itertools.count`, atomic under the GIL), so a bump is never lost
  when two threads bump at once: the value always moves away from what a reader saw.
- A read that looks up the map while a change is under way (entry changed, bump not yet
  made) may get the old place, as the walk would have read the table just before the
  change. Either is a read racing a write. A cluster the change freed is not reused
  before the change is durable, nor while a read that began before is in flight (the
  chain's read epochs, `reuse_ok`).
- A granule is remembered only where it lies below every layer's virtual size, so the
  zeros past a short layer's end are never served from the map.
The map is used under the chain's lock only.
"""

import itertools

MAX_GRANULES = 16384  # entries before the map starts over (a few MiB at most)


class MapStamp:
    """The layers' mark that what they map changed: `bump()` after each change."""

    __slots__ = ("value", "_next")

    def __init__(self):
        self._next = itertools.count(1).__next__
        self.value = 0

    def bump(self):
        self.value = self._next()


class ReadMap:
    def __init__(self, stamp):
        self.stamp = stamp
        self._hits = {}  # granule index -> (layer, host offset of the granule's start)
        self._stamp_seen = None
        self._layers = None
        self._gbits = 0
        self._limit = 0  # the smallest virtual size in the chain

    def _current(self, layers):
        """Forget everything if the layers changed what they map since the map was
        filled, or the layer list is another."""
        stamp = self.stamp.value
        if stamp != self._stamp_seen or layers is not self._layers:
            self._hits.clear()
            self._stamp_seen, self._layers = stamp, layers
            self._gbits = min(layer.cluster_size for layer in layers).bit_length() - 1
            self._limit = min(layer.virtual_size for layer in layers)

    def lookup(self, layers, off, n):
        """(layer, host offset of `off`) if [off, off+n) lies in a granule the map
        knows, else None."""
        self._current(layers)
        hit = self._hits.get(self._granule(off, n))
        if hit is None:
            return None
        return hit[0], hit[1] + (off & ((1 << self._gbits) - 1))

    def learn(self, layers, off, n, layer, host):
        """The walk that followed a `lookup` found [off, off+n) as plain data at `host`
        in `layer`. Not kept if a layer bumped the stamp since that lookup: the walk may
        have seen the table before the change."""
        if self.stamp.value != self._stamp_seen or layers is not self._layers:
            return
        g = self._granule(off, n)
        if g is None:
            return
        if len(self._hits) >= MAX_GRANULES:
            self._hits.clear()
        self._hits[g] = (layer, host - (off & ((1 << self._gbits) - 1)))

    def _granule(self, off, n):
        """The granule [off, off+n) lies in, if it lies in one, below every layer's
        end; else None."""
        g = self._gbits
        if (off + n - 1) >> g != off >> g or off + n > self._limit:
            return None
        return off >> g
