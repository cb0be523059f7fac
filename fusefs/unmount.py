"""`qcowfs unmount`: stop a mount's daemon cleanly, or prove it gone.

The command asks the daemon to quit over its control socket (QMP ``quit``) and waits
for its ``SHUTDOWN`` event and its exit. It refuses while a job runs (unless
``--cancel-jobs``) and while the flat file is open, naming who holds it (unless
``--lazy``, which detaches as ``umount -l`` does). A daemon whose socket does not answer
is stopped with SIGTERM; a mount whose daemon is gone is cleared only with proof of its
death (its recorded pid exited, or the FUSE connection is aborted), never on a guess.
"""

import os
import signal
import subprocess
import threading

from fusefs import (
    mountrecord,  # where CLI commands find this mount
    qmp,  # the control socket
)
from fusefs.daemonfiles import default_log_path, pid_file_path, read_pid, verified_pid, wait_exit
from fusefs.holders import describe, holders
from fusefs.mountcheck import FSTYPE, fuse_dead, mount_fstype
from qcow.errors import QcowError
from qcow.mountinfo import mount_at

STOP_TIMEOUT = 120.0  # seconds `qcowfs unmount` waits for the daemon to exit


def cmd_unmount(args):
    mountpoint = os.path.realpath(args.mountpoint)
    record = mountrecord.read_record(mountpoint)
    sock_path = mountrecord.socket_for(mountpoint, args.control_socket)
    log_path = (record or {}).get("log") or default_log_path(sock_path)
    fstype = mount_fstype(mountpoint)
    if not os.path.exists(sock_path):
        return _unmount_without_socket(
            args, mountpoint, sock_path, fstype, record, "no control socket"
        )
    conn = qmp.QMPConnection(sock_path, label=mountpoint, timeout=30.0)
    try:
        conn.connect()
    except QcowError as e:
        return _unmount_without_socket(args, mountpoint, sock_path, fstype, record, e.message)
    pid = _daemon_pid(record, sock_path, mountpoint)
    clean = False
    try:
        if fstype is None:
            # its daemon answers, so it was detached lazily and still serves opens
            raise QcowError(
                mountpoint, "already detached lazily; its daemon exits once the flat file is closed"
            )
        if not args.cancel_jobs:
            _refuse_if_jobs(conn, mountpoint)
        busy = holders(mountpoint)
        if busy and not args.lazy:
            _refuse_busy(mountpoint, busy)
        if busy:
            return _lazy_detach(conn, mountpoint, busy, args.cancel_jobs)
        nodes = conn.execute("query-named-block-nodes") or []
        conn.execute("quit")
        # The daemon now cancels jobs, unmounts, closes the chain, says SHUTDOWN and
        # closes the socket.
        while True:
            ev = conn.next_event(timeout=STOP_TIMEOUT)
            if ev is None:
                raise QcowError(
                    mountpoint,
                    f"mount daemon did not finish within {STOP_TIMEOUT:.0f} s; see {log_path}",
                )
            if ev.get("event") == "SHUTDOWN":
                clean = True
    except qmp.QMPCallError as e:
        raise QcowError(mountpoint, f"the mount daemon refused to quit: {e.desc}") from None
    except QcowError as e:
        if e.message != "the control socket closed the connection":
            raise
    finally:
        conn.close()
    if pid is not None and not wait_exit(pid, STOP_TIMEOUT):
        raise QcowError(
            mountpoint,
            f"mount daemon (pid {pid}) did not exit within {STOP_TIMEOUT:.0f} s; see {log_path}",
        )
    if mount_fstype(mountpoint) == FSTYPE:
        raise QcowError(mountpoint, "still mounted after the daemon exited")
    if not clean:
        raise QcowError(mountpoint, f"mount daemon exited without a clean shutdown; see {log_path}")
    _say_new_disk(mountpoint, record, nodes)
    return 0


def _say_new_disk(mountpoint, record, nodes):
    """After a snapshot or an active commit's pivot, the image mounted is no longer the
    disk: say which is, and how it came to be."""
    now = nodes[0].get("file") if nodes else None
    was = (record or {}).get("image")
    if not (now and was) or now == was:
        return
    below = {os.path.realpath(node.get("file", "")) for node in nodes[1:]}
    how = (
        f"a snapshot put it above {was}"
        if os.path.realpath(was) in below
        else f"an active commit pivoted to it from {was}"
    )
    print(f"{mountpoint}: unmounted; the disk is now {now} ({how})")


