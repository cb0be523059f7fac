"""A backing chain opened from its active (topmost) image: the guest's flat view.

Reads go active -> ... -> base, cluster by cluster; a layer's unallocated range reads
through to its backing file, and past the end of a shorter backing file it reads as
zeros whatever deeper layers hold (QEMU's rule). Writes land in the active layer.

Concurrency: one re-entrant lock per chain guards metadata (L1/L2 caches, refcounts,
the layer list). A read plans its I/O under the lock and performs it outside, so
several reads proceed at once; writes hold the lock throughout. Layers that leave the
chain are closed only once no read that may still use them is in flight.
"""

import errno
import os
import stat
import threading
from typing import NamedTuple

from .errors import ChainError, CorruptImage, QcowError, UnsupportedImage
from .header import QCOW_MAGIC
from .image import Qcow2Image
from .leftover import refuse_leftovers
from .l2_table import COMPRESSED, DATA, UNALLOCATED, ZERO
from .lock import READER, WRITER, lock_image, unlock_image
from .raw import RawImage, host_data_runs

MAX_CHAIN = 256


class Extent(NamedTuple):
    """One run of `block_status`, with the fields of `qemu-img map --output=json`."""
    start: int
    length: int
    depth: int          # index in chain.layers of the layer that answers for it
    present: bool       # allocated at that layer (False: zeros past a chain's end)
    zero: bool
    data: bool
    offset: int | None  # host offset in that layer's file, where there is one

    def to_json(self):
        d = {"start": self.start, "length": self.length, "depth": self.depth,
             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def probe_format(path):
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW_MAGIC else "raw"


def resolve_backing(name, overlay_path):
    """The path a backing name refers to: relative names are relative to the directory
    of the image naming it, as that image's path was given (QEMU's rule)."""
    if name.startswith("json:") or (":" in name.split("/", 1)[0] and not
                                    os.path.exists(os.path.join(os.path.dirname(
                                        overlay_path), name))):
        raise UnsupportedImage(overlay_path, f"backing file '{name}' uses a protocol "
                                             f"or json: name, which is not supported")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(overlay_path), name)


