"""What `qcowfs mount` checks before it mounts, the cheap way (no image is opened for
real): the mountpoint, the image's magic, the control socket. The daemon checks the same
again once it runs; `qcowfs unmount` uses `fuse_dead` as proof that a daemon is gone."""

import errno
import os
import socket
import stat

from qcow.errors import ChainError, QcowError
from qcow.header import QCOW_MAGIC
from qcow.mountinfo import mount_at

FSTYPE = "fuse.qcowfs"


def mount_fstype(path):
    """The file system type mounted at `path` ('fuse.qcowfs', ...), or None."""
    m = mount_at(path)
    return m.fstype if m else None


def check_mountpoint(mountpoint, nonempty=False):
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise QcowError(mountpoint, "mountpoint does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise QcowError(
                mountpoint,
                "mountpoint is a dead FUSE mount (its daemon "
                "is gone); clear it with 'fusermount3 -u -z' first",
            ) from None
        raise QcowError(mountpoint, f"mountpoint: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise QcowError(mountpoint, "mountpoint is not a directory")
    fstype = mount_fstype(mountpoint)
    if fstype is not None:
        if fstype.startswith("fuse") and fuse_dead(mountpoint):
            raise QcowError(
                mountpoint,
                "mountpoint is a dead FUSE mount (its daemon is "
                "gone); clear it with 'qcowfs unmount' or "
                "'fusermount3 -u -z' first",
            )
        raise QcowError(mountpoint, f"already mounted ({fstype}); unmount it first")
    if not nonempty and os.listdir(mountpoint):
        raise QcowError(
            mountpoint,
            "mountpoint is not empty (the mount would hide its "
            "files); use --nonempty to mount over them",
        )


def fuse_dead(mountpoint):
    """Whether the FUSE mount at `mountpoint` has lost its daemon (ENOTCONN)."""
    try:
        os.statvfs(mountpoint)  # never answered from a cache: reaches the daemon
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def check_qcow2_magic(image):
    try:
        with open(image, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ChainError(image, "no such file") from None
    except IsADirectoryError:
        raise ChainError(image, "is a directory, not an image") from None
    except OSError as e:
        raise ChainError(image, e.strerror) from None
    if magic != QCOW_MAGIC:
        raise ChainError(
            image, "not a qcow2 image (a raw image is already flat: there is nothing to mount)"
        )


def check_socket_free(path):
    if not os.path.exists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(path)
    except OSError:
        return  # stale: the daemon replaces it
    finally:
        s.close()
    raise QcowError(path, "control socket is in use by another running mount")


def check_all(cfg):
    """Every check above, for the mount `cfg` (a fusefs.spawn.MountConfig) describes."""
    check_mountpoint(cfg.mountpoint, cfg.nonempty)
    check_qcow2_magic(cfg.image)
    check_socket_free(cfg.socket)
