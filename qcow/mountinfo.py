"""The kernel's table of mounts (/proc/self/mountinfo), read the one way every caller
shares.

Each line: ``ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE
SOURCE SUPER_OPTIONS``. In ROOT, MOUNT_POINT and SOURCE the kernel writes space, tab,
newline and backslash as the octal escapes ``\\040 \\011 \\012 \\134``, so a field
never holds a separator; `unescape` turns them back into the bytes of the path.
"""

import os
import re
from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


class Mount(NamedTuple):
    mount_point: str  # as os.fsdecode gives it (undecodable bytes as surrogates)
    fstype: str  # 'ext4', 'fuse.qcowfs', ...
    dev: str  # 'major:minor' of the mounted file system: tells one mount from a later one


def unescape(field):
    """The bytes of a mountinfo path field, its octal escapes decoded."""
    return _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def mounts():
    """Every mount of this process's namespace, in the kernel's order (later mounts on
    the same point come after the ones they cover); [] when the table cannot be read."""
    try:
        with open(MOUNTINFO, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(b" ")
        try:
            fstype = fields[fields.index(b"-") + 1]
        except (ValueError, IndexError):
            continue
        if len(fields) < 5:
            continue
        out.append(
            Mount(
                os.fsdecode(unescape(fields[4])),
                os.fsdecode(unescape(fstype)),
                fields[2].decode(errors="replace"),
            )
        )
    return out


def mount_at(path):
    """The topmost mount whose mount point is exactly `path` (give it resolved), or None."""
    target = os.fsdecode(path)
    found = None
    for m in mounts():
        if m.mount_point == target:
            found = m  # the last one wins: it is on top
    return found
