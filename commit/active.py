"""Active commit: mirror everything of (base, active] into base while the guest keeps
writing, stay in sync, then pivot the mount onto base.

Guest writes are mirrored in QEMU's write-blocking way from the start: a guest write to
a chunk that base already holds in sync is written to base too before it is
acknowledged; a write to a chunk still dirty only stays dirty (its copy comes later);
a write to the chunk being copied at that moment marks it dirty again. So the dirty
set only shrinks, whatever the guest's write rate, and the job always reaches READY.
The chain's lock orders each guest write with the mirror's bookkeeping.

Crash safety: before the pivot nothing on disk names base as the active image, and
everything written into base is shadowed by a layer above it, so the old chain reads
right; the pivot itself rewrites no header (as in QEMU): from then on base is the image
to use.
"""

from qcow.l2_table import UNALLOCATED

from .copy import copy_view
from .steps import Copied, Ready, SetLen

MIN_GRANULARITY = 64 << 10


class Mirror:
    """Dirty-chunk bookkeeping; every method runs with the chain's lock held."""

    def __init__(self, chain, base, granularity):
        self.chain = chain
        self.base = base
        self.g = granularity
        self.nchunks = -(-chain.virtual_size // granularity)
        self.dirty = bytearray(self.nchunks)
        self.count = 0
        self.cursor = 0
        self.inflight = None
        self.total = 0          # bytes this job has had to copy (QEMU's len)

    def mark(self, c):
        if not self.dirty[c]:
            self.dirty[c] = 1
            self.count += 1
            self.total += self.chunk_len(c)

    def chunk_len(self, c):
        return min(self.g, self.chain.virtual_size - c * self.g)

    def take(self):
        """Next dirty chunk (now in flight, no longer dirty), or None."""
        if not self.count:
            return None
        c = self.dirty.find(1, self.cursor)
        if c < 0:
            c = self.dirty.find(1)
        self.dirty[c] = 0
        self.count -= 1
        self.cursor = c + 1
        self.inflight = c
        return c

    def observe(self, off, n, data):
        """A guest write landed in the active layer: mirror it or mark it dirty."""
        g = self.g
        below = self.chain.below_fn(self.base)
        for c in range(off // g, (off + n - 1) // g + 1):
            if self.dirty[c]:
                continue
            if c == self.inflight:
                self.mark(c)
                continue
            s, e = max(off, c * g), min(off + n, (c + 1) * g)
            try:
                if data is None:
                    self.base.write_zeroes(s, e - s, below)
                else:
                    self.base.write(s, memoryview(data)[s - off:e - off], below)
            except OSError:
                self.mark(c)         # copied again by the job


def active_commit(target):
    chain = target.chain
    base = target.base
    size = chain.virtual_size
    if base.virtual_size < size:
        chain.grow(base, size)
    mirror = Mirror(chain, base, max(MIN_GRANULARITY, base.cluster_size))
    with chain.lock:
        for s, ln, _depth, kind in chain.range_status(0, target.base_index, 0, size):
            if kind != UNALLOCATED:
                for c in range(s // mirror.g, (s + ln - 1) // mirror.g + 1):
                    mirror.mark(c)
        chain.write_observers.append(mirror.observe)
    try:
        yield SetLen(mirror.total)
        while True:
            with chain.lock:
                c = mirror.take()
                if c is None:
                    base.flush()
            if c is not None:
                off = c * mirror.g
                copy_view(chain, 0, base, off, mirror.chunk_len(c))
                with chain.lock:
                    mirror.inflight = None
                    total = mirror.total
                yield SetLen(total)
                yield Copied(mirror.chunk_len(c))
                continue
            decision = yield Ready()
            with chain.lock:
                if mirror.count or decision is None:
                    continue          # still mirroring (or a mirrored write failed)
                base.flush()
                chain.write_observers.remove(mirror.observe)
                if decision == "complete":
                    return chain.pivot_to(base)
                return []
    finally:
        with chain.lock:
            if mirror.observe in chain.write_observers:
                chain.write_observers.remove(mirror.observe)
