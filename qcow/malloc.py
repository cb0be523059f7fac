"""glibc malloc tuning for processes that move data in large buffers.

Every chain.read of 1 MiB allocates a fresh buffer. With glibc's defaults a buffer that
large is mmap'ed and unmapped each time, so every call pays a page fault per 4 KiB page
(expensive on VMs): sequential reads run at a third of the speed they reach once
such buffers come from the heap and stay mapped. A library should not change its
process's allocator behind its back, so this is opt-in: the qcowfs CLI and mount
daemon call it; other programs may.
"""

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold=32 << 20, trim_threshold=128 << 20):
    """Serve buffers up to `mmap_threshold` from the heap and keep up to
    `trim_threshold` of freed heap mapped. No-op where glibc is not the allocator."""
    import ctypes  # here: the commands that never call this do not pay for loading it

    try:
        # the symbols already loaded: libc's, without ctypes.util.find_library (which
        # runs `ldconfig -p`, a process of its own, on every command's start)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