def _refuse_busy(mountpoint, busy):
    raise QcowError(
        mountpoint,
        f"busy: the flat file is in use ({describe(busy)}); "
        f"close it first, or use --lazy to detach anyway",
    )


def _lazy_detach(conn, mountpoint, busy, cancel_jobs):
    """As `umount -l`: the mount leaves the namespace now; the daemon keeps serving
    the opens that remain and shuts down cleanly once the last one is closed."""
    if cancel_jobs:
        for job in conn.execute("query-block-jobs") or []:
            if job.get("status") not in ("concluded", "null"):
                conn.execute("block-job-cancel", {"device": job["device"], "force": True})
    cp = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
    if cp.returncode != 0:
        raise QcowError(mountpoint, f"lazy unmount failed: {cp.stderr.strip()}")
    print(
        f"{mountpoint}: detached lazily while in use ({describe(busy)}); the daemon "
        f"flushes, closes the images and exits once they are closed"
    )
    return 0


def _refuse_if_jobs(conn, mountpoint):
    try:
        jobs = conn.execute("query-block-jobs")
    except qmp.QMPCallError as e:
        if e.error_class == qmp.COMMAND_NOT_FOUND:
            return
        raise
    active = [
        j.get("device", "?") for j in jobs or [] if j.get("status") not in ("concluded", "null")
    ]
    if active:
        raise QcowError(
            mountpoint,
            f"job(s) running: {', '.join(active)}; wait for, "
            f"cancel or complete them, or use --cancel-jobs",
        )


def _daemon_pid(record, sock_path, mountpoint):
    """The live daemon's pid: from the mount record, else the pid file by the socket."""
    if record is not None and isinstance(record.get("pid"), int):
        pid = verified_pid(record["pid"], mountpoint)
        if pid is not None:
            return pid
    return read_pid(pid_file_path(sock_path), mountpoint)


def _unmount_without_socket(args, mountpoint, sock_path, fstype, record, err):
    if fstype is None:
        raise QcowError(mountpoint, "not mounted")
    if fstype != FSTYPE:
        raise QcowError(mountpoint, f"not a qcowfs mount ({fstype})")
    pid = _daemon_pid(record, sock_path, mountpoint)
    if pid is not None:
        # The daemon lives but its socket does not answer: stop it the other way.
        busy = holders(mountpoint)
        if busy and not args.lazy:
            _refuse_busy(mountpoint, busy)
        os.kill(pid, signal.SIGTERM)
        if wait_exit(pid, STOP_TIMEOUT) and mount_fstype(mountpoint) is None:
            return 0
        raise QcowError(
            mountpoint,
            f"control socket {sock_path} does not answer ({err}) "
            f"and the daemon (pid {pid}) did not stop on SIGTERM",
        )
    proof = _proof_of_death(mountpoint, record)
    if proof is None:
        raise QcowError(
            mountpoint,
            f"control socket {sock_path} does not answer ({err}) "
            f"and its daemon cannot be found; left as it is (give "
            f"--control-socket PATH if the mount used one)",
        )
    subprocess.run(
        ["fusermount3", "-u", "-z", mountpoint],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mountrecord.remove_record(mountpoint)
    raise QcowError(
        mountpoint,
        f"its mount daemon was gone ({proof}): removed the dead "
        "mount; run 'qcowfs check --repair' on the image",
    )


def _proof_of_death(mountpoint, record):
    """Why the daemon of the FUSE mount at `mountpoint` is certainly gone, or None."""
    if (
        record is not None
        and isinstance(record.get("pid"), int)
        and record.get("dev") == _mount_dev(mountpoint)
        and verified_pid(record["pid"], mountpoint) is None
    ):
        return f"pid {record['pid']} has exited"
    if _fuse_dead_within(mountpoint, 5.0):
        return "the FUSE connection is aborted"
    return None


def _fuse_dead_within(mountpoint, timeout):
    """_fuse_dead, but a daemon that is alive and stuck does not hang us."""
    answer = []
    t = threading.Thread(target=lambda: answer.append(fuse_dead(mountpoint)), daemon=True)
    t.start()
    t.join(timeout)
    return bool(answer and answer[0])


def _mount_dev(mountpoint):
    m = mount_at(mountpoint)
    return m.dev if m else None
