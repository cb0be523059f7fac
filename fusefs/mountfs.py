"""The FUSE side of a mount: one pyfuse3 `Operations` class serving one flat file.

The root directory holds exactly one regular file (``disk.raw`` or ``--name``) whose
contents are the flat view of a qcow2 chain (`qcow.open_chain`). Every handler is a thin
delegation to the chain; the chain is thread-safe, so what may wait long (flushes,
discards) runs in worker threads (`trio.to_thread.run_sync` under a `CapacityLimiter`)
while other requests go on; reads and writes are served inline, where a thread hop
would cost more than it overlaps (see `INLINE_MAX`). An `OSError` from the chain
becomes `pyfuse3.FUSEError(errno)`; any other exception is logged and answered with
EIO, so one bad request never takes the mount down.

Page cache: files are opened with ``keep_cache`` and without ``direct_io``. Measured
with fio (psync, buffered, 4 KiB, 1 GiB 4-layer chain, 2-vCPU VM, two rounds):
sequential reads 42-47k IOPS with the page cache against 6.0-6.1k with direct_io (the
kernel turns them into 128 KiB readahead requests: 0.7 s of daemon CPU per 256 MiB
instead of 3.9-4.8 s); random reads 3.6-5.0k against 6.2-6.8k IOPS at the same daemon
CPU (within this VM's noise); random writes 4.4-5.5k against 3.9-5.3k. Besides:
- O_DIRECT callers (QEMU, ``dd oflag=direct``, fio ``direct=1``) bypass the page cache
  either way, so for them the choice changes nothing;
- re-reads of cached data never reach Python at all;
- the flat view only ever changes through this mount (every image of the chain is
  locked against other writers; a commit or a pivot does not change what the flat
  file reads as), so cached pages never go stale. ``fallocate`` punch/zero ranges are
  dropped from the cache by the kernel itself.
The kernel's writeback cache stays off: every write reaches us before write(2)
returns, so fsync only has to flush the chain.

`fallocate` is not among the operations pyfuse3 (3.5) forwards; `FallocateHook`
installs a handler for it into the running libfuse session (see its docstring).
"""

import ctypes
import errno
import logging
import os
import stat
import struct
import time

import pyfuse3
import trio

from fusefs.watchdog import Watchdog

log = logging.getLogger("qcowfs.mount")

FILE_INODE = pyfuse3.ROOT_INODE + 1
FH_BUFFERED, FH_DIRECT = 0, 1  # a file handle's low bit: how it was opened (O_DIRECT?)
ATTR_TIMEOUT = 3600.0  # attributes never change behind the kernel's back

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Open flags: page cache on, kept across opens (see the module docstring).
DIRECT_IO = False
KEEP_CACHE = True

# Requests up to this size are served on the trio thread itself; larger ones (the kernel
# sends none: 1 MiB is its largest request) would go to a worker thread. Measured on the
# 2-vCPU VM (0.5 GiB 4-layer chain, fio psync QD1, O_DIRECT), as the daemon's CPU time
# per request, which other load on the machine skews less than throughput (medians of
# two to six runs; the machine was busy, so only the columns' ratios count):
#                                      inline    worker thread   (qemu-storage-daemon)
#   1 MiB seq read                      920 us      1,200 us          1,170 us
#   1 MiB seq write, empty overlay    1,190 us      1,410 us            840 us
#   1 MiB seq write, allocated          850 us      1,180 us            625 us
# A thread hop costs CPU (wake-ups, hand-offs) that a request served one at a time never
# wins back; QEMU too serves FUSE requests one at a time on one thread. The chain never
# calls back into trio, so an inline call cannot deadlock.
#
# What an inline request may wait for, per kind (the trio thread must never wait for a
# lock that another thread holds across unbounded I/O, such as a fdatasync):
# - read: the chain's lock while it plans, and each layer's metadata lock in turn. Other
#   threads hold the chain's lock for bookkeeping and for a guest write's own bounded
#   I/O; a layer's metadata lock for in-memory work and bounded pwrites (a job's chunk
#   is at most 1 MiB). Flush barriers, header rewrites and closing layers that left the
#   chain run outside both (qcow.chain, Qcow2Image.flush), and an inline request never
#   closes a layer itself (the job that retired it does: Chain._reap). The exceptions
#   are one-off structural changes: growing base at a job's start, a new refcount
#   block or table, a larger L1 table.
# - write: the same, plus the copy-on-write read from lower layers (bounded). A write
#   that leaves the L2 cache over capacity with dirty tables writes them back itself,
#   after releasing every lock (Chain.write).
# - fsync, flush, fallocate and requests over INLINE_MAX: always in a worker thread.
INLINE_MAX = 1 << 20

