"""Operating a mount safely, through the real CLI and mount:

- every MOUNTPOINT command finds the mount's control socket by itself (relative and
  symlinked paths too), whatever --control-socket the mount used; a daemon is called
  gone only with proof;
- `unmount` refuses while the flat file is open (a process, a loop device), naming the
  holders; --lazy detaches as `umount -l`, and the daemon finishes cleanly afterwards;
- a --read-only mount refuses commits (CLI and QMP) and changes no image;
- images a commit dropped or pivoted away from are leftovers: `mount` (and a writable
  open_chain) refuse them unless --force, `info` shows the mark, QEMU still accepts them;
- `commit --wait` and `unmount` say which image serves the disk now.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from mount_fixtures import (
    M,
    check_clean,
    daemons_for,
    make_chain,
    make_chain3,
    read_file,
    wait_until,
)  # noqa: F401 (mounter)
from qemu_helpers import convert_raw, qemu_check, qemu_img, qemu_info_chain, run_qcowfs, sha256_tree

import qcow
from fusefs.mountrecord import read_record
from qcow.errors import ChainError


def qcowfs_in(cwd, *args):
    """The CLI run from `cwd` (relative mountpoints are relative to it)."""
    return subprocess.run(
        [sys.executable, "-m", "fusefs", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(cp, *words):
    assert cp.returncode != 0, (cp.stdout, cp.stderr)
    assert cp.stderr.startswith("qcowfs: ") and cp.stderr.count("\n") == 1, cp.stderr
    assert "Traceback" not in cp.stderr
    for w in words:
        assert str(w) in cp.stderr, (w, cp.stderr)


# ---- 1. the control socket is always found ------------------------------------------


def test_commands_find_a_custom_socket_by_mountpoint(tmp_path, mounter):
    """Mounted with --control-socket; jobs, commit and unmount without it, through a
    relative path and through a symlink."""
    top = make_chain3(tmp_path)
    m = mounter(top)  # --control-socket tmp/ctl1.sock
    rec = read_record(os.path.realpath(m.mountpoint))
    assert rec and rec["socket"] == str(m.socket) and rec["pid"] == m.daemon_pid()
    link = tmp_path / "link"
    link.symlink_to(m.mountpoint)
    expected = convert_raw(top, share=True)

    cp = qcowfs_in(tmp_path, "jobs", m.mountpoint.name)
    assert cp.returncode == 0 and cp.stdout == "No jobs.\n", cp
    cp = qcowfs_in(tmp_path, "commit", "link", "--wait")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("Commit complete: link serves "), cp.stdout
    assert cp.stdout.rstrip().endswith("base.qcow2 <- " + top), cp.stdout
    assert read_file(m.disk) == expected
    cp = qcowfs_in(tmp_path, "unmount", m.mountpoint.name)
    assert cp.returncode == 0, cp.stderr
    assert not m.is_mounted() and not daemons_for(m.mountpoint)
    assert read_record(os.path.realpath(m.mountpoint)) is None
    check_clean(top)
    assert convert_raw(top) == expected


def test_unmount_without_proof_leaves_a_live_mount(tmp_path, mounter):
    """Its socket moved away, its record and pid file gone: the daemon still serves, so
    `unmount` must not call it dead and detach it; the right --control-socket works."""
    top = make_chain(tmp_path)
    m = mounter(top)
    moved = tmp_path / "moved.sock"
    os.rename(m.socket, moved)
    os.unlink(m.pid_file)
    from fusefs.mountrecord import remove_record

    remove_record(os.path.realpath(m.mountpoint))
    cp = run_qcowfs("unmount", m.mountpoint)
    one_line_error(cp, m.mountpoint, "does not answer", "--control-socket")
    assert m.is_mounted()
    assert read_file(m.disk)[:M] == convert_raw(top, share=True)[:M]
    cp = run_qcowfs("unmount", m.mountpoint, "--control-socket", moved)
    assert cp.returncode == 0, cp.stderr
    assert not m.is_mounted()
    check_clean(top)


@pytest.mark.parametrize("proof", ["record", "fuse"])
def test_unmount_after_kill_9_proves_death(tmp_path, mounter, proof):
    """The daemon is called gone by its record's dead pid, or without a record by
    the aborted FUSE connection."""
    top = make_chain(tmp_path)
    m = mounter(top)
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not daemons_for(m.mountpoint), 30, "daemon death")
    if proof == "fuse":
        from fusefs.mountrecord import remove_record

        remove_record(os.path.realpath(m.mountpoint))
    cp = run_qcowfs("unmount", m.mountpoint)  # no --control-socket
    why = f"pid {pid} has exited" if proof == "record" else "FUSE connection is aborted"
    one_line_error(cp, "daemon was gone", why, "check --repair")
    assert not m.is_mounted()


# ---- 2. unmount does not pull the disk from under a user ----------------------------


def test_unmount_refuses_while_open_and_lazy_detaches(tmp_path, mounter):
    top = make_chain(tmp_path)
    m = mounter(top)
    expected = convert_raw(top, share=True)
    with open(m.disk, "rb") as disk:
        holder = subprocess.Popen(["sleep", "600"], stdin=disk)
    try:
        cp = run_qcowfs("unmount", m.mountpoint)
        one_line_error(cp, "busy", "1 open", f"pid {holder.pid} (sleep)", "--lazy")
        assert m.is_mounted() and m.disk.stat().st_size == len(expected)

        loop = subprocess.run(
            ["losetup", "-f", "--show", "-r", str(m.disk)], capture_output=True, text=True
        )
        if loop.returncode == 0:  # where loop devices exist
            dev = loop.stdout.strip()
            try:
                cp = run_qcowfs("unmount", m.mountpoint)
                one_line_error(cp, "busy", "2 opens", f"{dev} (loop device)")
            finally:
                subprocess.run(["losetup", "-d", dev])

        cp = run_qcowfs("unmount", m.mountpoint, "--lazy")
        assert cp.returncode == 0, cp.stderr
        assert "detached lazily" in cp.stdout and f"pid {holder.pid}" in cp.stdout
        assert not m.is_mounted()
        # the holder still reads the disk through its open file
        with open(f"/proc/{holder.pid}/fd/0", "rb") as f:
            assert f.read(M) == expected[:M]
        assert daemons_for(m.mountpoint), "the daemon left while a file was open"
        cp = run_qcowfs("unmount", m.mountpoint)
        one_line_error(cp, "already detached lazily")
    finally:
        holder.kill()
        holder.wait()
    wait_until(lambda: not daemons_for(m.mountpoint), 60, "the daemon to finish")
    assert "chain flushed and closed" in m.log() and "exit 0" in m.log()
    check_clean(top)
    assert convert_raw(top) == expected


# ---- 3. a read-only mount changes no image ------------------------------------------


def test_read_only_mount_refuses_commit(tmp_path, mounter):
    top = make_chain3(tmp_path)
    before = sha256_tree(tmp_path / "images")
    m = mounter(top, "--read-only")
    cp = run_qcowfs("commit", m.mountpoint, "--wait")
    one_line_error(cp, m.mountpoint, "read-only mount")
    cp = run_qcowfs("commit", m.mountpoint, "--active", "--pivot")
    one_line_error(cp, "read-only mount")
    from fusefs.qmp import QMPCallError, QMPConnection

    with QMPConnection(str(m.socket)) as conn:
        with pytest.raises(QMPCallError) as err:
            conn.execute("block-commit", {"job-id": "j", "top": "mid.qcow2"})
        assert err.value.error_class == "GenericError"
        assert "read-only mount" in err.value.desc
        assert conn.execute("query-block-jobs") == []
    m.unmount()
    assert sha256_tree(tmp_path / "images") == before


# ---- 4. stale images are not mounted silently ----------------------------------------


def _two(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    base, top = d / "base.qcow2", d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, str(8 * M))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    return str(base), str(top)


def test_pivot_marks_old_active_a_leftover(tmp_path, mounter):
    base, top = _two(tmp_path)
    m = mounter(top)
    with open(m.disk, "r+b") as f:
        f.write(b"\x11" * M)
        f.flush()
        os.fsync(f.fileno())
    cp = run_qcowfs("commit", m.mountpoint, "--active", "--pivot")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"Pivoted: {m.mountpoint} serves {base}\n"
    with open(m.disk, "r+b") as f:  # after the pivot: lands in base only
        f.write(b"\x22" * M)
        f.flush()
        os.fsync(f.fileno())
    expected = read_file(m.disk)
    cp = run_qcowfs("unmount", m.mountpoint)
    assert cp.returncode == 0, cp.stderr
    assert f"the disk is now {base}" in cp.stdout and top in cp.stdout, cp.stdout
    assert convert_raw(base) == expected

    # QEMU still accepts the marked image
    rc, rep = qemu_check(top)
    assert rc == 0 and not rep.get("corruptions") and not rep.get("leaks"), rep
    assert qemu_info_chain(top)[0]["backing-filename"] == "base.qcow2"
    # info shows the mark
    cp = run_qcowfs("info", top)
    assert f"leftover: yes, a commit put its data into {base}" in cp.stdout, cp.stdout
    cp = run_qcowfs("info", "--json", top)
    import json

    assert json.loads(cp.stdout)[0]["x-leftover-committed-into"] == base

    before = sha256_tree(tmp_path / "images")
    _, cp = mounter.attempt(top)
    one_line_error(cp, top, f"leftover of a commit into {base}", "--force")
    _, cp = mounter.attempt(top, "--read-only")
    one_line_error(cp, top, "leftover")
    assert sha256_tree(tmp_path / "images") == before
    with pytest.raises(ChainError, match="leftover"):
        qcow.open_chain(top, writable=True)
    forced = mounter(top, "--force", "--read-only")
    assert read_file(forced.disk)[:M] == b"\x11" * M != expected[:M]  # stale indeed
    forced.unmount()
    assert sha256_tree(tmp_path / "images") == before


def test_dropped_image_is_refused_but_an_unfinished_drop_mounts(tmp_path, mounter):
    """mid dropped by a finished commit is refused; a chain whose commit marked mid and
    stopped before rewriting top's header (a crash) still mounts and reads right."""
    top = make_chain3(tmp_path)
    d = tmp_path / "images"
    mid, base = str(d / "mid.qcow2"), str(d / "base.qcow2")
    spare = tmp_path / "spare"
    shutil.copytree(d, spare)
    m = mounter(top)
    assert run_qcowfs("commit", m.mountpoint, "--wait", "--quiet").stdout == ""
    m.unmount()
    _, cp = mounter.attempt(mid)
    one_line_error(cp, mid, f"leftover of a commit into {base}")

    # the crash window of a commit: base holds mid's data, mid is marked, top still
    # names mid
    s_top, s_mid, s_base = (str(spare / n) for n in ("top.qcow2", "mid.qcow2", "base.qcow2"))
    expected = convert_raw(s_top)
    qemu_img("commit", "-q", "-d", s_mid)
    from qcow.image import Qcow2Image

    img = Qcow2Image(s_mid, writable=True)
    img.mark_drained(s_base)
    img.close()
    m2 = mounter(s_top)
    assert read_file(m2.disk) == expected
    m2.unmount()


