"""A backing chain opened from its active (topmost) image: the guest's flat view.

Reads go active -> ... -> base, cluster by cluster; a layer's unallocated range reads
through to its backing file, and past the end of a shorter backing file it reads as
zeros whatever deeper layers hold (QEMU's rule). Writes land in the active layer.

Concurrency. Lock order (qcow.lockdep): the chain's lock, then a layer's flush lock,
then a layer's metadata lock; never the reverse, and never two layers' locks at once.
- The chain's lock guards the layer list and orders guest writes (and an active
  commit's mirroring of them). A read plans its I/O under it (briefly taking each
  layer's metadata lock in turn) and does the I/O outside, so reads run in parallel.
  A guest write holds it for its own bounded I/O. Nothing syncs under it in steady
  state: flushes, header rewrites and the flush of a layer leaving the chain all run
  outside it; only a one-off `grow` does.
- A layer never calls back into the chain while holding its own lock: the
  copy-on-write data a write needs from below is read before the layer locks
  (Qcow2Image.write).
Layers that leave the chain are closed only once no read that began before they left
is in flight (`_reap`), by the job or command that dropped them, outside the chain's
lock: a guest request never closes a layer (closing flushes and syncs).
"""

import errno
import os
import stat
import time
from typing import NamedTuple

from .errors import ChainError, CorruptImage, QcowError, UnsupportedImage
from .header import QCOW_MAGIC
from .image import Qcow2Image
from .image_locking import READER, WRITER, drop_image_locks, take_image_locks
from .l2_table import COMPRESSED, DATA, UNALLOCATED, ZERO
from .layer import UNMAPPED
from .leftover import refuse_leftovers
from .lockdep import make_lock
from .paths import absolute
from .raw import RawImage
from .read_map import MapStamp, ReadMap
from .runs import append_run

MAX_CHAIN = 256
# seconds a job's reopen for writing waits for a short-lived reader's image locks to go
# (a reopen for writing never runs under the chain's lock: guest requests never wait)
REOPEN_LOCK_PATIENCE = 1.0
# seconds between two looks at the reads in flight while layers that left wait to close
REAP_POLL = 0.001


class Extent(NamedTuple):
    """One run of `block_status`, with the fields of `qemu-img map --output=json`."""

    start: int
    length: int
    depth: int  # index in chain.layers of the layer that answers for it
    present: bool  # allocated at that layer (False: zeros past a chain's end)
    zero: bool
    data: bool
    offset: int | None  # host offset in that layer's file, where there is one

    def to_json(self):
        d = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def probe_format(path):
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW_MAGIC else "raw"


def resolve_backing(name, overlay_path):
    """The path a backing name refers to: relative names are relative to the directory
    of the image naming it, as that image's path was given (QEMU's rule)."""
    if name.startswith("json:") or (
        ":" in name.split("/", 1)[0]
        and not os.path.exists(os.path.join(os.path.dirname(overlay_path), name))
    ):
        raise UnsupportedImage(
            overlay_path,
            f"backing file '{name}' uses a protocol or json: name, which is not supported",
        )
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(overlay_path), name)


def open_layer(
    path,
    fmt,
    writable,
    cache_bytes,
    metadata_only=False,
    filename=None,
    reuse_ok=None,
    map_stamp=None,
):
    """A layer (qcow.layer.Layer) of format `fmt`: filename is the name as the chain
    shows it, reuse_ok the chain's say on reusing freed clusters, map_stamp the chain's
    read map stamp (qcow.read_map)."""
    if fmt == "qcow2":
        return Qcow2Image(
            path,
            writable,
            cache_bytes,
            metadata_only,
            filename=filename,
            reuse_ok=reuse_ok,
            map_stamp=map_stamp,
        )
    if fmt == "raw":
        return RawImage(path, writable, filename=filename, map_stamp=map_stamp)
    raise UnsupportedImage(path, f"unsupported image format '{fmt}'")


