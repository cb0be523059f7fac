"""`qcowfs mount` / `qcowfs unmount`: the mount daemon and its life cycle.

`qcowfs mount IMAGE MNT` checks what it cheaply can (mountpoint, image magic), then
starts the daemon as a child process (``python -m fusefs mount ... --foreground``, in
its own session, stdio on the log file) and waits on a readiness pipe (fd number in
``$QCOWFS_READY_FD``): the daemon writes ``READY`` once the flat file answers a stat
through the mount and the control socket listens, or ``ERROR <one line>`` when it
cannot start; the command then exits 0, or 1 with the daemon's own line.

The daemon runs trio: one nursery holds pyfuse3's main loop, the QMP control socket
(`fusefs.qmp.QMPServer`) and signal handling. Every way a mount ends — QMP ``quit``
(what `qcowfs unmount` sends), ``fusermount3 -u``, SIGTERM, SIGINT/SIGHUP in the
foreground — takes the same path: cancel running jobs, leave the FUSE loop, unmount,
flush and close the chain (images marked clean, locks dropped), emit QMP ``SHUTDOWN``,
exit 0. Logs go to a file (``--log-file``; default ``<socket dir>/<hash>.log`` next to
the control socket), never to a terminal that may be gone; the daemon's pid is in
``<hash>.pid`` beside it.
"""

import errno
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import trio

import qcow
from commit.engine import make_commit_factory
from commit.intent import resume_plan
from commit.jobmanager import JobManager
from commit.qapi import QMPError
from commit.stream import make_stream_factory
from commit.target import node_name  # node names block-commit's top/base accept
from fusefs import (
    mountrecord,  # where CLI commands find this mount
    qmp,  # the control socket
)
from fusefs.daemonfiles import LogHandler, RepeatFilter, open_log, remove_pid_file, write_pid_file
from fusefs.holders import describe, holders
from fusefs.qmp import default_socket_path
from fusefs.snapshot import make_snapshot_command
from fusefs.units import parse_mib
from fusefs.watchdog import Watchdog, install_thread_dump
from qcow.errors import ChainError, QcowError
from qcow.header import QCOW_MAGIC
from qcow.leftover import refuse_leftovers

log = logging.getLogger("qcowfs.daemon")
_CLI_PRINTS = {"cli_prints": True}  # log extra: the CLI prints this error itself

READY_ENV = "QCOWFS_READY_FD"
START_TIMEOUT = 120.0  # seconds `qcowfs mount` waits for the daemon to be ready
STOP_TIMEOUT = 120.0  # seconds `qcowfs unmount` waits for the daemon to exit
FSTYPE = "fuse.qcowfs"


def _stem(socket_path):
    base, ext = os.path.splitext(socket_path)
    return base if ext == ".sock" else socket_path


def pid_file_path(socket_path):
    return _stem(socket_path) + ".pid"


def default_log_path(socket_path):
    return _stem(socket_path) + ".log"


def _sole_exception(group):
    """The one exception inside (nested) exception groups, or None if several."""
    while isinstance(group, BaseExceptionGroup):
        if len(group.exceptions) != 1:
            return None
        group = group.exceptions[0]
    return group


class MountConfig:
    """Resolved options of one mount (absolute paths: the daemon runs in /)."""

    def __init__(self, args):
        self.image = os.path.abspath(args.image)
        self.mountpoint = os.path.realpath(args.mountpoint)
        self.read_only = bool(args.read_only)
        self.nonempty = bool(getattr(args, "nonempty", False))
        self.force = bool(getattr(args, "force", False))
        self.name = args.name
        self.allow_other = bool(args.allow_other)
        self.cache_mib = parse_mib(args.cache_mib)
        self.no_resume = bool(getattr(args, "no_resume", False))
        self.socket = os.path.abspath(args.control_socket or default_socket_path(self.mountpoint))
        self.log_file = os.path.abspath(
            getattr(args, "log_file", None) or default_log_path(self.socket)
        )
        self.pid_file = pid_file_path(self.socket)

    def daemon_argv(self):
        argv = [
            sys.executable,
            "-m",
            "fusefs",
            "mount",
            self.image,
            self.mountpoint,
            "--foreground",
            "--name",
            self.name,
            "--control-socket",
            self.socket,
            "--cache-mib",
            str(self.cache_mib),
            "--log-file",
            self.log_file,
        ]
        if self.read_only:
            argv.append("--read-only")
        if self.allow_other:
            argv.append("--allow-other")
        if self.no_resume:
            argv.append("--no-resume")
        if self.nonempty:
            argv.append("--nonempty")
        if self.force:
            argv.append("--force")
        return argv