def open_layer(path, fmt, writable, cache_bytes, metadata_only=False):
    if fmt == "qcow2":
        return Qcow2Image(path, writable, cache_bytes, metadata_only)
    if fmt == "raw":
        return RawImage(path, writable)
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
    def __init__(self, path, writable=False, cache_bytes=32 << 20, lock=True,
                 metadata_only=False):
        self.writable = writable
        self.cache_bytes = cache_bytes
        self.locking = lock
        self._lock = threading.RLock()
        self._inflight = 0
        self._retired = []
        # called under the lock after each guest write: observer(offset, length, data)
        # with data None for zero writes (an active commit mirrors through this)
        self.write_observers = []
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
            layer = open_layer(os.path.abspath(path), fmt, writable, self.cache_bytes,
                               metadata_only)
            layer.filename = path
            layer.reuse_ok = lambda: self._inflight == 0
            self.layers.append(layer)
            if self.locking:
                lock_image(layer.io.fd, path, WRITER if writable else READER)
            if writable and layer.format == "qcow2":
                layer.repair_if_dirty()
            if not layer.backing_name:
                return
            named_by = path
            fmt = layer.backing_format       # else probed once the file is found
            path = resolve_backing(layer.backing_name, path)
            writable = False

    def _share_cache(self):
        """Split the L2 cache budget between the qcow2 layers."""
        q = [layer for layer in self.layers if layer.format == "qcow2"]
        for layer in q:
            layer.l2_cache.capacity = max(4, self.cache_bytes // len(q) // layer.cluster_size)

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
            raise ValueError(f"range [{offset}, {offset + length}) is outside the "
                             f"virtual disk of {self.virtual_size} bytes")

    def _plan(self, layers, depth, off, n, rel, ops):
        """Append the I/O that produces guest [off, off+n) from layers[depth:]; zeros
        need no op (the buffer starts zeroed)."""
        layer = layers[depth]
        for s, ln, kind, aux in layer.extents(off, n):
            r = rel + s - off
            if kind == DATA:
                ops.append((r, ln, DATA, layer, aux))
            elif kind == COMPRESSED:
                ops.append((r, ln, COMPRESSED, layer, (aux, s & (layer.cluster_size - 1))))
            elif kind == UNALLOCATED and depth + 1 < len(layers):
                lim = min(s + ln, layers[depth + 1].virtual_size)
                if lim > s:
                    self._plan(layers, depth + 1, s, lim - s, r, ops)

    def read(self, offset, length):
        """The guest's bytes at [offset, offset+length)."""
        self._check_range(offset, length)
        with self._lock:
            layer = self.layers[0]
            host = layer.fast_host(offset, length) if layer.format == "qcow2" else None
            if host is not None:
                self._inflight += 1
        if host is None:
            return self.read_from(0, offset, length)
        try:
            data = layer.io.pread(length, host)
        finally:
            self._read_done()
        return data if len(data) == length else data + bytes(length - len(data))

    def read_from(self, depth, offset, length):
        """The view of the chain from layers[depth] down: what layers[depth-1] sees of
        its backing file. Past layers[depth]'s end it is zeros (a short backing file)."""
        ops = []
        with self._lock:
            layers = self.layers
            if depth < len(layers):
                lim = min(offset + length, layers[depth].virtual_size)
                if lim > offset:
                    self._plan(layers, depth, offset, lim - offset, 0, ops)
            self._inflight += 1
        try:
            if len(ops) == 1 and ops[0][2] == DATA and ops[0][1] == length:
                layer, host = ops[0][3], ops[0][4]
                data = layer.io.pread(length, host)
                if len(data) == length:
                    return data
            buf = bytearray(length)
            mv = memoryview(buf)
            for r, ln, kind, layer, aux in ops:
                if kind == DATA:
                    layer.io.preadinto(mv[r:r + ln], aux)
                else:
                    entry, within = aux
                    mv[r:r + ln] = layer.read_compressed(entry)[within:within + ln]
            return bytes(buf)
        finally:
            self._read_done()

    def _read_done(self):
        with self._lock:
            self._inflight -= 1
            if not self._inflight and self._retired:
                retired, self._retired = self._retired, []
                self._close_layers(retired, flush=False)

    def block_status(self, offset, length, want_zero=False):
        """Extents saying which layer serves each part of [offset, offset+length).

        With want_zero, the answers of `qemu-img map`: holes in a raw file are zeros,
        and so are holes inside the data clusters of an image that looks preallocated
        (see Qcow2Image.looks_preallocated)."""
        self._check_range(offset, length)
        out = []
        with self._lock:
            self._status(self.layers, 0, offset, length, want_zero, out)
        return out

    def _status(self, layers, depth, off, n, want_zero, out):
        layer = layers[depth]
        exts = layer.extents(off, n, want_zero) if layer.format == "raw" \
            else layer.extents(off, n)
        for s, ln, kind, aux in exts:
            if kind == DATA:
                if want_zero and layer.format == "qcow2" and layer.looks_preallocated():
                    for hs, hl, is_data in host_data_runs(layer.io.fd, aux, ln):
                        _emit(out, Extent(s + hs - aux, hl, depth, True, not is_data,
                                          True, hs))
                else:
                    _emit(out, Extent(s, ln, depth, True, False, True, aux))
            elif kind == COMPRESSED:
                _emit(out, Extent(s, ln, depth, True, False, True, None))
            elif kind == ZERO:
                _emit(out, Extent(s, ln, depth, True, True, False, aux))
            else:
                lim = s
                if depth + 1 < len(layers):
                    lim = min(s + ln, layers[depth + 1].virtual_size)
                    if lim > s:
                        self._status(layers, depth + 1, s, lim - s, want_zero, out)
                    lim = max(lim, s)
                if lim < s + ln:
                    _emit(out, Extent(lim, s + ln - lim, depth, False, True, False, None))

    def range_status(self, top_i, base_i, off, n):
        """Runs (start, length, depth, kind) of [off, off+n) as layers[top_i] sees it,
        looking down to but not into layers[base_i]. kind is DATA (incl. compressed),
        ZERO, or UNALLOCATED (base answers; depth = base_i). Zeros past the end of a
        short layer of the range count as ZERO allocated at the layer above it: a
        commit must write them into base (QEMU's short-backing-file rule)."""
        out = []
        with self._lock:
            layers = self.layers
            lim = min(off + n, layers[top_i].virtual_size)
            if lim > off:
                self._range_walk(layers, top_i, base_i, off, lim - off, out)
            if lim < off + n:
                _add_run(out, max(lim, off), off + n - max(lim, off), top_i, ZERO)
        return out

    def _range_walk(self, layers, depth, base_i, off, n, out):
        for s, ln, kind, _aux in layers[depth].extents(off, n):
            if kind != UNALLOCATED:
                _add_run(out, s, ln, depth, ZERO if kind == ZERO else DATA)
            elif depth + 1 == base_i:
                _add_run(out, s, ln, base_i, UNALLOCATED)
            else:
                lim = max(s, min(s + ln, layers[depth + 1].virtual_size))
                if lim > s:
                    self._range_walk(layers, depth + 1, base_i, s, lim - s, out)
                if lim < s + ln:
                    _add_run(out, lim, s + ln - lim, depth, ZERO)

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
            host = layer.fast_host(offset, len(data), for_write=True) \
                if layer.format == "qcow2" and layer.prepared_for_write else None
            if host is not None:
                layer.io.pwrite(data, host)     # owned cluster: overwrite in place
            else:
                layer.write(offset, data, self._below(0))
            for observer in self.write_observers:
                observer(offset, len(data), data)

    def write_zeroes(self, offset, length):
        self._check_write(offset, length)
        with self._lock:
            self.active.write_zeroes(offset, length, self._below(0))
            for observer in self.write_observers:
                observer(offset, length, None)

    def discard(self, offset, length):
        """Afterwards the range reads as zeros (clusters are freed where possible)."""
        self.write_zeroes(offset, length)

    def flush(self):
        """Make every acknowledged write durable. The chain's lock is not held while
        the layers sync, so guest I/O goes on meanwhile."""
        with self._lock:
            layers = [layer for layer in self.layers if not layer.read_only]
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
        """Reopen one layer read-write (or back to read-only), moving its locks."""
        with self._lock:
            i = self.index_of(layer)
            if layer.read_only != writable:
                return layer
            if not layer.read_only:
                layer.flush()
            if self.locking:
                unlock_image(layer.io.fd)
            try:
                new = open_layer(layer.path, layer.format, writable, self.cache_bytes)
                new.filename = layer.filename
                new.reuse_ok = lambda: self._inflight == 0
                if self.locking:
                    lock_image(new.io.fd, new.path, WRITER if writable else READER)
                if writable and new.format == "qcow2":
                    new.repair_if_dirty()
            except BaseException:
                if self.locking:
                    lock_image(layer.io.fd, layer.path, WRITER if not layer.read_only
                               else READER)
                raise
            layers = list(self.layers)
            layers[i] = new
            self.layers = layers
            self._retire([layer])
            self._share_cache()
            return new

    def drop_layers(self, overlay, new_backing, backing_name):
        """Make `overlay` name `new_backing` (already flushed) as its backing file and
        drop the layers in between. The header is rewritten first (durably), then the
        in-memory chain switches in one assignment."""
        with self._lock:
            i, j = self.index_of(overlay), self.index_of(new_backing)
            assert i < j
            if overlay.read_only:
                raise QcowError(overlay.path, "overlay is read-only; cannot rewrite its "
                                              "backing file name")
            overlay.set_backing(backing_name, new_backing.format)
            dropped = self.layers[i + 1:j]
            self.layers = self.layers[:i + 1] + self.layers[j:]
            self._retire(dropped)
            self._share_cache()
            return dropped

    def pivot_to(self, layer):
        """Make `layer` the active image (active commit): the layers above it leave."""
        with self._lock:
            j = self.index_of(layer)
            dropped = self.layers[:j]
            self.layers = self.layers[j:]
            self._retire(dropped)
            self._share_cache()
            return dropped

    def _retire(self, layers):
        for layer in layers:
            if not layer.read_only:
                layer.flush()
        if self._inflight:
            self._retired.extend(layers)
        else:
            self._close_layers(layers, flush=False)

    # --- closing ----------------------------------------------------------

    def _close_layers(self, layers, flush=True):
        err = None
        for layer in layers:
            try:
                if flush and not layer.read_only and layer.format == "qcow2":
                    layer.mark_clean()
                if self.locking and layer.io.fd >= 0:
                    unlock_image(layer.io.fd)
                layer.close()
            except OSError as e:
                err = err or e
        if err:
            raise err

    def close(self):
        with self._lock:
            layers, self.layers = self.layers + self._retired, []
            self._retired = []
            self._close_layers(layers)


def _add_run(out, start, length, depth, kind):
    if out and out[-1][2] == depth and out[-1][3] == kind \
            and out[-1][0] + out[-1][1] == start:
        out[-1] = (out[-1][0], out[-1][1] + length, depth, kind)
    else:
        out.append((start, length, depth, kind))


def _emit(out, e):
    if out:
        p = out[-1]
        if (p.depth == e.depth and p.present == e.present and p.zero == e.zero
                and p.data == e.data and p.start + p.length == e.start
                and ((p.offset is None and e.offset is None) or
                     (p.offset is not None and e.offset is not None
                      and p.offset + p.length == e.offset))):
            out[-1] = p._replace(length=p.length + e.length)
            return
    out.append(e)


def open_chain(path, writable=False, cache_bytes=32 << 20, lock=True, metadata_only=False,
               force=False):
    """Open the chain whose active image is `path`. See the module doc. Writable, a
    chain holding a commit's leftover is refused (before anything is written) unless
    `force` (see qcow/leftover.py)."""
    if writable and not force:
        with Chain(path, False, cache_bytes, False, True) as probe:
            refuse_leftovers(probe.layers)
    return Chain(path, writable, cache_bytes, lock, metadata_only)