def _open_file_checked(path, named_by):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        where = f" (backing file of {named_by})" if named_by else ""
        raise ChainError(path, f"no such file{where}") from None
    except OSError as e:
        raise ChainError(path, e.strerror) from None
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
        raise ChainError(path, "not a regular file")
    return st


class Chain:
    def __init__(
        self, path, writable=False, cache_bytes=32 << 20, image_locking=True, metadata_only=False
    ):
        self.writable = writable
        self.cache_bytes = cache_bytes
        self.image_locking = image_locking  # take QEMU's OFD image locks (off: like -U)
        self._lock = make_lock("chain")
        # where small reads were last found (qcow.read_map): the layers stamp every
        # change to what they map, and the map forgets what it knew
        self._map_stamp = MapStamp()
        self._read_map = ReadMap(self._map_stamp)
        # reads in flight by the epoch they began in; a layer leaving the chain starts a
        # new epoch and waits in _retired for the reads of the epochs before it
        self._epoch = 0
        self._reads = {}
        self._retired = []  # (epoch it left in, layer)
        # called under the lock after each guest write: observer(offset, length, data)
        # with data None for zero writes (an active commit mirrors through this)
        self.write_observers = []
        self.guest_writes = 0  # counted under the lock: a job yields to a writing guest
        self.layers = []
        try:
            self._open_all(os.fspath(path), metadata_only)
        except BaseException:
            self._close_layers(self.layers, flush=False)
            raise
        self._share_cache()

    def _open_all(self, path, metadata_only):
        # `path` stays as given (QEMU resolves relative backing names against it and
        # shows it as the layer's filename); layer.path is its absolute form.
        seen = set()
        named_by = None
        writable = self.writable
        fmt = None
        while True:
            st = _open_file_checked(path, named_by)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ChainError(named_by, f"backing chain loops back to {path}")
            if len(self.layers) >= MAX_CHAIN:
                raise ChainError(path, f"backing chain longer than {MAX_CHAIN} images")
            seen.add(key)
            fmt = fmt or probe_format(path)
            if not self.layers and fmt != "qcow2":
                # the image a user names is the top of a qcow2 chain; a raw file is
                # already flat (and a damaged qcow2 header must not pass for raw)
                raise CorruptImage(path, "not a qcow2 image (bad magic)")
            layer = open_layer(
                absolute(path),
                fmt,
                writable,
                self.cache_bytes,
                metadata_only,
                filename=path,
                reuse_ok=self._reuse_ok,
                map_stamp=self._map_stamp,
            )
            self.layers.append(layer)
            if self.image_locking:
                take_image_locks(layer.io.fd, path, WRITER if writable else READER)
            if writable:
                layer.repair_if_dirty()
            if not layer.backing_name:
                return
            named_by = path
            fmt = layer.backing_format  # else probed once the file is found
            path = resolve_backing(layer.backing_name, path)
            writable = False

    def _share_cache(self):
        """Split the table cache budget between the layers that cache tables."""
        cached = [layer for layer in self.layers if layer.has_cache]
        for layer in cached:
            layer.share_cache(self.cache_bytes // len(cached))

    def _reuse_ok(self):
        """May a layer reuse clusters it freed? Not while a read that planned before
        the free may still read them."""
        return not self._reads

    # --- properties -------------------------------------------------------

    @property
    def active(self):
        return self.layers[0]

    @property
    def virtual_size(self):
        return self.layers[0].virtual_size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- reading ----------------------------------------------------------

    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside the "
                f"virtual disk of {self.virtual_size} bytes"
            )

    def _plan(self, layers, depth, off, n):
        """The I/O that produces guest [off, off+n) from layers[depth:]:
        (offset in the buffer, length, kind, layer, where). Zeros need no op (the
        buffer starts zeroed)."""
        ops = []
        for s, ln, d, kind, aux in walk(layers, depth, off, n, len(layers)):
            if kind == DATA:
                ops.append((s - off, ln, DATA, layers[d], aux))
            elif kind == COMPRESSED:
                layer = layers[d]
                ops.append((s - off, ln, COMPRESSED, layer, (aux, s & (layer.cluster_size - 1))))
        return ops

    def read(self, offset, length):
        """The guest's bytes at [offset, offset+length)."""
        data = self.read_buffer(offset, length)
        return data if type(data) is bytes else bytes(data)

    def read_buffer(self, offset, length):
        """`read`, as the buffer the read filled (bytes, or a bytearray when assembled
        from several pieces): the mount hands it to the kernel without a copy."""
        self._check_range(offset, length)
        return self.read_from(0, offset, length)

    def _fast_read_host(self, depth, offset, length):
        """(layer, host offset) of a read inside one cluster that is plain data at the
        first layer from layers[depth] down that maps it, as the layers' cached tables
        say; else (None, None): the read is planned in full (the lock is held)."""
        layers = self.layers
        if depth == 0:  # the guest's view: where the read map may know the answer
            hit = self._read_map.lookup(layers, offset, length)
            if hit is not None:
                return hit
        end = offset + length
        for d in range(depth, len(layers)):
            layer = layers[d]
            if end > layer.virtual_size:
                break  # zeros past a short backing file: the general path
            host = layer.fast_host(offset, length)
            if host != UNMAPPED:
                if host is not None and depth == 0:
                    self._read_map.learn(layers, offset, length, layer, host)
                return layer, host
        return None, None

    def read_from(self, depth, offset, length):
        """The view of the chain from layers[depth] down: what layers[depth-1] sees of
        its backing file. Past layers[depth]'s end it is zeros (a short backing file).
        Bytes, or a bytearray when assembled from several pieces."""
        ops = ()
        with self._lock:
            layers = self.layers
            layer, host = self._fast_read_host(depth, offset, length)
            if host is None and depth < len(layers):
                lim = min(offset + length, layers[depth].virtual_size)
                if lim > offset:
                    ops = self._plan(layers, depth, offset, lim - offset)
            epoch = self._read_begins()
        try:
            if host is not None:  # one cluster's plain data (the fast path)
                return _pread_padded(layer, host, length)
            return _read_ops(ops, length)
        finally:
            self._read_done(epoch)

    def read_scanned(self, scan, runs, into):
        """Fill `into` (a writable buffer: the view a `scan` was made of, from the start
        of `runs`) where `runs` (some of the scan's runs, in order, inside it) say, with
        zeros elsewhere; no walk of the layers. False when the chain's layers changed
        since the scan (read_from then)."""
        with self._lock:
            if self.layers is not scan.layers:
                return False
            epoch = self._read_begins()
        try:
            offset = runs[0][0]
            ops = []
            for s, ln, d, kind, aux in runs:
                if kind == DATA:
                    ops.append((s - offset, ln, DATA, scan.layers[d], aux))
                elif kind == COMPRESSED:
                    layer = scan.layers[d]
                    within = s & (layer.cluster_size - 1)
                    ops.append((s - offset, ln, COMPRESSED, layer, (aux, within)))
            _read_ops_into(ops, memoryview(into))
            return True
        finally:
            self._read_done(epoch)

    def _read_begins(self):
        """Under the chain's lock: a read that may use the current layers starts."""
        epoch = self._epoch
        self._reads[epoch] = self._reads.get(epoch, 0) + 1
        return epoch

    def _read_done(self, epoch):
        with self._lock:
            left = self._reads[epoch] - 1
            if left:
                self._reads[epoch] = left
            else:
                del self._reads[epoch]

    def block_status(self, offset, length, want_zero=False):
        """Extents saying which layer serves each part of [offset, offset+length).

        With want_zero, the answers of `qemu-img map`: holes in a raw file are zeros,
        and so are holes inside the data clusters of an image that looks preallocated
        (see Qcow2Image.data_runs)."""
        self._check_range(offset, length)
        out = []
        with self._lock:
            layers = self.layers
            for s, ln, d, kind, aux in walk(layers, 0, offset, length, len(layers), want_zero):
                if kind == DATA:
                    for rs, rl, zero, host in layers[d].data_runs(s, ln, aux, want_zero):
                        append_run(out, Extent(rs, rl, d, True, zero, True, host), 6)
                elif kind == COMPRESSED:
                    append_run(out, Extent(s, ln, d, True, False, True, None), 6)
                elif kind == ZERO:
                    append_run(out, Extent(s, ln, d, True, True, False, aux), 6)
                else:  # no layer allocates it (an offset: see Qcow2Image.extents)
                    append_run(out, Extent(s, ln, d, False, True, False, aux), 6)
        return out

    def range_status(self, top_i, base_i, off, n):
        """Runs (start, length, depth, kind) of [off, off+n) as layers[top_i] sees it,
        looking down to but not into layers[base_i]. kind is DATA (incl. compressed),
        ZERO, or UNALLOCATED (base answers; depth = base_i). Zeros past the end of a
        short layer of the range count as ZERO allocated at the layer above it: a
        commit must write them into base (QEMU's short-backing-file rule)."""
        with self._lock:
            runs = _scan_runs(self.layers, top_i, base_i, off, n)
        out = []
        for s, ln, d, kind, _aux in runs:
            append_run(out, (s, ln, d, DATA if kind == COMPRESSED else kind))
        return out

    def scan(self, top_i, base_i, off, n):
        """A `Scan` of [off, off+n): range_status's runs, with compressed data told
        apart (COMPRESSED) and where each run's bytes lie (aux, as `walk` gives it), so
        that `read_scanned` reads them without walking the layers again.

        The layers are pinned as for a read and walked outside the chain's lock (each
        layer's lookup takes only that layer's lock): a guest request never waits for a
        scan, at most for one layer's lookup of the range."""
        with self._lock:
            layers = self.layers
            epoch = self._read_begins()
        try:
            return Scan(layers, _scan_runs(layers, top_i, base_i, off, n))
        finally:
            self._read_done(epoch)

    # --- writing ----------------------------------------------------------

    def _check_write(self, offset, length):
        if not self.writable:
            raise OSError(errno.EROFS, "chain is opened read-only")
        self._check_range(offset, length)

    def _below(self, depth):
        return lambda off, n: self.read_from(depth + 1, off, n)

    @property
    def lock(self):
        """The chain's metadata lock (held by guest writes and layer switches)."""
        return self._lock

    def write(self, offset, data):
        self._check_write(offset, len(data))
        with self._lock:
            layer = self.layers[0]
            layer.write(offset, data, self._below(0))  # owned clusters: in place at once
            self.guest_writes += 1
            for observer in self.write_observers:
                observer(offset, len(data), data)
        layer.writeback_if_full()

    def write_zeroes(self, offset, length):
        self._check_write(offset, length)
        with self._lock:
            layer = self.layers[0]
            layer.write_zeroes(offset, length, self._below(0))
            self.guest_writes += 1
            for observer in self.write_observers:
                observer(offset, length, None)
        layer.writeback_if_full()

    def discard(self, offset, length):
        """Afterwards the range reads as zeros (clusters are freed where possible)."""
        self.write_zeroes(offset, length)

    def flush(self):
        """Make every acknowledged write durable. The chain's lock is not held while
        the layers sync, so guest I/O goes on meanwhile. Layers that left the chain and
        are not closed yet are synced too: an active commit's pivot writes the old
        active image's leftover mark without a sync (completion.pivot), and a flush
        the guest sees return must find that mark durable. (A layer closed meanwhile
        was flushed by its close: its flush returns at once.)"""
        with self._lock:
            layers = [layer for _e, layer in self._retired] + self.layers
            layers = [layer for layer in layers if not layer.read_only]
        for layer in layers:
            layer.flush()

    # --- layer operations for commit ----------------------------------------

    def index_of(self, layer):
        return self.layers.index(layer)

    def below_fn(self, layer):
        """`below` callable for writes into `layer` (the chain beneath it)."""
        return self._below(self.index_of(layer))

    def grow(self, layer, new_size):
        """Grow a layer's virtual size; where its backing file is longer than the old
        size, the new area is zeroed so backing data cannot show through."""
        with self._lock:
            old = layer.virtual_size
            if new_size <= old:
                return
            layer.resize(new_size)
            i = self.index_of(layer)
            if i + 1 < len(self.layers):
                end = min(new_size, self.layers[i + 1].virtual_size)
                if end > old:
                    layer.write_zeroes(old, end - old, self._below(i))

    def reopen(self, layer, writable):
        """Reopen one layer read-write (or back to read-only), moving its locks. The
        files are opened outside the chain's lock; only the switch is under it.
        Only a job reopens layers, and never one that guest writes go to. The old
        handle closes once the reads that may use it are done."""
        new = self._reopen(layer, writable)
        self._reap()
        return new

    def _reopen(self, layer, writable):
        if layer.read_only != writable:
            return layer
        if not layer.read_only:
            layer.flush()
        if self.image_locking:
            drop_image_locks(layer.io.fd)
        try:
            new = open_layer(
                layer.path,
                layer.format,
                writable,
                self.cache_bytes,
                filename=layer.filename,
                reuse_ok=self._reuse_ok,
                map_stamp=self._map_stamp,
            )
            if self.image_locking:
                if writable:
                    take_image_locks(new.io.fd, new.path, WRITER, REOPEN_LOCK_PATIENCE)
                else:  # push_overlay reopens read-only under the chain's lock: no waiting
                    take_image_locks(new.io.fd, new.path, READER)
            if writable:
                new.repair_if_dirty()
        except BaseException:
            if self.image_locking:
                take_image_locks(layer.io.fd, layer.path, WRITER if not layer.read_only else READER)
            raise
        with self._lock:
            layers = list(self.layers)
            layers[self.index_of(layer)] = new
            self.layers = layers
            self._retire([layer])
            self._share_cache()
        return new

    def drop_layers(self, overlay, new_backing, backing_name, flush_overlay=True):
        """Make `overlay` name `new_backing` (already flushed) as its backing file and
        drop the layers in between. The header is rewritten first (durably; the
        in-memory chain is unchanged meanwhile, so guest I/O goes on), then the chain
        switches in one assignment. flush_overlay=False when the new backing file does
        not rely on the overlay's own writes (a commit: base holds what the dropped
        layers did), which are then not made durable before the header."""
        with self._lock:
            assert self.index_of(overlay) < self.index_of(new_backing)
        if overlay.read_only:
            raise QcowError(
                overlay.path, "overlay is read-only; cannot rewrite its backing file name"
            )
        overlay.set_backing(backing_name, new_backing.format, flush_first=flush_overlay)
        with self._lock:
            i, j = self.index_of(overlay), self.index_of(new_backing)
            dropped = self.layers[i + 1 : j]
            self.layers = self.layers[: i + 1] + self.layers[j:]
            self._retire(dropped)
            self._share_cache()
        self.release_dropped(dropped)
        return dropped

    def drop_backing(self, overlay):
        """Make `overlay` stand alone (a stream without base, which holds the whole
        view now): its header names no backing file (durably, before the switch, as in
        `drop_layers`), then every layer below it leaves the chain."""
        if overlay.read_only:
            raise QcowError(
                overlay.path, "overlay is read-only; cannot rewrite its backing file name"
            )
        overlay.set_backing(None, None)
        with self._lock:
            i = self.index_of(overlay)
            dropped = self.layers[i + 1 :]
            self.layers = self.layers[: i + 1]
            self._retire(dropped)
            self._share_cache()
        self.release_dropped(dropped)
        return dropped

    def push_overlay(self, path):
        """A live external snapshot: the new (empty) image at `path`, whose backing
        file is the active image, becomes the active layer, locked as QEMU locks it;
        the old active image is flushed and reopened read-only. One hold of the lock:
        between two guest requests."""
        path = os.fspath(path)
        with self._lock:
            old = self.layers[0]
            new = open_layer(
                absolute(path),
                "qcow2",
                True,
                self.cache_bytes,
                filename=path,
                reuse_ok=self._reuse_ok,
                map_stamp=self._map_stamp,
            )
            try:
                if self.image_locking:
                    take_image_locks(new.io.fd, new.path, WRITER)
                if new.backing_name is None or not os.path.samefile(
                    resolve_backing(new.backing_name, path), old.path
                ):
                    raise ChainError(path, "does not name the active image as its backing file")
            except BaseException:
                self._close_layers([new], flush=False)
                raise
            self.layers = [new] + self.layers
            try:
                self._reopen(old, False)
            except BaseException:
                self.layers = self.layers[1:]
                self._close_layers([new], flush=False)
                raise
            self._share_cache()
        self._reap()  # the old handle of the image now read-only
        return new

    def pivot_to(self, layer):
        """Make `layer` the active image (active commit): the layers above it leave.
        The caller may hold the chain's lock (the switch is then atomic with its last
        check); it passes the layers that left to `release_dropped` once it released it."""
        with self._lock:
            j = self.index_of(layer)
            dropped = self.layers[:j]
            self.layers = self.layers[j:]
            self._retire(dropped)
            self._share_cache()
            return dropped

    def _retire(self, layers):
        """Under the chain's lock: these layers left it. Reads that began before may
        still use them: a new epoch starts, and `_reap` closes them once the reads of
        the epochs before it are done."""
        self._epoch += 1
        self._retired += [(self._epoch, layer) for layer in layers]

    def release_dropped(self, layers):
        """Outside the chain's lock: make what the layers that left received durable,
        then close them (`_reap`)."""
        for layer in layers:
            layer.flush()
        self._reap()

    def _reap(self):
        """Close the layers that left the chain once no read that began before they
        left is in flight. Such reads are bounded and reads begun since do not count,
        so this waits for them (polling, holding no lock). Only the job or command
        that retired layers calls it, never under the chain's lock and never a guest
        request: closing flushes and syncs."""
        while True:
            with self._lock:
                oldest = min(self._reads, default=self._epoch + 1)
                done = [layer for e, layer in self._retired if e <= oldest]
                self._retired = [(e, layer) for e, layer in self._retired if e > oldest]
                waiting = bool(self._retired)
            self._close_layers(done)
            if not waiting:
                return
            time.sleep(REAP_POLL)

    # --- closing ----------------------------------------------------------

    def _close_layers(self, layers, flush=True):
        err = None
        for layer in layers:
            try:
                if flush and not layer.read_only:
                    layer.mark_clean()
                if self.image_locking and layer.io.fd >= 0:
                    drop_image_locks(layer.io.fd)
                layer.close()
            except OSError as e:
                err = err or e
        if err:
            raise err

    def close(self):
        with self._lock:
            layers = self.layers + [layer for _e, layer in self._retired]
            self.layers = []
            self._retired = []
        self._close_layers(layers)


