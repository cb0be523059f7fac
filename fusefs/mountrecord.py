"""Where a mount's daemon can be found: the runtime directory and the mount record.

Every mount daemon writes a small record, keyed by its mountpoint's real path, in the
default runtime directory (``<runtime>/qcowfs/<hash>.mount``: JSON with the control
socket, pid, image and flat file name), whatever ``--control-socket`` it was given. So
every command that names a MOUNTPOINT finds that mount's socket by the mountpoint alone;
``--control-socket`` on the command only overrides. The record also lets the CLI prove
a daemon dead (its pid gone) before it clears a mount.

The runtime directory is ``${XDG_RUNTIME_DIR:-/run}/qcowfs``; a non-root user without
XDG_RUNTIME_DIR (who may not create /run/qcowfs) gets ``/tmp/qcowfs-<uid>`` instead,
which must be theirs and private.
"""

import json
import os
import stat

from qcow.errors import ImageLockConflict, QcowError

RECORD_SUFFIX = ".mount"


def runtime_dir():
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "qcowfs")
    uid = os.geteuid()
    if uid == 0:
        return "/run/qcowfs"
    return os.path.join("/tmp", f"qcowfs-{uid}")


def mount_key(mountpoint):
    """First 16 hex digits of the sha256 of the mountpoint's real path."""
    return _key(os.path.realpath(os.fsencode(mountpoint)))


def _key(path):
    import hashlib  # here: offline commands never hash a mountpoint (3 ms of their start)

    return hashlib.sha256(path).hexdigest()[:16]


def ensure_private_dir(path):
    """Create `path` (mode 0700) if needed; a shared-/tmp directory must be ours."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise QcowError(path, f"cannot create the runtime directory: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise QcowError(
            path,
            "runtime directory is not a private directory of this "
            "user; remove it or set XDG_RUNTIME_DIR",
        )


def default_socket_path(mountpoint):
    """`<runtime dir>/<mount_key>.sock` (qcowfs mount's default --control-socket)."""
    return os.path.join(runtime_dir(), mount_key(mountpoint) + ".sock")


def socket_for(real_mountpoint, override=None):
    """The control socket of the mount at `real_mountpoint`: `override` if given (the
    command's --control-socket), else the one its record names, else the default."""
    if override:
        return os.path.abspath(override)
    rec = read_record(real_mountpoint)
    if rec is not None and isinstance(rec.get("socket"), str):
        return rec["socket"]
    return default_socket_path(real_mountpoint)


def record_path(real_mountpoint):
    # no realpath() here: the daemon writes its record while its own mount cannot
    # answer a lookup yet
    return os.path.join(runtime_dir(), _key(os.fsencode(real_mountpoint)) + RECORD_SUFFIX)


def write_record(real_mountpoint, **fields):
    """Write the record atomically (a new file renamed over the old one)."""
    path = record_path(real_mountpoint)
    ensure_private_dir(os.path.dirname(path))
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(dict(fields, mountpoint=real_mountpoint)).encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return path


def _load(path):
    """A record file's JSON object, or None (missing, a symlink, not an object)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        rec = json.loads(os.read(fd, 1 << 16))
    except ValueError:
        return None
    finally:
        os.close(fd)
    return rec if isinstance(rec, dict) else None


def read_record(real_mountpoint):
    """The record of the mount at `real_mountpoint` as a dict, or None."""
    rec = _load(record_path(real_mountpoint))
    if rec is None or rec.get("mountpoint") != real_mountpoint:
        return None
    return rec


def remove_record(real_mountpoint, pid=None):
    """Remove the record (only if it is `pid`'s, when given: a newer mount of the same
    mountpoint may have replaced it)."""
    if pid is not None:
        rec = read_record(real_mountpoint)
        if rec is not None and rec.get("pid") != pid:
            return
    try:
        os.unlink(record_path(real_mountpoint))
    except OSError:
        pass


def mountpoint_of_image(image):
    """The mountpoint of a live qcowfs mount whose active image is `image`, or None:
    a lock conflict on it most likely means the user meant that mount."""
    from fusefs.daemonfiles import pid_alive  # here: only an error's hint needs it

    real = os.path.realpath(image)
    directory = runtime_dir()
    try:
        names = [n for n in os.listdir(directory) if n.endswith(RECORD_SUFFIX)]
    except OSError:
        return None
    for name in names:
        rec = _load(os.path.join(directory, name)) or {}
        image_path, pid = rec.get("image"), rec.get("pid")
        if (
            isinstance(image_path, str)
            and os.path.realpath(image_path) == real
            and isinstance(pid, int)
            and pid_alive(pid)  # a record a dead daemon left names no mount
        ):
            return rec.get("mountpoint")
    return None


def mounted_hint(e, command):
    """For an error: where a qcowfs mount has the image it is about, when it is a lock
    conflict on a mount's active image (an offline command given the image of a
    mounted chain, the usual slip); else ""."""
    if not isinstance(e, ImageLockConflict) or e.path is None:
        return ""
    mountpoint = mountpoint_of_image(e.path)
    if mountpoint is None:
        return ""
    if command in ("commit", "stream"):
        return f"; it is mounted at {mountpoint}: 'qcowfs {command} {mountpoint}' runs it live"
    return f"; qcowfs has it mounted at {mountpoint}"
