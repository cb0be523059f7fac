"""Paths as the kernel resolves them, not as os.path normalises them.

`d/link/../base.qcow2` names the `base.qcow2` beside the directory `link` points to;
os.path.abspath and os.path.relpath collapse `link/..` as text and name another file.
QEMU hands backing file names to the kernel as they are written, so qcowfs must too.
"""

import os


def absolute(path):
    """`path` made absolute, without collapsing `..` (the kernel resolves it after
    following symlinks)."""
    path = os.fspath(path)
    if ".." in path.split(os.sep):
        return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    return os.path.abspath(path)


def relative_name(path, directory):
    """A relative name that leads from `directory` to the file `path`, as the kernel
    walks it: worked out between the real directories (`..` leaves the directory a
    symlink points to, not the link's parent); the last name is kept, so a symlinked
    image is still named by its link."""
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return os.path.relpath(real, os.path.realpath(directory))
