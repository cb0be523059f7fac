"""Consistency check and repair of one qcow2 image, like `qemu-img check [-r all]`.

Every cluster referenced by the metadata is counted (header, L1 tables of the image and
of its snapshots, L2 tables, data and compressed clusters, refcount table and blocks,
snapshot table, persistent bitmaps) and compared with its stored refcount: stored lower
than referenced is a corruption, higher is a leak. QCOW_OFLAG_COPIED must be set exactly
where the refcount is 1. Repair sets each refcount to the referenced count and fixes the
COPIED flags, then flushes.
"""

from .bitmaps import bitmap_regions
from .errors import QcowError
from .l2_table import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    compressed_host_clusters,
    table_from_bytes,
)
from .refcount import REFT_OFFSET_MASK, Refcounts

EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3


class CheckResult:
    def __init__(self):
        self.corruptions = 0
        self.leaks = 0
        self.messages = []
        # qemu-img's figures: guest clusters the active L1 maps (as QEMU counts them)
        self.allocated_clusters = 0
        self.fragmented_clusters = 0
        self.compressed_clusters = 0
        self.total_clusters = 0
        self.image_end_offset = 0
        self.leaks_fixed = 0
        self.corruptions_fixed = 0

    @property
    def exit_code(self):
        if self.corruptions:
            return EXIT_CORRUPT
        if self.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN


