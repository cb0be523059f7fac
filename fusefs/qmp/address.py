"""A Unix socket address for a path of any length (the server binds it, the client
connects to it)."""

import os
from contextlib import contextmanager

from qcow.errors import QcowError

_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux


@contextmanager
def short_address(path):
    """A bindable/connectable address for `path`, even past sun_path's 108 bytes.

    A long path is reached through /proc/self/fd/<directory fd>/<name>, which Linux
    accepts for both bind() and connect().
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        alias = f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"
        if len(os.fsencode(alias)) > _SUN_PATH_MAX:
            raise QcowError(path, "socket name too long")
        yield alias
    finally:
        os.close(dirfd)
