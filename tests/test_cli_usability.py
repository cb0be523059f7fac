"""The CLI people expect, through the real CLI (and mount where it takes one):
sizes with units and `set-speed`, help and `--version`, offline `commit --active`,
`wait`, `check --output=json` / `-r` with qemu-img's counts, closed pipes, and one-line
errors for common mistakes.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from mount_fixtures import M, check_clean, make_chain3, wait_until
from qemu_helpers import (
    MATRIX_CASES,
    REPO_ROOT,
    apply_ops,
    build_case,
    convert_raw,
    create,
    qemu_check,
    qemu_info_chain,
    run_qcowfs,
    sha256_tree,
)
from test_check import leaky_image, set_refcount16

from fusefs.cli import build_parser

K = 1 << 10


def one_line_error(cp, *words):
    assert cp.returncode != 0, (cp.stdout, cp.stderr)
    assert cp.stderr.startswith("qcowfs: ") and cp.stderr.count("\n") == 1, cp.stderr
    for w in words:
        assert str(w) in cp.stderr, (w, cp.stderr)


def job(m, job_id="commit"):
    cp = run_qcowfs("jobs", m.mountpoint, "--json")
    assert cp.returncode == 0, cp.stderr
    return next((j for j in json.loads(cp.stdout) if j["device"] == job_id), None)


def _slow_commit(m, speed="64K"):
    cp = run_qcowfs("commit", m.mountpoint, "--speed", speed)
    assert cp.returncode == 0 and cp.stdout == "commit\n", cp
    return cp


# ---- sizes in units, set-speed, wait ----------------------------------------------------


def test_speed_units_set_speed_and_wait(tmp_path, mounter):
    top = make_chain3(tmp_path)
    m = mounter(top)
    cp = _slow_commit(m, "512K")
    assert cp.stderr == ""
    assert job(m)["speed"] == 512 * K
    cp = run_qcowfs("set-speed", m.mountpoint, "commit", "256K")
    assert cp.returncode == 0, cp.stderr
    assert job(m)["speed"] == 256 * K
    waiter = Waiter(m)  # the only job
    try:
        cp = run_qcowfs("set-speed", m.mountpoint, "commit", "1G")
        assert cp.returncode == 0, cp.stderr
        out = waiter.finish()
    finally:
        waiter.close()
    assert waiter.proc.returncode == 0, waiter.seen
    assert out.startswith(f"Commit complete: {m.mountpoint} serves "), out
    assert job(m) is None
    cp = run_qcowfs("wait", m.mountpoint)
    one_line_error(cp, m.mountpoint, "no job is running")
    m.unmount()
    check_clean(top)


def test_top_naming_the_active_image_needs_active(tmp_path, mounter):
    top = make_chain3(tmp_path)
    m = mounter(top)
    for name in (top, "node0"):
        cp = run_qcowfs("commit", m.mountpoint, "--top", name)
        one_line_error(cp, name, "is the active image", "add --active")
    assert job(m) is None
    m.unmount()
    check_clean(top)


def test_bare_small_speed_warns(tmp_path, mounter):
    m = mounter(make_chain3(tmp_path))
    cp = _slow_commit(m, "10")
    assert cp.stderr.count("\n") == 1 and "warning: --speed 10 means 10 bytes/s" in cp.stderr
    assert job(m)["speed"] == 10
    cp = run_qcowfs("set-speed", m.mountpoint, "commit", "10x")
    one_line_error(cp, "RATE 10x", "512K")
    cp = run_qcowfs("cancel", m.mountpoint, "commit")
    assert cp.returncode == 0, cp.stderr
    cp = run_qcowfs("commit", m.mountpoint, "--speed", "fast")
    one_line_error(cp, "--speed fast")
    cp = run_qcowfs("commit", m.mountpoint, "--speed", str(1 << 63))  # past QMP's int64
    one_line_error(cp, f"--speed {1 << 63}", "too large")
    cp = _slow_commit(m, "1b")  # the suggestion is one the parser takes
    assert "means 1 bytes/s (add a unit for more: 1K, 1M)" in cp.stderr, cp.stderr
    assert run_qcowfs("cancel", m.mountpoint, "commit").returncode == 0
    m.unmount()


def test_wait_ctrl_c_detaches_and_keeps_the_job(tmp_path, mounter):
    """`wait` on a terminal shows the progress bar; Ctrl-C leaves the job running."""
    m = mounter(make_chain3(tmp_path))
    _slow_commit(m, "64K")
    waiter = Waiter(m, "commit")
    try:
        waiter.proc.send_signal(signal.SIGINT)
        waiter.finish()
    finally:
        waiter.close()
    assert waiter.proc.returncode == 130
    assert b"detached; job 'commit' keeps running" in waiter.seen, waiter.seen
    info = job(m)
    assert info is not None and info["status"] in ("running", "paused"), info
    assert run_qcowfs("cancel", m.mountpoint, "commit").returncode == 0
    m.unmount()


class Waiter:
    """`qcowfs wait MNT [JOB]` with stderr on a terminal; returns once its progress bar
    shows (so it is attached)."""

    def __init__(self, m, *job_id):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.seen = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fusefs", "wait", str(m.mountpoint), *job_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        wait_until(lambda: self._read() and b"%" in self.seen, 60, "the progress bar")

    def _read(self):
        try:
            self.seen += os.read(self.master, 4096)
        except OSError:  # the other end closed
            return False
        return True

    def finish(self):
        out, _ = self.proc.communicate(timeout=120)
        while self._read():
            pass
        return out

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_cache_size_with_units(tmp_path, mounter):
    top = make_chain3(tmp_path)
    m = mounter(top, "--cache-mib", "64M")
    assert _daemon_cache_mib(m) == "64"
    m.unmount()
    _, cp = mounter.attempt(top, "--cache-mib", "lots")
    one_line_error(cp, "--cache-mib lots")


def _daemon_cache_mib(m):
    with open(f"/proc/{m.daemon_pid()}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0")]
    return argv[argv.index("--cache-mib") + 1]


# ---- help and version -----------------------------------------------------------------


def _subcommands():
    """{name: its argparse parser}, from the CLI's own parser."""
    return build_parser()._subparsers._group_actions[0].choices