def walk(layers, depth, off, n, bottom, want_zero=False):
    """The one walk over a chain: (start, length, depth, kind, aux) runs covering
    [off, off+n) as layers[depth] sees it, each part from the first layer, going down,
    that allocates it (kind and aux as that layer's `extents` gives them).

    The short-backing-file rule lives here: a part past the end of a layer's backing
    file reads as zeros and never reaches deeper layers; it comes as EOF at the depth
    of that layer (as it does where a layer has no backing file at all). A part no
    layer above layers[bottom] allocates comes as (UNALLOCATED, depth=bottom): there
    layers[bottom] answers, which is how a commit sees base. bottom=len(layers) walks
    the whole chain."""
    for s, ln, kind, aux in layers[depth].extents(off, n, want_zero):
        if kind != UNALLOCATED:
            yield s, ln, depth, kind, aux
        elif depth + 1 == bottom < len(layers):
            yield s, ln, bottom, UNALLOCATED, None
        else:
            lim = s
            if depth + 1 < len(layers):
                lim = max(s, min(s + ln, layers[depth + 1].virtual_size))
                if lim > s:
                    yield from walk(layers, depth + 1, s, lim - s, bottom, want_zero)
            if lim < s + ln:  # aux: where the layer's file holds that place, if it does
                yield lim, s + ln - lim, depth, EOF, None if aux is None else aux + lim - s


