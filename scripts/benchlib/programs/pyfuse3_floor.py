"""The floor of any pyfuse3 server: a raw file served as MOUNTPOINT/disk.raw with one
os.pread or os.pwrite per request and nothing else (no format, no locks, no cache of
its own), on the same pyfuse3 and trio main loop as qcowfs' daemon. What a 4 KiB
request costs here is the FUSE round trip and pyfuse3's dispatch alone.

    python -m scripts.benchlib.programs.pyfuse3_floor RAW MOUNTPOINT

Serves until unmounted (fusermount3 -u MOUNTPOINT)."""

import errno
import os
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"disk.raw"


class Floor(pyfuse3.Operations):
    def __init__(self, path):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = self.size
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)  # as qcowfs opens it

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(self.fd, buf, off)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass


def main(path, mountpoint):
    options = set(pyfuse3.default_options)
    options.add("fsname=pyfuse3-floor")
    pyfuse3.init(Floor(path), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
