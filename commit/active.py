"""Active commit: mirror everything of (base, active] into base while the guest keeps
writing, stay in sync, then pivot the mount onto base.

Guest writes are mirrored in QEMU's write-blocking way from the start: a guest write to
a chunk that base already holds in sync is written to base too before it is
acknowledged; a write to a chunk still dirty only stays dirty (its copy comes later);
a write to a chunk being copied at that moment marks it dirty again. So the dirty
set only shrinks, whatever the guest's write rate, and the job always reaches READY.
The chain's lock orders each guest write with the mirror's bookkeeping (and the
mirrored write into base, bounded by the guest's request); syncs of base and of the
active image happen outside it, so the guest never waits for a fdatasync.

Crash safety: before the pivot nothing on disk names base as the active image, and
everything written into base is shadowed by a layer above it, so the old chain reads
right. The pivot rewrites no backing file name (as in QEMU): from then on base is the
image to use, and the old active image gets only its leftover mark (completion.pivot
says when that is durable).
"""

from .completion import mark_intermediates, pivot, unmark_intermediates
from .copy import copy_buffer, copy_view, scan_allocated
from .steps import CHUNK, WRITING, Copied, Ready, SetLen

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
        self.inflight = (0, 0)  # [first, end) chunks being copied
        self.total = 0  # bytes this job has had to copy (QEMU's len)

    def mark(self, c):
        if not self.dirty[c]:
            self.dirty[c] = 1
            self.count += 1
            self.total += self.chunk_len(c)

    def chunk_len(self, c):
        return min(self.g, self.chain.virtual_size - c * self.g)

    def take(self, most):
        """The next run of up to `most` adjacent dirty chunks, now in flight and no
        longer dirty: (first, count), or None when nothing is dirty."""
        if not self.count:
            return None
        c = self.dirty.find(1, self.cursor)
        if c < 0:
            c = self.dirty.find(1)
        n = 1
        while n < most and c + n < self.nchunks and self.dirty[c + n]:
            n += 1
        self.dirty[c : c + n] = bytes(n)
        self.count -= n
        self.cursor = c + n
        self.inflight = (c, c + n)
        return c, n

    def observe(self, off, n, data):
        """A guest write landed in the active layer: mirror it or mark it dirty."""
        g = self.g
        below = self.chain.below_fn(self.base)
        lo, hi = self.inflight
        for c in range(off // g, (off + n - 1) // g + 1):
            if self.dirty[c]:
                continue
            if lo <= c < hi:
                self.mark(c)
                continue
            s, e = max(off, c * g), min(off + n, (c + 1) * g)
            try:
                if data is None:
                    self.base.write_zeroes(s, e - s, below)
                else:
                    self.base.write(s, memoryview(data)[s - off : e - off], below)
            except OSError:
                self.mark(c)  # copied again by the job


def active_commit(target, chunk=CHUNK):
    chain = target.chain
    base = target.base
    size = chain.virtual_size
    if base.virtual_size < size:
        chain.grow(base, size)
    mirror = Mirror(chain, base, max(MIN_GRANULARITY, base.cluster_size))
    with chain.lock:
        chain.write_observers.append(mirror.observe)
    marked = False  # the intermediates carry leftover marks no pivot has used yet
    try:
        # Mark what the range holds, a slice at a time. A guest write meanwhile to a
        # chunk not marked yet is mirrored; marking it later only copies it again.
        for scan in scan_allocated(chain, 0, target.base_index, size):
            with chain.lock:
                for s, ln, _depth, _kind, _aux in scan.runs:
                    for c in range(s // mirror.g, (s + ln - 1) // mirror.g + 1):
                        mirror.mark(c)
        most = max(1, chunk // mirror.g)
        buf = copy_buffer(base)  # one for the job's copies
        while True:
            with chain.lock:
                got = mirror.take(most)
                total = mirror.total
            yield SetLen(total)
            if got is not None:
                off = got[0] * mirror.g
                length = min(got[1] * mirror.g, size - off)
                copy_view(chain, 0, base, off, length, buf=buf)
                with chain.lock:
                    mirror.inflight = (0, 0)
                yield Copied(length)
                continue
            with WRITING:
                base.flush()
            with chain.lock:
                if mirror.count:
                    continue  # a mirrored write failed meanwhile: copy again
            decision = yield Ready()
            if decision is None:
                continue
            # sync and mark outside the lock, so the guest waits only for what is left
            with WRITING:
                for layer in [base] + chain.layers[: chain.index_of(base)]:
                    layer.flush()
                if decision == "complete":
                    marked = True  # first: a failure part way unmarks what it marked
                    mark_intermediates(chain, base)
            with chain.lock, WRITING:
                if mirror.count:
                    continue  # a mirrored write failed meanwhile: copy again, ask again
                chain.write_observers.remove(mirror.observe)
                if decision == "complete":
                    dropped, marked = pivot(chain, base), False
                else:
                    dropped = []
            # no guest write reaches base through the mirror any more: make base's
            # copy durable, and close what left, without holding the chain's lock
            with WRITING:
                base.flush()
            chain.release_dropped(dropped)
            return dropped
    finally:
        with chain.lock:
            if mirror.observe in chain.write_observers:
                chain.write_observers.remove(mirror.observe)
        if marked:
            # went round after marking, then ended without a pivot (cancelled, or
            # failed): the intermediates are images of the chain again, not leftovers
            unmark_intermediates(chain, base)
