"""The mount daemon: serves the flat file until the mount ends.

It runs in the process `qcowfs mount` forked (`fusefs.spawn`), or in the command's own
with ``--foreground``. trio's nursery holds pyfuse3's main loop, the QMP control socket
(`fusefs.qmp.QMPServer`), the job manager and signal handling; it says READY on the
readiness pipe (`fusefs.readiness`) once the flat file answers a stat through the mount
and the control socket listens. Every way a mount ends — QMP ``quit`` (what `qcowfs
unmount` sends), ``fusermount3 -u``, SIGTERM, SIGINT/SIGHUP in the foreground — takes the
same path: cancel running jobs, leave the FUSE loop, unmount, flush and close the chain
(images marked clean, locks dropped), emit QMP ``SHUTDOWN``, exit 0. Logs go to a file
(``--log-file``; default ``<socket dir>/<hash>.log`` next to the control socket), never
to a terminal that may be gone; the daemon's pid is in ``<hash>.pid`` beside it.
"""

import errno
import logging
import os
import signal
import sys

import pyfuse3
import trio

import qcow
from commit.engine import make_commit_factory
from commit.intent import resume_plan
from commit.jobmanager import JobManager
from commit.qapi import QMPError
from commit.stream import make_stream_factory
from commit.target import node_names  # the names block-commit's top/base accept
from fusefs import (
    mountrecord,  # where CLI commands find this mount
    qmp,  # the control socket
)
from fusefs.daemonfiles import LogHandler, RepeatFilter, remove_pid_file, write_pid_file
from fusefs.mountcheck import check_all
from fusefs.mountfs import FallocateHook, MountFS
from fusefs.proctitle import show_command_line
from fusefs.readiness import ReadyPipe
from fusefs.snapshot import make_snapshot_command
from fusefs.watchdog import Watchdog, install_thread_dump
from qcow.errors import ChainError, QcowError
from qcow.leftover import refuse_leftovers
from qcow.mountinfo import mount_at

log = logging.getLogger("qcowfs.daemon")
_CLI_PRINTS = {"cli_prints": True}  # log extra: the CLI prints this error itself


def _sole_exception(group):
    """The one exception inside (nested) exception groups, or None if several."""
    while isinstance(group, BaseExceptionGroup):
        if len(group.exceptions) != 1:
            return None
        group = group.exceptions[0]
    return group


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
    """The daemon itself, in a forked child (`ready_fd`: the readiness pipe) or in
    `mount --foreground`. Returns the exit code."""
    notify = ReadyPipe(ready_fd)
    try:
        log_handler = _setup_logging(cfg, to_stderr=ready_fd is None)
    except QcowError as err:
        notify.error(str(err))
        raise
    except OSError as e:
        err = QcowError(cfg.log_file, f"cannot open the log file: {e.strerror}")
        notify.error(str(err))
        raise err from None
    if not show_command_line(cfg.daemon_argv()):  # ps and `qcowfs unmount` know it by it
        log.info("the kernel refused to show the resolved command line (PR_SET_MM_MAP)")
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
        check_all(cfg)
        daemon = Daemon(cfg, notify)
        daemon.open()
    except QcowError as e:
        log.error("%s", e, extra=_CLI_PRINTS)
        notify.error(f"{e}{mountrecord.mounted_hint(e, 'mount')}")
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
        # the mount table's source column, for people to read: pyfuse3 passes options
        # as ASCII, so other characters show as '?' (the mount record names the image)
        fsname = cfg.image.encode("ascii", "replace").decode("ascii")
        options = {
            "default_permissions",
            "subtype=qcowfs",
            "fsname=" + fsname.replace("\\", "\\\\").replace(",", "\\,"),
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
                dev=mount_at(cfg.mountpoint).dev,
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
                self.chain, self.jobs, self.cfg.read_only, self.cfg.mountpoint
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
        self._close_fuse()
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

    def _close_fuse(self):
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
            self._close_fuse()
        if self.chain is not None and not self._close_chain():
            self.exit_code = 1
        if self._pid_written:
            remove_pid_file(self.cfg.pid_file)
            self._pid_written = False
        mountrecord.remove_record(self.cfg.mountpoint, pid=os.getpid())


def block_nodes(chain):
    """`query-named-block-nodes`: the chain, top first."""
    out = []
    names = node_names(chain)
    for depth, layer in enumerate(chain.layers):
        out.append(
            {
                "node-name": names.of(layer),
                "file": layer.path,
                "virtual-size": layer.virtual_size,
                "format": layer.format,
                "ro": bool(layer.read_only),
                "backing_file_depth": len(chain.layers) - 1 - depth,
            }
        )
    return out
