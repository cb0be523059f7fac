"""Who holds a mount's flat file open: what `umount` would call EBUSY.

Read from /proc (every process's open file descriptors) and from sysfs (loop devices
backed by a file on the mount). Reading fd links asks the kernel, not the FUSE daemon,
so this works whatever state the daemon is in. A process of another user whose /proc
entries we may not read is missed; root sees everything.
"""

import os


def holders(mountpoint):
    """[(pid or None, description)] of every open of a file under `mountpoint`."""
    prefix = os.path.realpath(mountpoint).rstrip("/") + "/"
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                found.append((int(entry), _comm(entry)))
    try:
        loops = [d for d in os.listdir("/sys/block") if d.startswith("loop")]
    except OSError:
        loops = []
    for dev in sorted(loops):
        try:
            with open(f"/sys/block/{dev}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append((None, f"/dev/{dev}"))
    return found


def describe(found):
    """'3 opens: pid 12 (qemu-system-x86), pid 40 (dd), /dev/loop0'."""
    seen = []
    for pid, what in found:
        item = f"pid {pid} ({what})" if pid is not None else f"{what} (loop device)"
        if item not in seen:
            seen.append(item)
    n = len(found)
    return f"{n} open{'s' if n != 1 else ''}: {', '.join(seen)}"


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