_to_thread = trio.to_thread.run_sync


class MountFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, chain, name="disk.raw", read_only=False, threads=16, watchdog=None):
        super().__init__()
        # requests in flight, for the daemon's watchdog thread (begin/end per request)
        self.watch = watchdog or Watchdog(lambda: None)
        self.chain = chain
        self.name = os.fsencode(name)
        self.size = chain.virtual_size
        self.read_only = read_only
        self.limiter = trio.CapacityLimiter(threads)
        self.nursery = None  # set by the daemon: where fallocate requests run
        self.dirty = False  # written since the last flush of the chain
        self._writers = set()  # handles opened for writing: only their close flushes
        self._handles = 0  # file handles are (serial << 1) | FH_DIRECT or FH_BUFFERED
        self.max_read_seen = 0  # largest requests the kernel actually sent
        self.max_write_seen = 0
        self._stamp_ns = time.time_ns()
        top = chain.layers[0]
        # the flat file is as private as the image it shows (--allow-other lets others
        # in only as far as the top image's mode does)
        self._file_mode = stat.S_IMODE(os.fstat(top.io.fd).st_mode) & ~(0o222 if read_only else 0)
        self._blksize = max(4096, min(getattr(top, "cluster_size", None) or 65536, 1 << 20))

    # ---- data path: keep it short (each 10 us of Python costs ~17% of 4 KiB IOPS) -----

    async def read(self, fh, off, size):
        n = self.size - off
        if size < n:
            n = size
        if n <= 0:
            return b""
        if size > self.max_read_seen:
            self.max_read_seen = size
        token = self.watch.begin("read", off, n)
        try:
            if n <= INLINE_MAX:
                return self.chain.read_buffer(off, n)
            return await _to_thread(self.chain.read_buffer, off, n, limiter=self.limiter)
        except Exception as e:
            raise _fuse_error(e, "read", off, n) from None
        finally:
            self.watch.end(token)

    async def write(self, fh, off, buf):
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        n = len(buf)
        if n > self.max_write_seen:
            self.max_write_seen = n
        if off + n > self.size:
            # Past the end: a buffered write is cut short (as on a block device), an
            # O_DIRECT one refused whole (the kernel would turn a short one into EIO).
            if off >= self.size or fh & FH_DIRECT:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            n = self.size - off
            buf = bytes(buf[:n])
        token = self.watch.begin("write", off, n)
        try:
            if n <= INLINE_MAX:
                self.chain.write(off, buf)
            else:
                await _to_thread(self.chain.write, off, buf, limiter=self.limiter)
        except Exception as e:
            raise _fuse_error(e, "write", off, n) from None
        finally:
            self.watch.end(token)
        self.dirty = True
        return n

    async def fsync(self, fh, datasync):
        await self._flush("fsync")

    async def flush(self, fh):
        # close(2) of a handle opened for writing: make the data durable as a file
        # system would on close of a file written through it; free when nothing was
        # written since the last flush. A reader's close never fails for a writer.
        if self.dirty and fh in self._writers:
            await self._flush("flush")

    async def _flush(self, what):
        self.dirty = False
        token = self.watch.begin(what, 0, 0)
        try:
            await _to_thread(self.chain.flush, limiter=self.limiter)
        except Exception as e:
            self.dirty = True
            raise _fuse_error(e, what, 0, 0) from None
        finally:
            self.watch.end(token)

    async def fallocate(self, mode, off, length):
        """PUNCH_HOLE|KEEP_SIZE -> discard, ZERO_RANGE -> write_zeroes, else EOPNOTSUPP."""
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            op, what = self.chain.discard, "discard"
        elif mode & ~FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE:
            op, what = self.chain.write_zeroes, "write_zeroes"
        else:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if off + length > self.size:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # would have to grow the file
            length = self.size - off
            if length <= 0:
                return
        token = self.watch.begin(what, off, length)
        try:
            await _to_thread(op, off, length, limiter=self.limiter)
        except Exception as e:
            raise _fuse_error(e, what, off, length) from None
        finally:
            self.watch.end(token)
        self.dirty = True

    # ---- metadata ---------------------------------------------------------------------

    def _attr(self, inode):
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        e.entry_timeout = e.attr_timeout = ATTR_TIMEOUT
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
        elif inode == FILE_INODE:
            e.st_mode = stat.S_IFREG | self._file_mode
            e.st_nlink = 1
            e.st_size = self.size
            e.st_blocks = self._host_blocks()
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_blksize = self._blksize
        e.st_uid = os.getuid()
        e.st_gid = os.getgid()
        # Constant times: a changing mtime would make the kernel drop the whole page
        # cache of the file on the next attribute refresh (auto_inval_data).
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self._stamp_ns
        return e

    def _host_blocks(self):
        """512-byte blocks the chain's files occupy on the host (what `du` should say)."""
        blocks = 0
        for layer in self.chain.layers:
            try:
                blocks += os.stat(layer.path).st_blocks
            except OSError:
                pass
        return blocks

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == self.name:
            return self._attr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and attr.st_size != self.size:
            if self.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            log.warning(
                "refused to change the size of %s from %d to %d bytes: the size "
                "of the flat view is the chain's virtual size",
                os.fsdecode(self.name),
                self.size,
                attr.st_size,
            )
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)  # time updates are accepted and ignored

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC and self.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # as truncate: the size is the chain's
        self._handles += 1
        fh = self._handles << 1 | (FH_DIRECT if flags & os.O_DIRECT else FH_BUFFERED)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._writers.add(fh)
        return pyfuse3.FileInfo(fh=fh, direct_io=DIRECT_IO, keep_cache=KEEP_CACHE)

    async def release(self, fh):
        self._writers.discard(fh)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id < 1:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.size + 4095) // 4096
        try:
            host = os.statvfs(os.path.dirname(self.chain.layers[0].path))
            free = host.f_bavail * host.f_frsize // 4096
        except OSError:
            free = 0
        s.f_bfree = s.f_bavail = min(free, s.f_blocks)
        s.f_files = 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # The directory holds exactly one file: nothing can be created, renamed or removed.
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)