# ---- checks --------------------------------------------------------------------------


def mount_fstype(path):
    """The file system type mounted at `path` ('fuse.qcowfs', ...), or None."""
    return _mountinfo(path)[0]


def mount_dev(path):
    """The device ('0:52') of the mount at `path`: tells one mount from a later one."""
    return _mountinfo(path)[1]


def _mountinfo(path):
    """(fstype, major:minor) of the topmost mount at `path`, or (None, None)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, None
    target = os.fsencode(path)
    found = None, None
    for line in lines:
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-")
        except ValueError:
            continue
        if _unescape(fields[4]) == target:  # the last one wins
            found = fields[sep + 1].decode(errors="replace"), fields[2].decode()
    return found


def _unescape(field):
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == 0x5C and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


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
        if fstype.startswith("fuse") and _fuse_dead(mountpoint):
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


def _fuse_dead(mountpoint):
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


# ---- qcowfs mount ----------------------------------------------------------------------


def cmd_mount(args):
    cfg = MountConfig(args)
    ready_fd = os.environ.pop(READY_ENV, None)
    if args.foreground:
        return run_daemon(cfg, int(ready_fd) if ready_fd else None)
    check_mountpoint(cfg.mountpoint, cfg.nonempty)
    check_qcow2_magic(cfg.image)
    check_socket_free(cfg.socket)
    return spawn_daemon(cfg)


def spawn_daemon(cfg):
    mountrecord.ensure_private_dir(mountrecord.runtime_dir())
    os.makedirs(os.path.dirname(cfg.socket), mode=0o700, exist_ok=True)
    os.makedirs(os.path.dirname(cfg.log_file), mode=0o700, exist_ok=True)
    logfd = open_log(cfg.log_file)
    r, w = os.pipe()
    env = dict(os.environ, **{READY_ENV: str(w)})
    try:
        proc = subprocess.Popen(
            cfg.daemon_argv(),
            stdin=subprocess.DEVNULL,
            stdout=logfd,
            stderr=logfd,
            pass_fds=(w,),
            env=env,
            cwd="/",
            start_new_session=True,
        )
    finally:
        os.close(logfd)
    os.close(w)
    try:
        line = _read_line(r, START_TIMEOUT)
        while line.startswith("NOTE "):  # a line for the user (a resumed commit)
            print(f"qcowfs: {line[5:]}", file=sys.stderr)
            line = _read_line(r, START_TIMEOUT)
    except BaseException:  # e.g. Ctrl-C while waiting: take the daemon along
        proc.terminate()
        _reap(proc, cfg)
        raise
    finally:
        os.close(r)
    if line.startswith("READY"):
        return 0
    rc = _reap(proc, cfg)
    if line.startswith("ERROR "):
        raise QcowError(None, line[6:])
    if line == "":
        why = f"exited with status {rc}" if rc >= 0 else f"was killed by signal {-rc}"
        raise QcowError(
            cfg.mountpoint, f"mount daemon {why} before the mount was ready; see {cfg.log_file}"
        )
    raise QcowError(
        cfg.mountpoint,
        f"mount daemon did not become ready within {START_TIMEOUT:.0f} s; see {cfg.log_file}",
    )


def _reap(proc, cfg):
    """A daemon that failed to start: wait for it (or kill it) and clear any mount it
    left behind. Returns its exit status."""
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if mount_fstype(cfg.mountpoint) == FSTYPE:
        subprocess.run(
            ["fusermount3", "-u", "-z", cfg.mountpoint],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return rc


def _read_line(fd, timeout):
    """The first line the daemon writes; '' on EOF, '?timeout' on time-out."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return "?timeout"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace") if buf else ""


