"""`qcowfs mount`: check, fork the mount daemon, wait until it serves.

`qcowfs mount IMAGE MNT` checks what it cheaply can (mountpoint, image magic, control
socket), then forks: the child leaves the terminal's session (setsid), puts its stdio on
the log file, runs the daemon (`fusefs.daemon.run_daemon`) in this same interpreter and
never returns into the command's code (os._exit). No second Python starts, and the
command itself imports neither trio nor pyfuse3: the child does, after the fork, when no
thread exists yet. The command waits on the readiness pipe (`fusefs.readiness`) and exits
0 on READY, or 1 with the daemon's own one-line error. ``--foreground`` runs the daemon
in the command's process instead.
"""

import logging
import os
import signal
import sys
import traceback

from fusefs import mountrecord
from fusefs.daemonfiles import default_log_path, open_log, pid_file_path, wait_exit
from fusefs.mountcheck import FSTYPE, check_all, mount_fstype
from fusefs.readiness import ReplyReader
from fusefs.units import parse_mib
from qcow.errors import QcowError
from qcow.paths import absolute

START_TIMEOUT = 120.0  # seconds `qcowfs mount` waits for the daemon to be ready
REAP_TIMEOUT = 10.0  # seconds a daemon that failed to start gets to exit


class MountConfig:
    """Resolved options of one mount (absolute paths: the daemon runs in /)."""

    def __init__(self, args):
        self.image = absolute(args.image)
        self.mountpoint = os.path.realpath(args.mountpoint)
        self.read_only = bool(args.read_only)
        self.nonempty = bool(getattr(args, "nonempty", False))
        self.force = bool(getattr(args, "force", False))
        self.name = _file_name(args.name)
        self.allow_other = bool(args.allow_other)
        self.cache_mib = parse_mib(args.cache_mib)
        self.no_resume = bool(getattr(args, "no_resume", False))
        self.socket = os.path.abspath(
            args.control_socket or mountrecord.default_socket_path(self.mountpoint)
        )
        self.log_file = os.path.abspath(
            getattr(args, "log_file", None) or default_log_path(self.socket)
        )
        self.pid_file = pid_file_path(self.socket)

    def daemon_argv(self):
        """The command line that runs this daemon in the foreground, every option given
        (what the daemon shows as its own: fusefs.proctitle)."""
        argv = [sys.executable, "-m", "fusefs", "mount", self.image, self.mountpoint]
        argv += ["--foreground", "--name", self.name, "--control-socket", self.socket]
        argv += ["--cache-mib", str(self.cache_mib), "--log-file", self.log_file]
        flags = {
            "--read-only": self.read_only,
            "--allow-other": self.allow_other,
            "--no-resume": self.no_resume,
            "--nonempty": self.nonempty,
            "--force": self.force,
        }
        return argv + [flag for flag, on in flags.items() if on]


def _file_name(name):
    """--name: the flat file's name in the mount's one directory."""
    if name in ("", ".", "..") or "/" in name or "\0" in name or len(os.fsencode(name)) > 255:
        raise QcowError(
            None, f"--name {name!r}: must be a plain file name (not empty, '.' or '..', no '/')"
        )
    return name


def cmd_mount(args):
    cfg = MountConfig(args)
    if args.foreground:
        from fusefs.daemon import run_daemon

        return run_daemon(cfg)
    check_all(cfg)
    return spawn_daemon(cfg)


def spawn_daemon(cfg):
    mountrecord.ensure_private_dir(mountrecord.runtime_dir())
    os.makedirs(os.path.dirname(cfg.socket), mode=0o700, exist_ok=True)
    os.makedirs(os.path.dirname(cfg.log_file), mode=0o700, exist_ok=True)
    logfd = open_log(cfg.log_file)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _daemon_child(cfg, w, logfd)  # never returns
    os.close(logfd)
    os.close(w)
    try:
        line = _first_answer(ReplyReader(r, START_TIMEOUT))
    except BaseException:  # e.g. Ctrl-C while waiting: take the daemon along
        _signal(pid, signal.SIGTERM)
        _reap(pid, cfg)
        raise
    finally:
        os.close(r)
    if line.startswith("READY"):
        # The daemon owns the mount now and this process holds nothing to release:
        # leave without the interpreter's teardown, which would only keep the caller
        # waiting (tens of ms with the image code loaded).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    rc = _reap(pid, cfg)
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


def _first_answer(reader):
    """The daemon's first line other than a NOTE (NOTEs go to the user as they come)."""
    line = reader.line()
    while line.startswith("NOTE "):  # a line for the user (a resumed commit)
        print(f"qcowfs: {line[5:]}", file=sys.stderr)
        line = reader.line()
    return line


def _daemon_child(cfg, ready_fd, logfd):
    """The forked child: become the daemon, then leave without running any of the
    command's code (no return, no atexit handler of the parent's)."""
    rc = 1
    try:
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        # nothing else of the caller's: a pipe it waits on must not stay open for the
        # daemon's lifetime
        os.closerange(3, ready_fd)
        os.closerange(ready_fd + 1, os.sysconf("SC_OPEN_MAX"))
        from fusefs.daemon import run_daemon

        rc = run_daemon(cfg, ready_fd)
    except QcowError as e:  # logged and sent up the pipe already
        print(f"qcowfs: {e}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()  # to the log
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(rc)


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap(pid, cfg):
    """A daemon that failed to start: wait for it (or kill it) and clear any mount it
    left behind. Returns its exit status (minus the signal that killed it)."""
    if not wait_exit(pid, REAP_TIMEOUT):
        _signal(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if mount_fstype(cfg.mountpoint) == FSTYPE:
        import subprocess  # here: only a failed start needs it

        subprocess.run(
            ["fusermount3", "-u", "-z", cfg.mountpoint],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return os.waitstatus_to_exitcode(status)