def _fuse_error(exc, what, off, length):
    """Map a failure of the chain to the errno the caller sees, logging the cause."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, OSError) and exc.errno:
        log.error("%s at offset %d, %d bytes: %s", what, off, length, exc.strerror or exc)
        return pyfuse3.FUSEError(exc.errno)
    log.error("%s at offset %d, %d bytes failed", what, off, length, exc_info=exc)
    return pyfuse3.FUSEError(errno.EINVAL if isinstance(exc, ValueError) else errno.EIO)


# ---- fallocate: a handler pyfuse3 does not forward -------------------------------------


class FallocateHook:
    """Serve FUSE_FALLOCATE although pyfuse3 registers no handler for it.

    pyfuse3 hands libfuse a `struct fuse_lowlevel_ops` whose ``fallocate`` slot is NULL,
    so libfuse answers ENOSYS and the kernel then refuses every fallocate(2) on the
    mount with EOPNOTSUPP. libfuse copies that table into its session and looks the slot
    up per request, so after `pyfuse3.init()` we fill in the session's copy with a
    ctypes callback. The callback runs on the trio thread (pyfuse3 calls
    ``fuse_session_process_buf`` there, holding the GIL), starts a trio task for the
    request and returns; the task replies with ``fuse_reply_err``.

    Finding the session's copy: pyfuse3 keeps the session pointer and its own ops table
    in module-level C variables whose addresses we read from the extension's ELF symbol
    table; the copy is located inside the session by comparing bytes with pyfuse3's
    table, so no libfuse-internal layout is assumed. Any mismatch disables the hook
    (logged): fallocate then fails with EOPNOTSUPP, as it would without it.
    The same session lookup yields the negotiated `fuse_conn_info` (`conn_info()`).
    """

    FALLOCATE_SLOT = 40  # index of .fallocate in struct fuse_lowlevel_ops (libfuse 3 ABI)

    _CALLBACK = ctypes.CFUNCTYPE(
        None,
        ctypes.c_void_p,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    )

    def __init__(self, ops):
        self.ops = ops
        self.installed = False
        self._session = None
        self._ops_off = None
        self._ops_size = 0
        self._callback = self._CALLBACK(self._on_request)  # must outlive the session
        libfuse = ctypes.CDLL("libfuse3.so.3")
        self._reply_err = libfuse.fuse_reply_err
        self._reply_err.argtypes = (ctypes.c_void_p, ctypes.c_int)
        self._reply_err.restype = ctypes.c_int

    def install(self):
        try:
            self._locate()
            slot = self._session + self._ops_off + 8 * self.FALLOCATE_SLOT
            if self._ops_size < 8 * (self.FALLOCATE_SLOT + 1):
                raise RuntimeError("pyfuse3's ops table is too short")
            cur = ctypes.c_void_p.from_address(slot)
            if cur.value:
                raise RuntimeError("the fallocate slot is already taken")
            cur.value = ctypes.cast(self._callback, ctypes.c_void_p).value
        except Exception as e:
            log.warning(
                "fallocate support not installed (%s): fallocate(2) on the mount "
                "will fail with EOPNOTSUPP",
                e,
            )
            return False
        self.installed = True
        return True

    def _locate(self):
        path = pyfuse3.__file__
        syms = _elf_symbols(
            path, {b"__pyx_v_7pyfuse3_session", b"__pyx_v_7pyfuse3_fuse_ops", b"PyInit_pyfuse3"}
        )
        if len(syms) != 3:
            raise RuntimeError(f"symbols missing from {path}")
        lib = ctypes.CDLL(path)
        bias = ctypes.cast(lib.PyInit_pyfuse3, ctypes.c_void_p).value - syms[b"PyInit_pyfuse3"][0]
        session = ctypes.c_void_p.from_address(bias + syms[b"__pyx_v_7pyfuse3_session"][0]).value
        if not session:
            raise RuntimeError("no FUSE session (pyfuse3.init() not called?)")
        ops_addr, ops_size = syms[b"__pyx_v_7pyfuse3_fuse_ops"]
        ops_addr += bias
        table = ctypes.string_at(ops_addr, ops_size)
        window = ctypes.string_at(session, 256 + ops_size)
        hits = [i for i in range(0, 256, 8) if window[i : i + ops_size] == table]
        if len(hits) != 1:
            raise RuntimeError("cannot find the ops table inside the libfuse session")
        self._session, self._ops_off, self._ops_size = session, hits[0], ops_size

    def conn_info(self):
        """(proto_major, proto_minor, max_write, max_read, max_readahead) as negotiated
        with the kernel, or None. `struct fuse_conn_info` lies a few fields after the ops
        table in the session; it is recognised by its protocol version (7.x)."""
        if self._session is None:
            return None
        base = self._session + self._ops_off + self._ops_size
        raw = ctypes.string_at(base, 96)
        for i in range(0, 64, 4):
            major, minor, max_write, max_read, max_ra = struct.unpack_from("=5I", raw, i)
            if major == 7 and 20 <= minor < 100 and max_write >= 4096:
                return major, minor, max_write, max_read, max_ra
        return None

    def _on_request(self, req, ino, mode, off, length, fi):
        # Called synchronously from fuse_session_process_buf on the trio thread.
        try:
            self.ops.nursery.start_soon(self._serve, req, mode, off, length)
        except Exception:
            log.exception("cannot start the fallocate handler")
            self._reply_err(req, errno.EIO)

    async def _serve(self, req, mode, off, length):
        err = 0
        try:
            await self.ops.fallocate(mode, off, length)
        except pyfuse3.FUSEError as e:
            err = e.errno
        except BaseException as e:
            err = errno.EINTR if isinstance(e, trio.Cancelled) else errno.EIO
            if not isinstance(e, trio.Cancelled):
                log.exception("fallocate failed")
            self._reply_err(req, err)
            raise
        self._reply_err(req, err)


def _elf_symbols(path, wanted):
    """{name: (st_value, st_size)} for the `wanted` names in an ELF64 file's .symtab."""
    found = {}
    with open(path, "rb") as f:
        ehdr = f.read(64)
        if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
            raise RuntimeError(f"{path}: not a little-endian ELF64 file")
        (e_shoff,) = struct.unpack_from("<Q", ehdr, 0x28)
        e_shentsize, e_shnum = struct.unpack_from("<HH", ehdr, 0x3A)
        f.seek(e_shoff)
        shdrs = [struct.unpack("<IIQQQQIIQQ", f.read(e_shentsize)[:64]) for _ in range(e_shnum)]
        for sh in shdrs:
            if sh[1] != 2:  # SHT_SYMTAB
                continue
            strtab = shdrs[sh[6]]
            f.seek(strtab[4])
            names = f.read(strtab[5])
            f.seek(sh[4])
            data = f.read(sh[5])
            for pos in range(0, len(data) - 23, 24):
                st_name, _info, _other, _shndx, value, size = struct.unpack_from(
                    "<IBBHQQ", data, pos
                )
                end = names.find(b"\0", st_name)
                name = names[st_name:end]
                if name in wanted:
                    found[name] = (value, size)
    return found