EOF = 4  # a walk's kind for zeros past a short backing file (not a layer's kind)


class Scan(NamedTuple):
    """Chain.scan's answer: the layer list it walked (the chain replaces the list, never
    changes it, when a layer comes or goes) and its runs (start, length, depth, kind,
    aux), kind DATA, COMPRESSED, ZERO or UNALLOCATED."""

    layers: list
    runs: list


def _scan_runs(layers, top_i, base_i, off, n):
    """The runs of Chain.scan, from the layer list `layers`."""
    out = []
    lim = max(off, min(off + n, layers[top_i].virtual_size))
    for s, ln, d, kind, aux in walk(layers, top_i, off, lim - off, base_i):
        if kind == COMPRESSED:
            out.append((s, ln, d, kind, aux))  # aux is its L2 entry: never merged
        elif kind == EOF:
            append_run(out, (s, ln, d, ZERO, None), host_index=4)
        else:
            append_run(out, (s, ln, d, kind, aux), host_index=4)
    if lim < off + n:
        append_run(out, (lim, off + n - lim, top_i, ZERO, None), host_index=4)
    return out


def clip_run(run, lo, hi):
    """The part of a scan's run inside [lo, hi) (its host offset moved along)."""
    s, ln, d, kind, aux = run
    a, b = max(s, lo), min(s + ln, hi)
    if kind == DATA and a > s:
        aux += a - s
    return (a, b - a, d, kind, aux)