def test_help_describes_every_command_and_option():
    cp = run_qcowfs("--help")
    assert cp.returncode == 0
    for name in _subcommands():
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", cp.stdout, re.M), name
    for name, sub in _subcommands().items():
        cp = run_qcowfs(name, "--help")
        assert cp.returncode == 0, name
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)
            assert action.help.split()[0] in cp.stdout, (name, action.dest)
        assert "`" not in cp.stdout, name  # no developer docstring


def test_readme_documents_every_option():
    readme = (REPO_ROOT / "README.md").read_text()
    for name, sub in _subcommands().items():
        assert f"qcowfs {name}" in readme, name
        for action in sub._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in readme, (name, opt)
    assert not re.search(r"\|[^|\n]*issue \d+", readme, re.I), "a table names an issue"


def test_version():
    from importlib.metadata import version

    cp = run_qcowfs("--version")
    assert cp.returncode == 0 and cp.stdout == f"qcowfs {version('qcowfs')}\n"


# ---- offline commit like qemu-img commit ----------------------------------------------


def test_offline_active_commit(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    base = create(str(d / "base.qcow2"), 4 * M)
    apply_ops(base, [("w", 0, 2 * M, 0x11)])
    top = create(str(d / "top.qcow2"), 4 * M, backing="base.qcow2")
    apply_ops(top, [("w", M, 2 * M, 0x22)])
    expected = convert_raw(top)

    before = sha256_tree(d)
    cp = run_qcowfs("commit", top)
    one_line_error(cp, "nothing below the active image to commit", "use --active")
    # --top naming the active image is an active commit: asked for by --active only, as
    # virsh blockcommit asks (a forgotten flag must not start another operation)
    cp = run_qcowfs("commit", top, "--top", top)
    one_line_error(cp, top, "is the active image", "add --active")
    assert sha256_tree(d) == before

    cp = run_qcowfs("commit", top, "--active")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"Image committed.\nPivoted: the disk is now {base}; {top} is a leftover\n"
    assert convert_raw(base) == expected
    for img in (base, top):
        rc, rep = qemu_check(img)
        assert rc == 0 and not rep.get("leaks"), rep
    assert qemu_info_chain(top)[0]["full-backing-filename"] == base
    cp = run_qcowfs("commit", top, "--active")
    one_line_error(cp, top, "leftover")


# ---- check like qemu-img --------------------------------------------------------------


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_check_json_equals_qemu_img(tmp_path, case):
    active = build_case(case, tmp_path / case)
    for layer in qemu_info_chain(active):
        if layer["format"] != "qcow2":
            continue
        path = layer["filename"]
        cp = run_qcowfs("check", "--output=json", path)
        rc, ref = qemu_check(path)
        assert cp.returncode == rc, cp.stderr
        assert json.loads(cp.stdout) == ref, path


def test_check_repair_alias_and_json(tmp_path):
    p, c = leaky_image(tmp_path)
    set_refcount16(p, c, 1)
    cp = run_qcowfs("check", "--output", "json", p)
    rc, ref = qemu_check(p)
    assert cp.returncode == rc == 3 and json.loads(cp.stdout) == ref
    q, r = str(tmp_path / "copy.qcow2"), str(tmp_path / "ref.qcow2")
    shutil.copy(p, q)
    shutil.copy(p, r)
    cp = run_qcowfs("check", "-r", "leaks", "--output=json", p)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert out["leaks-fixed"] == 1 and "leaks" not in out, out
    ref = subprocess.run(
        ["qemu-img", "check", "-r", "leaks", "--output=json", r], capture_output=True, text=True
    )
    ref = json.loads(ref.stdout)
    ref["filename"] = p
    assert ref == out
    cp = run_qcowfs("check", "-r", "all", q)
    assert cp.returncode == 0 and "1 leaked clusters" in cp.stdout
    assert qemu_check(q)[0] == 0


# ---- closed pipes ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", [("info",), ("map",), ("map", "--json")])
def test_closed_pipe_is_quiet(tmp_path, argv):
    top = make_chain3(tmp_path)
    r, w = os.pipe()
    os.close(r)
    try:
        cp = subprocess.run(
            [sys.executable, "-m", "fusefs", argv[0], top, *argv[1:]],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(w)
    assert cp.returncode == 0 and cp.stderr == "", cp.stderr


# ---- clear errors for common mistakes ------------------------------------------------


def test_nonempty_mountpoint(tmp_path, mounter):
    top = make_chain3(tmp_path)
    mnt = tmp_path / "full"
    mnt.mkdir()
    (mnt / "precious").write_text("x")
    _, cp = mounter.attempt(top, mountpoint=mnt)
    one_line_error(cp, mnt, "not empty", "--nonempty")
    m = mounter(top, "--nonempty", mountpoint=mnt)
    assert os.listdir(mnt) == ["disk.raw"]
    m.unmount()
    assert (mnt / "precious").read_text() == "x"


NOBODY = 65534


def _as_nobody(cwd, *args):
    """The CLI as an unprivileged user without XDG_RUNTIME_DIR (allowed to traverse
    into the root-only interpreter's directory, nothing more)."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            sys.executable,
            "-m",
            "fusefs",
            *map(str, args),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unprivileged_user_gets_own_runtime_dir_and_read_only_hint(tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is missing")
    d = tmp_path / "u"
    d.mkdir()
    (d / "mnt").mkdir()
    img = create(str(d / "root.qcow2"), 4 * M)  # root's: not writable by nobody
    os.chmod(tmp_path, 0o755)
    os.chown(d, NOBODY, NOBODY)
    os.chown(d / "mnt", NOBODY, NOBODY)
    before = sha256_tree(d)
    runtime = Path(f"/tmp/qcowfs-{NOBODY}")
    made = not runtime.exists()
    try:
        cp = _as_nobody(d, "jobs", "mnt")
        one_line_error(cp, f"{runtime}/")
        cp = _as_nobody(d, "mount", img, "mnt")
        one_line_error(cp, img, "Permission denied", "--read-only")
        assert "Errno" not in cp.stderr and "PermissionError" not in cp.stderr
        st = runtime.stat()
        assert st.st_uid == NOBODY and st.st_mode & 0o777 == 0o700
        assert sha256_tree(d) == before
    finally:
        for f in runtime.glob("*") if runtime.exists() else []:
            if f.name.startswith(_key(d / "mnt")):
                f.unlink()
        if made and runtime.exists() and not any(runtime.iterdir()):
            runtime.rmdir()


def _key(mnt):
    from fusefs.mountrecord import mount_key

    return mount_key(mnt)