# ---- 5. say what happened -----------------------------------------------------------


def test_commit_wait_names_the_chain_and_quiet_silences_it(tmp_path, mounter):
    top = make_chain3(tmp_path)
    d = tmp_path / "images"
    m = mounter(top)
    cp = run_qcowfs("commit", m.mountpoint, "--wait")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"Commit complete: {m.mountpoint} serves {d / 'base.qcow2'} <- {top}\n"
    cp = run_qcowfs("commit", m.mountpoint, "--active", "--pivot", "--quiet")
    assert cp.returncode == 0 and cp.stdout == "", cp
    m.unmount()


def test_offline_command_on_a_mounted_image_names_the_mount(tmp_path, mounter):
    """The usual slip: an offline command given the active image of a mounted chain.
    It is refused on the image lock, in one line that says where the chain is mounted
    (and for commit how to run it live); no image changes and the mount serves on."""
    top = make_chain3(tmp_path)
    m = mounter(top)
    mountpoint = os.path.realpath(m.mountpoint)
    images = sorted((tmp_path / "images").glob("*.qcow2"))
    before = {p: p.read_bytes() for p in images}
    expected = read_file(m.disk)
    one_line_error(
        run_qcowfs("commit", top), top, "lock", f"'qcowfs commit {mountpoint}' runs it live"
    )
    one_line_error(run_qcowfs("check", "--repair", top), top, f"mounted at {mountpoint}")
    other = tmp_path / "other"
    other.mkdir()
    one_line_error(run_qcowfs("mount", top, other), top, f"mounted at {mountpoint}")
    assert not os.path.ismount(other)
    assert {p: p.read_bytes() for p in images} == before
    assert read_file(m.disk) == expected
    m.unmount()
    check_clean(top)