def _pread_padded(layer, host, length):
    """`length` bytes of the layer's file from `host`, zeros past the file's end (bytes,
    or a bytearray when padded)."""
    data = layer.io.pread(length, host)
    if len(data) < length:
        data = bytearray(data) + bytes(length - len(data))
    return data


def _read_ops(ops, length):
    """Run a read plan (Chain._plan's ops, in order): `length` bytes (a bytearray when
    more than one request made them), zeros where no op is."""
    if len(ops) == 1 and ops[0][2] == DATA and ops[0][1] == length:
        return _pread_padded(ops[0][3], ops[0][4], length)
    buf = bytearray(length)
    _read_ops_into(ops, memoryview(buf), zeroed=True)
    return buf


def _read_ops_into(ops, mv, zeroed=False):
    """Run a read plan into the buffer `mv`; where no op is, zeros (unless `zeroed`
    says it holds zeros already)."""
    pos = 0
    for r, ln, kind, layer, aux in ops:
        if r > pos and not zeroed:
            mv[pos:r] = bytes(r - pos)
        if kind == DATA:
            layer.io.preadinto(mv[r : r + ln], aux)
        else:
            entry, within = aux
            mv[r : r + ln] = layer.read_compressed(entry)[within : within + ln]
        pos = r + ln
    if pos < len(mv) and not zeroed:
        mv[pos:] = bytes(len(mv) - pos)


def open_chain(
    path, writable=False, cache_bytes=32 << 20, image_locking=True, metadata_only=False, force=False
):
    """Open the chain whose active image is `path`. See the module doc. Writable, a
    chain holding a commit's leftover is refused (before anything is written) unless
    `force` (see qcow/leftover.py)."""
    if writable and not force:
        with Chain(path, False, cache_bytes, False, True) as probe:
            refuse_leftovers(probe.layers)
    return Chain(path, writable, cache_bytes, image_locking, metadata_only)
