"""How a command starts: `qcowfs mount` forks its daemon from the command's own
interpreter (no second Python), and offline commands load neither trio, pyfuse3 nor the
QMP code."""

import os
import subprocess
import sys

import pytest
from mount_fixtures import check_clean, make_chain, make_chain3, read_file, wait_until
from qemu_helpers import convert_raw, qemu_info_chain

# what only a mount daemon or a live command needs
DAEMON_MODULES = ("trio", "pyfuse3", "fusefs.qmp", "fusefs.daemon", "fusefs.mountfs")


def _imported(*args):
    """(CompletedProcess, the modules it imported) of ``python -X importtime -m fusefs
    ARGS``."""
    cp = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fusefs", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    modules = set()
    for line in cp.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip())
    return cp, modules


def _daemon_modules(modules):
    return sorted(
        m for m in modules if any(m == d or m.startswith(d + ".") for d in DAEMON_MODULES)
    )


@pytest.mark.parametrize("command", ["info", "map", "check"])
def test_offline_image_commands_load_no_daemon_code(tmp_path, command):
    top = make_chain(tmp_path)
    target = top if command != "check" else str(tmp_path / "images" / "base.qcow2")
    cp, modules = _imported(command, target)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert "qcow.chain" in modules or "qcow.check" in modules  # the listing is real
    assert _daemon_modules(modules) == []


def test_offline_commit_loads_no_daemon_code(tmp_path):
    top = make_chain3(tmp_path)
    expected = convert_raw(top)
    cp, modules = _imported("commit", top)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert "commit.engine" in modules
    assert _daemon_modules(modules) == []
    # the commit happened: mid left the chain, the disk reads the same
    assert [os.path.basename(i["filename"]) for i in qemu_info_chain(top)] == [
        "top.qcow2",
        "base.qcow2",
    ]
    assert convert_raw(top) == expected
    check_clean(top)


# construct imports these when it loads, for features qcowfs never calls; the format
# layer defers them (qcow/construct_types.py): together ~30 ms of every command's start
DEFERRED_AT_START = ("pdb", "inspect", "pickle", "hashlib")


@pytest.mark.parametrize("command", ["info", "commit"])
def test_offline_commands_load_none_of_what_construct_defers(tmp_path, command):
    top = make_chain3(tmp_path)
    cp, modules = _imported(command, top)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert "construct.core" in modules  # the headers were parsed with it
    assert sorted(modules & set(DEFERRED_AT_START)) == []


def test_what_construct_defers_still_works_when_used():
    """The stand-ins import the real module on first use, and leave no trace in
    sys.modules: a later `import pickle` gets the real one."""
    code = """
import sys, qcow, construct
assert not set(sys.modules) & set(sys.argv[1:]), sorted(sys.modules)
assert construct.Pickled.parse(construct.Pickled.build([1, "x"])) == [1, "x"]
assert construct.Struct("a" / construct.Int8ub).compile().parse(b"\\x07").a == 7
import pickle, inspect
assert pickle is sys.modules["pickle"] and inspect.isfunction(qcow.open_chain)
import construct.debug
assert construct.debug.pdb.post_mortem is sys.modules["pdb"].post_mortem
"""
    cp = subprocess.run(
        [sys.executable, "-c", code, *DEFERRED_AT_START], capture_output=True, text=True
    )
    assert cp.returncode == 0, cp.stderr[-2000:]


def _proc(pid, name):
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def test_daemon_is_a_fork_of_the_command(tmp_path, mounter):
    """The daemon shares the command's auxiliary vector: the kernel writes a new one on
    every exec, so only a fork (no second interpreter started) keeps it."""
    top = make_chain(tmp_path)
    m = mounter._new(top, None, "disk.raw")
    cmd = subprocess.Popen(
        [sys.executable, "-m", "fusefs", "mount", top, str(m.mountpoint)]
        + ["--control-socket", str(m.socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Popen may return before exec has laid out the new process; the kernel records the
    # auxv before the command line, so once the command line reads, the auxv is whole
    wait_until(lambda: _proc(cmd.pid, "cmdline"), 10, "the command's exec")
    command_auxv = _proc(cmd.pid, "auxv")
    command_exe = os.readlink(f"/proc/{cmd.pid}/exe")
    out, err = cmd.communicate(timeout=120)
    assert cmd.returncode == 0, (err, m.log())
    pid = m.daemon_pid()
    assert pid != cmd.pid
    assert _proc(pid, "auxv") == command_auxv
    assert os.readlink(f"/proc/{pid}/exe") == command_exe
    # it shows its resolved command line, which `qcowfs unmount` trusts
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"--foreground" in argv and os.fsencode(m.mountpoint) in argv
    assert read_file(m.disk) == convert_raw(top, share=True)
    m.unmount()


def test_daemon_keeps_none_of_the_callers_descriptors(tmp_path, mounter):
    """A pipe the caller handed down (as a shell or a test harness does) is closed in the
    daemon: whoever reads it to its end is not kept waiting for the mount's lifetime."""
    top = make_chain(tmp_path)
    r, w = os.pipe()
    try:
        m = mounter._new(top, None, "disk.raw")
        cp = subprocess.run(
            [sys.executable, "-m", "fusefs", "mount", top, str(m.mountpoint)]
            + ["--control-socket", str(m.socket)],
            capture_output=True,
            text=True,
            pass_fds=(w,),
            timeout=120,
        )
        assert cp.returncode == 0, (cp.stderr, m.log())
        os.close(w)
        w = None
        pid = m.daemon_pid()
        fds = os.listdir(f"/proc/{pid}/fd")
        assert fds  # the listing is real
        pipe = os.readlink(f"/proc/self/fd/{r}")
        held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
        assert pipe not in held
        assert os.read(r, 1) == b""  # end of file: no writer is left
        m.unmount()
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