class _Walker:
    def __init__(self, image, result):
        self.image = image
        self.cs = image.cluster_size
        self.cb = image.cluster_bits
        self.file_clusters = -(-image.io.size() // self.cs)
        self.refs = {}
        self.result = result

    def error(self, msg):
        self.result.corruptions += 1
        self.result.messages.append(f"ERROR {msg}")

    def add(self, off, length):
        if length <= 0:
            return
        first, last = off >> self.cb, (off + length - 1) >> self.cb
        for c in range(first, last + 1):
            if c >= self.file_clusters:
                self.error(
                    f"cluster {c} (offset 0x{c << self.cb:x}) is referenced "
                    f"beyond the end of the file"
                )
                return
            self.refs[c] = self.refs.get(c, 0) + 1

    def read_table(self, off, nbytes):
        if off + nbytes > self.file_clusters << self.cb:
            return None
        if self.image.l2_cache is not None and nbytes == self.cs:
            return self.image.l2_cache.get(off)
        return table_from_bytes(self.image.io.pread_exact(nbytes, off))

    def walk_l1(self, l1, active):
        img = self.image
        step = 2 if img.extended_l2 else 1
        for i, l1e in enumerate(l1):
            l2off = l1e & L1E_OFFSET_MASK
            if not l2off:
                continue
            if l2off & (self.cs - 1):
                self.error(f"L2 table offset 0x{l2off:x} is not cluster-aligned")
                continue
            self.add(l2off, self.cs)
            table = self.read_table(l2off, self.cs)
            if table is None:
                continue
            if active:
                self.active_l2.append((i, l1e, l2off, table))
            next_contiguous = 0  # per L2 table, as QEMU's check_refcounts_l2
            for j in range(0, len(table), step):
                e = table[j]
                if e & QCOW_OFLAG_COMPRESSED:
                    for c in compressed_host_clusters(e, self.cb):
                        self.add(c << self.cb, 1)
                    if active:  # compressed clusters count as fragmented too
                        self.result.allocated_clusters += 1
                        self.result.compressed_clusters += 1
                        self.result.fragmented_clusters += 1
                    continue
                host = e & L2E_OFFSET_MASK
                if not host:
                    continue
                if active:
                    self.result.allocated_clusters += 1
                    if next_contiguous and host != next_contiguous:
                        self.result.fragmented_clusters += 1
                    next_contiguous = host + self.cs
                if host & (self.cs - 1):
                    # still counted, over the clusters [host, host + cs) touches, as
                    # QEMU does: a repair must not free a cluster it points into
                    self.error(
                        f"L2 entry at 0x{l2off + j * 8:x} has a misaligned offset 0x{host:x}"
                    )
                self.add(host, self.cs)

    def walk(self):
        img = self.image
        h = img.header
        self.active_l2 = []
        self.add(0, self.cs)
        self.add(h.l1_table_offset, h.l1_size * 8)
        self.walk_l1(img.l1, active=True)
        self.add(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        if h.nb_snapshots:
            for s in img.snapshots:
                self.add(s.l1_table_offset, s.l1_size * 8)
                raw = img.io.pread_exact(s.l1_size * 8, s.l1_table_offset)
                self.walk_l1(table_from_bytes(raw), active=False)
            end = _snapshot_table_end(img)
            self.add(h.snapshots_offset, end - h.snapshots_offset)
        self.walk_bitmaps()

    def walk_bitmaps(self):
        for off, nbytes in bitmap_regions(self.image):
            self.add(off, nbytes)


def _snapshot_table_end(img):
    from .snapshot import ENTRY_FIXED, snapshot_entry

    off = img.header.snapshots_offset
    for _ in range(img.header.nb_snapshots):
        e = snapshot_entry.parse(img.io.pread_exact(ENTRY_FIXED, off))
        off += ENTRY_FIXED + e.extra_data_size + e.id_str_size + e.name_size
        off += -off % 8
    return off


def check_refcounts_and_tables(image, repair=False):
    """Check (and with repair=True, fix) one open Qcow2Image. Returns a CheckResult."""
    result = CheckResult()
    w = _Walker(image, result)
    refcounts = image.refcounts or Refcounts(image, 64)
    # refcount blocks count themselves
    for e in refcounts.table:
        off = e & REFT_OFFSET_MASK
        if off:
            w.add(off, image.cluster_size)
    w.walk()
    top = max([w.file_clusters] + [c + 1 for c in w.refs])
    rb_cover = len(refcounts.table) * refcounts.rb_entries
    fixes = []
    highest = -1
    for c in range(top):
        stored = refcounts.get(c) if c < rb_cover else 0
        ref = w.refs.get(c, 0)
        if stored or ref:
            highest = c
        if stored < ref:
            result.corruptions += 1
            result.messages.append(f"ERROR cluster {c} refcount={stored} reference={ref}")
            fixes.append((c, ref - stored))
        elif stored > ref:
            result.leaks += 1
            result.messages.append(f"Leaked cluster {c} refcount={stored} reference={ref}")
            fixes.append((c, ref - stored))

    # QCOW_OFLAG_COPIED: set exactly where the refcount is 1
    def want(c):
        if repair:
            return w.refs.get(c, 0) == 1
        return (refcounts.get(c) if c < rb_cover else 0) == 1

    copied_fixes = []
    for fix, message in _copied_mismatches(image, w.active_l2, want):
        result.corruptions += 1
        result.messages.append(message)
        copied_fixes.append(fix)
    result.total_clusters = -(-image.virtual_size // image.cluster_size)
    result.image_end_offset = (highest + 1) * image.cluster_size
    if repair and (fixes or copied_fixes):
        if image.read_only:
            raise QcowError(image.path, "cannot repair an image opened read-only")
        image._prepare_write()
        for c, delta in fixes:
            image.refcounts.add(c, delta)
        for kind, a, b, ok in copied_fixes:
            if kind == "l1":
                image.l1[a] = (
                    (image.l1[a] | QCOW_OFLAG_COPIED) if ok else image.l1[a] & ~QCOW_OFLAG_COPIED
                )
                image.l1_dirty.add(a)
            else:
                table = image.l2_cache.get(a)
                table[b] = (table[b] | QCOW_OFLAG_COPIED) if ok else table[b] & ~QCOW_OFLAG_COPIED
                image.l2_cache.mark_dirty(a)
        image.flush()
    return result


def _copied_mismatches(image, active_l2, want):
    """Every L1 and L2 entry whose QCOW_OFLAG_COPIED disagrees with `want(cluster)`:
    ((kind, where, index, want), qemu-img's message)."""
    step = 2 if image.extended_l2 else 1
    for i, l1e, l2off, table in active_l2:
        ok = want(l2off >> image.cluster_bits)
        if bool(l1e & QCOW_OFLAG_COPIED) != ok:
            msg = f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount mismatch"
            yield ("l1", i, None, ok), msg
        for j in range(0, len(table), step):
            e = table[j]
            host = e & L2E_OFFSET_MASK
            if not host or e & QCOW_OFLAG_COMPRESSED:
                continue
            ok = want(host >> image.cluster_bits)
            if bool(e & QCOW_OFLAG_COPIED) != ok:
                msg = f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount mismatch"
                yield ("l2", l2off, j, ok), msg


def format_report(result):
    lines = list(result.messages)
    if result.corruptions:
        lines += [
            "",
            f"{result.corruptions} errors were found on the image.",
            "Data may be corrupted, or further writes to the image may corrupt it.",
        ]
    if result.leaks:
        lines += [
            "",
            f"{result.leaks} leaked clusters were found on the image.",
            "This means waste of disk space, but no harm to data.",
        ]
    if not result.corruptions and not result.leaks:
        lines.append("No errors were found on the image.")
    r = result
    if r.total_clusters and r.allocated_clusters:
        lines.append(
            f"{r.allocated_clusters}/{r.total_clusters} = "
            f"{100.0 * r.allocated_clusters / r.total_clusters:.2f}% allocated, "
            f"{100.0 * r.fragmented_clusters / r.allocated_clusters:.2f}% "
            f"fragmented, {100.0 * r.compressed_clusters / r.allocated_clusters:.2f}"
            f"% compressed clusters"
        )
    if r.image_end_offset:
        lines.append(f"Image end offset: {r.image_end_offset}")
    return "\n".join(lines)


def report_json(result, filename, check_errors=0):
    """`qemu-img check --output=json`'s object: the same keys, zero counts left out
    as qemu-img leaves them out."""
    r = result
    d = {"filename": filename, "format": "qcow2", "check-errors": check_errors}
    for key, value in (
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ):
        if value:
            d[key] = value
    return d