class _Readiness:
    """The daemon's end of the readiness pipe (absent in a user's --foreground run)."""

    def __init__(self, fd):
        self.fd = fd

    def _send(self, line):
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def ready(self):
        self._send("READY")

    def note(self, message):
        """A line the user sees on `qcowfs mount`'s stderr (before READY)."""
        if self.fd is not None:
            try:
                os.write(self.fd, ("NOTE " + message.replace("\n", " ") + "\n").encode())
            except OSError:
                pass

    def error(self, message):
        self._send("ERROR " + message)


# ---- the daemon ----------------------------------------------------------------------


def _setup_logging(cfg, to_stderr):
    os.makedirs(os.path.dirname(cfg.log_file), mode=0o700, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fh = LogHandler(cfg.log_file)
    fh.setFormatter(fmt)
    fh.addFilter(RepeatFilter())
    root.addHandler(fh)
    if to_stderr:
        term = _TerminalHandler()
        term.addFilter(RepeatFilter())
        root.addHandler(term)
    return fh


class _TerminalHandler(logging.StreamHandler):
    """Warnings and errors to the user's terminal in --foreground (everything goes to
    the log file); drops itself once the terminal is gone. Errors the CLI prints
    itself (``extra=_CLI_PRINTS``) are not repeated."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("qcowfs: %(message)s"))
        self.addFilter(lambda record: not getattr(record, "cli_prints", False))

    def handleError(self, record):
        logging.getLogger().removeHandler(self)


def run_daemon(cfg, ready_fd=None):
    """The daemon itself (`mount --foreground`). Returns the exit code."""
    notify = _Readiness(ready_fd)
    try:
        log_handler = _setup_logging(cfg, to_stderr=ready_fd is None)
    except QcowError as err:
        notify.error(str(err))
        raise
    except OSError as e:
        err = QcowError(cfg.log_file, f"cannot open the log file: {e.strerror}")
        notify.error(str(err))
        raise err from None
    log.info(
        "starting: image %s, mountpoint %s, %s, control socket %s",
        cfg.image,
        cfg.mountpoint,
        "read-only" if cfg.read_only else "read-write",
        cfg.socket,
    )
    # kill -QUIT / -USR1: every thread's stack to the log (again after each rotation)
    install_thread_dump(log_handler.stream)
    log_handler.on_open = install_thread_dump
    cfg.watchdog = Watchdog(lambda: log_handler.stream)
    daemon = None
    try:
        check_mountpoint(cfg.mountpoint, cfg.nonempty)
        check_qcow2_magic(cfg.image)
        check_socket_free(cfg.socket)
        daemon = Daemon(cfg, notify)
        daemon.open()
    except QcowError as e:
        log.error("%s", e, extra=_CLI_PRINTS)
        notify.error(str(e))
        if daemon is not None:
            daemon.cleanup()
        raise
    except BaseException as e:
        log.exception("cannot start")
        notify.error(f"{cfg.mountpoint}: cannot start the mount daemon: {e!r}; see {cfg.log_file}")
        if daemon is not None:
            daemon.cleanup()
        raise
    return daemon.run()


class Daemon:
    def __init__(self, cfg, notify):
        self.cfg = cfg
        self.notify = notify
        self.on_terminal = notify.fd is None  # a user's own --foreground run
        self.chain = None
        self.ops = None
        self.hook = None
        self.jobs = None
        self.server = None
        self.fuse_state = "none"  # none -> mounted -> running -> stopped -> closed
        self.stopping = None  # reason, once a shutdown was asked for
        self.resume = None  # block-commit arguments of an interrupted commit
        self.exit_code = 0
        self._nursery = None
        self._pid_written = False

    # -- start-up --------------------------------------------------------------------

    def open(self):
        import pyfuse3

        from fusefs.mountfs import FallocateHook, MountFS

        cfg = self.cfg
        write_pid_file(cfg.pid_file)
        self._pid_written = True
        try:
            self.chain = qcow.open_chain(
                cfg.image,
                writable=not cfg.read_only,
                cache_bytes=cfg.cache_mib << 20,
                image_locking=True,
                force=cfg.force,
            )
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise QcowError(
                e.filename or cfg.image,
                f"cannot open for writing ({e.strerror}); mount with --read-only to only read it",
            ) from None
        if cfg.read_only and not cfg.force:
            refuse_leftovers(self.chain.layers)
        top = self.chain.layers[0]
        if top.format != "qcow2":
            raise ChainError(
                cfg.image,
                "not a qcow2 image (a raw image is already flat: there is nothing to mount)",
            )
        log.info(
            "chain: %s",
            " <- ".join(f"{layer.path} ({layer.format})" for layer in reversed(self.chain.layers)),
        )
        self.ops = MountFS(self.chain, cfg.name, read_only=cfg.read_only, watchdog=cfg.watchdog)
        options = {
            "default_permissions",
            "subtype=qcowfs",
            "fsname=" + cfg.image.replace("\\", "\\\\").replace(",", "\\,"),
        }
        if cfg.read_only:
            options.add("ro")
        if cfg.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(self.ops, cfg.mountpoint, options)
        except RuntimeError as e:
            raise QcowError(cfg.mountpoint, f"cannot mount ({e}); see {cfg.log_file}") from None
        self.fuse_state = "mounted"
        self.hook = FallocateHook(self.ops)
        self.hook.install()
        self.jobs = self._make_job_manager()
        self._check_pending_commit()
        try:
            mountrecord.write_record(
                cfg.mountpoint,
                socket=cfg.socket,
                pid=os.getpid(),
                dev=mount_dev(cfg.mountpoint),
                image=cfg.image,
                name=cfg.name,
                read_only=cfg.read_only,
                log=cfg.log_file,
            )
        except (OSError, QcowError) as e:
            log.warning(
                "cannot write the mount record (commands will need --control-socket): %s", e
            )

    def _check_pending_commit(self):
        """An interrupted commit recorded in the chain: say so in one line; it is
        resumed once the mount serves (see commit/intent.py)."""
        plan = resume_plan(self.chain, self.cfg.read_only, self.cfg.no_resume)
        if plan is not None:
            line, self.resume = plan
            self._note(line)

    def _note(self, line):
        log.warning("%s", line)
        self.notify.note(line)

    async def _resume_commit(self):
        try:
            await self.commands()["block-commit"](dict(self.resume))
        except (QcowError, QMPError) as e:
            log.error("cannot resume the interrupted commit: %s", e)

    def _make_job_manager(self):
        # The job commands (block-commit & co): the job machinery of commit/jobmanager.py with
        # the commit engine's block-commit for this chain. Its command table is merged
        # into ours in commands(), its events go out through the control socket, and it
        # runs in _main's nursery.
        # A read-only mount changes no image: its block-commit and block-stream refuse.
        read_only = self.cfg.mountpoint if self.cfg.read_only else None
        return JobManager(
            make_commit_factory(self.chain, read_only_mount=read_only),
            emit=self._emit,
            factories={"block-stream": make_stream_factory(self.chain, read_only_mount=read_only)},
        )

    # -- the command table of the control socket -----------------------------------

    def commands(self):
        table = {
            "query-named-block-nodes": self._qmp_query_named_block_nodes,
            "quit": self._qmp_quit,
        }
        if self.jobs is not None:
            table.update(self.jobs.commands())  # block-commit, query-block-jobs, ...
            table["blockdev-snapshot-sync"] = make_snapshot_command(
                self.chain, self.jobs, self.cfg.read_only
            )
        return table

    async def _qmp_query_named_block_nodes(self, arguments):
        return block_nodes(self.chain) if self.chain is not None else []

    async def _qmp_quit(self, arguments):
        self._nursery.start_soon(self.shutdown, "host-qmp-quit")
        return {}

    def _emit(self, event, data):
        if self.server is not None:
            try:
                self.server.emit(event, data)
            except Exception:
                log.exception("cannot emit %s", event)

    # -- running ---------------------------------------------------------------------

    def run(self):
        try:
            try:
                trio.run(self._main)
            except BaseExceptionGroup as group:  # a nursery wraps a start-up fault
                only = _sole_exception(group)
                if only is None:
                    raise
                raise only from None
        except QcowError as e:  # e.g. the control socket is taken
            log.error("%s", e)
            self.notify.error(str(e))
            self.exit_code = 1
        except BaseException:
            log.exception("mount daemon failed")
            self.notify.error(
                f"{self.cfg.mountpoint}: the mount daemon failed; see {self.cfg.log_file}"
            )
            self.exit_code = 1
        finally:
            self.cleanup()
        log.info("exit %d", self.exit_code)
        return self.exit_code

    async def _main(self):
        import pyfuse3

        sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        with trio.open_signal_receiver(*sigs) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_signals, signals)
                nursery.start_soon(self.cfg.watchdog.heartbeat)
                self.cfg.watchdog.start()
                if self.jobs is not None:
                    await nursery.start(self.jobs.run)
                self.server = qmp.QMPServer(self.cfg.socket, self.commands())
                await nursery.start(self.server.serve)
                nursery.start_soon(self._announce_ready)
                if self.resume is not None:
                    nursery.start_soon(self._resume_commit)
                self.fuse_state = "running"
                try:
                    # fallocate requests run as tasks of this inner nursery, so none is
                    # left when the session is destroyed below.
                    async with trio.open_nursery() as requests:
                        self.ops.nursery = requests
                        await pyfuse3.main()
                finally:
                    self.fuse_state = "stopped"
                if self.stopping is None:
                    self.stopping = "host-unmount"
                    log.info("unmounted from outside (fusermount3 -u or umount)")
                await self._finish()
                nursery.cancel_scope.cancel()

    async def _announce_ready(self):
        path = os.path.join(self.cfg.mountpoint, self.cfg.name)
        try:
            st = await trio.to_thread.run_sync(os.stat, path)
        except OSError as e:
            log.error("the mount does not answer: %s: %s", path, e.strerror)
            self.notify.error(
                f"{self.cfg.mountpoint}: the mount does not answer "
                f"({e.strerror}); see {self.cfg.log_file}"
            )
            await self.shutdown("startup-failed")
            self.exit_code = 1
            return
        info = self.hook.conn_info() if self.hook else None
        if info:
            major, minor, max_write, max_read, max_ra = info
            log.info(
                "kernel FUSE protocol %d.%d: max_write %d, max_read %s, max_readahead %d",
                major,
                minor,
                max_write,
                max_read or "unlimited (bounded by max_pages)",
                max_ra,
            )
        log.info("serving %s: %d bytes", path, st.st_size)
        self.notify.ready()

    async def _watch_signals(self, signals):
        async for signum in signals:
            if signum == signal.SIGHUP and not self.on_terminal:
                continue  # no terminal to lose in daemon mode
            name = signal.Signals(signum).name
            if self.stopping:
                log.info("%s: already shutting down (%s)", name, self.stopping)
                continue
            log.info("%s received", name)
            self._nursery.start_soon(self.shutdown, "host-signal")

    async def shutdown(self, reason):
        """Ask for a clean shutdown (idempotent): jobs, then the FUSE loop."""
        if self.stopping:
            return
        self.stopping = reason
        log.info("shutting down (%s)", reason)
        await self._cancel_jobs()
        if self.fuse_state == "running":
            import pyfuse3

            pyfuse3.terminate()  # pyfuse3.main() returns; _main finishes up

    async def _cancel_jobs(self):
        if self.jobs is None:
            return
        try:
            await self.jobs.cancel_all()
        except Exception:
            log.exception("cancelling the jobs failed")

    async def _finish(self):
        """After the FUSE loop: unmount, cancel jobs, close the chain, say goodbye."""
        import pyfuse3

        self._close_fuse(pyfuse3)
        await self._cancel_jobs()
        ok = await trio.to_thread.run_sync(self._close_chain)
        if self.ops is not None:
            log.info(
                "largest requests served: read %d, write %d bytes",
                self.ops.max_read_seen,
                self.ops.max_write_seen,
            )
        if ok and self.exit_code == 0:
            self._emit("SHUTDOWN", {"guest": False, "reason": self.stopping})
        else:
            self.exit_code = 1
        if self.server is not None:
            await self.server.flush(timeout=5.0)  # SHUTDOWN reaches the clients

    def _close_fuse(self, pyfuse3):
        if self.fuse_state in ("mounted", "running", "stopped"):
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                log.exception("unmounting failed")
            self.fuse_state = "closed"
            log.info("unmounted %s", self.cfg.mountpoint)

    def _close_chain(self):
        if self.chain is None:
            return True
        chain, self.chain = self.chain, None
        try:
            chain.close()
        except Exception:
            log.exception("closing the chain failed: images may not be marked clean")
            return False
        log.info("chain flushed and closed; images marked clean, locks released")
        return True

    def cleanup(self):
        """Last resort on every exit path: nothing mounted, chain closed, files gone."""
        if self.fuse_state != "none" and self.fuse_state != "closed":
            import pyfuse3

            self._close_fuse(pyfuse3)
        if self.chain is not None and not self._close_chain():
            self.exit_code = 1
        if self._pid_written:
            remove_pid_file(self.cfg.pid_file)
            self._pid_written = False
        mountrecord.remove_record(self.cfg.mountpoint, pid=os.getpid())


def block_nodes(chain):
    """`query-named-block-nodes`: the chain, top first."""
    out = []
    for depth, layer in enumerate(chain.layers):
        out.append(
            {
                "node-name": node_name(depth),
                "file": layer.path,
                "virtual-size": layer.virtual_size,
                "format": layer.format,
                "ro": bool(layer.read_only),
                "backing_file_depth": len(chain.layers) - 1 - depth,
            }
        )
    return out


# ---- qcowfs unmount --------------------------------------------------------------------


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
    if pid is not None and not _wait_pid_exit(pid, STOP_TIMEOUT):
        raise QcowError(
            mountpoint,
            f"mount daemon (pid {pid}) did not exit within {STOP_TIMEOUT:.0f} s; see {log_path}",
        )
    if mount_fstype(mountpoint) == FSTYPE:
        raise QcowError(mountpoint, "still mounted after the daemon exited")
    if not clean:
        raise QcowError(mountpoint, f"mount daemon exited without a clean shutdown; see {log_path}")
    _say_pivoted(mountpoint, record, nodes)
    return 0


def _say_pivoted(mountpoint, record, nodes):
    """After an active commit pivoted, the image mounted is no longer the disk."""
    now = nodes[0].get("file") if nodes else None
    was = (record or {}).get("image")
    if now and was and now != was:
        print(
            f"{mountpoint}: unmounted; the disk is now {now} (an active commit "
            f"pivoted to it from {was})"
        )


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
        pid = _verified_pid(record["pid"], mountpoint)
        if pid is not None:
            return pid
    return _read_pid(pid_file_path(sock_path), mountpoint)


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
        if _wait_pid_exit(pid, STOP_TIMEOUT) and mount_fstype(mountpoint) is None:
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
        and record.get("dev") == mount_dev(mountpoint)
        and _verified_pid(record["pid"], mountpoint) is None
    ):
        return f"pid {record['pid']} has exited"
    if _fuse_dead_within(mountpoint, 5.0):
        return "the FUSE connection is aborted"
    return None


def _fuse_dead_within(mountpoint, timeout):
    """_fuse_dead, but a daemon that is alive and stuck does not hang us."""
    answer = []
    t = threading.Thread(target=lambda: answer.append(_fuse_dead(mountpoint)), daemon=True)
    t.start()
    t.join(timeout)
    return bool(answer and answer[0])


def _read_pid(path, mountpoint=None):
    """The daemon's pid from its pid file, if that process still runs and is ours (a
    stale pid file may name a pid reused by something else)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return _verified_pid(pid, mountpoint)


def _verified_pid(pid, mountpoint=None):
    """`pid` if it is a running qcowfs daemon (of `mountpoint`), else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if b"fusefs" not in argv or (mountpoint is not None and os.fsencode(mountpoint) not in argv):
        return None
    return pid if pid_alive(pid) else None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _wait_pid_exit(pid, timeout):
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
