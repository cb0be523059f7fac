"""The daemon's command line as `ps` and /proc/PID/cmdline show it.

The daemon is a fork of `qcowfs mount`, so it would show the command the user typed
(relative paths, sizes as given). It shows instead its resolved command line, the one
`mount --foreground` with every option spelled out would run: absolute image and
mountpoint, which `qcowfs unmount` checks before it trusts a pid file. The kernel reads
/proc/PID/cmdline from the memory prctl(PR_SET_MM_MAP) names; that needs no privilege
when the executable stays the same. Where the kernel refuses, the old line stays.
"""

import ctypes
import os

PR_SET_MM = 35
PR_SET_MM_MAP = 14

_FIELDS = (
    "start_code",
    "end_code",
    "start_data",
    "end_data",
    "start_brk",
    "brk",
    "start_stack",
    "arg_start",
    "arg_end",
    "env_start",
    "env_end",
)
# the (1-based) fields of /proc/self/stat holding them; brk is not there (sbrk(0) is)
_STAT_FIELD = {
    "start_code": 26,
    "end_code": 27,
    "start_stack": 28,
    "start_data": 45,
    "end_data": 46,
    "start_brk": 47,
    "env_start": 50,
    "env_end": 51,
}


class _MMMap(ctypes.Structure):  # struct prctl_mm_map
    _fields_ = [(name, ctypes.c_uint64) for name in _FIELDS] + [
        ("auxv", ctypes.c_uint64),
        ("auxv_size", ctypes.c_uint32),
        ("exe_fd", ctypes.c_uint32),
    ]


_shown = None  # the bytes the kernel shows: they must live as long as the process


def show_command_line(argv):
    """Make /proc/self/cmdline read `argv`; False if the kernel refused."""
    global _shown
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().rsplit(b")", 1)[1].split()  # stat[0] is field 3
    except OSError:
        return False
    text = ctypes.create_string_buffer(b"".join(os.fsencode(a) + b"\0" for a in argv))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    mm = _MMMap(**{name: int(stat[n - 3]) for name, n in _STAT_FIELD.items()})
    mm.brk = libc.sbrk(0)
    mm.arg_start = ctypes.addressof(text)
    mm.arg_end = mm.arg_start + len(text) - 1  # the buffer's own terminating NUL left out
    mm.exe_fd = 0xFFFFFFFF  # the executable stays
    if libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        return False
    _shown = text
    return True
