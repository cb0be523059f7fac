"""The control socket of a real mount, driven by the real `qemu.qmp` client:
query-named-block-nodes, CommandNotFound, live and active commits with QEMU's event
order, quit (with and without a running job), and the default socket path.

Every mount is torn down by its fixture (`fusermount3 -u -z` as the last resort)."""

import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest
from qemu_helpers import convert_raw, qemu_check, qemu_img, qemu_info_chain, qemu_io, run_qcowfs
from test_qmp_support import (
    END_CANCELLED,
    END_COMPLETED,
    READY,
    START,
    events_until,
    qmp_session,
    status_null,
    summarize,
)

from fusefs.qmp import default_socket_path
from qcow.mountinfo import mount_at

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3",
)


def mounted(path):
    return mount_at(os.path.realpath(path)) is not None


@pytest.fixture
def chain(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    base, mid, top = (str(d / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    qemu_img("create", "-f", "qcow2", base, str(8 * MiB))
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io(base, "write -P 0x11 0 8M")
    qemu_io(mid, "write -P 0x22 1M 3M")
    qemu_io(top, "write -P 0x33 3M 2M")
    return {"base": base, "mid": mid, "top": top}


class Mount:
    def __init__(self, tmp_path, chain, socket=True):
        self.chain = chain
        self.mnt = str(tmp_path / "mnt")
        os.mkdir(self.mnt)
        self.sock = str(tmp_path / "ctl.sock") if socket else default_socket_path(self.mnt)
        self.explicit = socket

    def sock_args(self):
        return ["--control-socket", self.sock] if self.explicit else []

    def mount(self):
        r = run_qcowfs("mount", self.chain["top"], self.mnt, *self.sock_args())
        assert r.returncode == 0, r.stderr
        assert mounted(self.mnt)

    def flat(self):
        with open(os.path.join(self.mnt, "disk.raw"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def teardown(self):
        if mounted(self.mnt):
            run_qcowfs("unmount", self.mnt, "--cancel-jobs", *self.sock_args())
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], check=False)
        deadline = time.monotonic() + 30
        while os.path.exists(self.sock) and time.monotonic() < deadline:
            time.sleep(0.05)  # the daemon removes its socket when it exits


@pytest.fixture
def mount(tmp_path, chain):
    m = Mount(tmp_path, chain)
    try:
        m.mount()
        yield m
    finally:
        m.teardown()


def qmp(m, body):
    return qmp_session(m.sock, body, timeout=60)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_control_socket_on_a_real_mount(mount):
    from qemu.qmp import ExecuteError

    async def body(q):
        assert q.greeting.QMP.version["package"].startswith("qcowfs")
        assert q.greeting.QMP.capabilities == []
        nodes = await q.execute("query-named-block-nodes")
        assert [n["file"] for n in nodes] == [
            os.path.realpath(mount.chain[k]) for k in ("top", "mid", "base")
        ]
        assert all(n["format"] == "qcow2" and n["virtual-size"] == 8 * MiB for n in nodes)
        assert len({n["node-name"] for n in nodes}) == 3
        with pytest.raises(ExecuteError) as e:
            await q.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        assert await q.execute("query-block-jobs") == []
        with pytest.raises(ExecuteError) as e:
            await q.execute("block-job-cancel", {"device": "nope"})
        assert e.value.error_class == "DeviceNotActive"
        return True

    assert qmp(mount, body)


def test_live_commit_over_qmp(mount):
    before = convert_raw(mount.chain["top"], share=True)
    assert mount.flat() == sha(before)

    async def body(q):
        nodes = await q.execute("query-named-block-nodes")
        await q.execute(
            "block-commit",
            {
                "job-id": "c1",
                "device": nodes[0]["node-name"],
                "top-node": nodes[1]["node-name"],
                "speed": 64 * MiB,
            },
        )
        evs = await events_until(q, status_null("c1"))
        assert summarize(evs) == START + END_COMPLETED
        done = [e for e in evs if e["event"] == "BLOCK_JOB_COMPLETED"][0]["data"]
        assert "error" not in done and done["device"] == "c1" and done["type"] == "commit"
        assert done["offset"] == done["len"] > 0
        after = await q.execute("query-named-block-nodes")
        assert [n["file"] for n in after] == [
            os.path.realpath(mount.chain[k]) for k in ("top", "base")
        ]
        return True

    assert qmp(mount, body)
    assert mount.flat() == sha(before)
    r = run_qcowfs("unmount", mount.mnt, "--control-socket", mount.sock)
    assert r.returncode == 0, r.stderr
    chain = qemu_info_chain(mount.chain["top"])
    assert [os.path.basename(c["filename"]) for c in chain] == ["top.qcow2", "base.qcow2"]
    assert sha(convert_raw(mount.chain["top"])) == sha(before)
    for img in (mount.chain["top"], mount.chain["base"]):
        rc, report = qemu_check(img)
        assert rc == 0, report


def test_active_commit_and_pivot_over_qmp(mount):
    before = convert_raw(mount.chain["top"], share=True)

    async def body(q):
        await q.execute("block-commit", {"job-id": "a1", "top": mount.chain["top"]})
        evs = await events_until(q, lambda e: e["event"] == "BLOCK_JOB_READY", timeout=60)
        assert summarize(evs) == START + READY
        j = (await q.execute("query-block-jobs"))[0]
        assert (j["device"], j["status"], j["ready"]) == ("a1", "ready", True)
        await q.execute("block-job-complete", {"device": "a1"})
        evs = await events_until(q, status_null("a1"), timeout=60)
        assert summarize(evs) == END_COMPLETED
        nodes = await q.execute("query-named-block-nodes")
        assert [n["file"] for n in nodes] == [os.path.realpath(mount.chain["base"])]
        return True

    assert qmp(mount, body)
    assert mount.flat() == sha(before)
    r = run_qcowfs("unmount", mount.mnt, "--control-socket", mount.sock)
    assert r.returncode == 0, r.stderr
    assert sha(convert_raw(mount.chain["base"])) == sha(before)
    rc, report = qemu_check(mount.chain["base"])
    assert rc == 0, report


def test_quit_unmounts_cleanly(mount):
    async def body(q):
        assert await q.execute("quit") == {}
        evs = await events_until(q, lambda e: e["event"] == "SHUTDOWN", timeout=60)
        assert evs[-1]["data"] == {"guest": False, "reason": "host-qmp-quit"}
        return True

    assert qmp(mount, body)
    deadline = time.monotonic() + 30
    while (mounted(mount.mnt) or os.path.exists(mount.sock)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounted(mount.mnt) and not os.path.exists(mount.sock)
    for img in mount.chain.values():
        qemu_img("info", img)  # no -U: every lock was released
        rc, report = qemu_check(img)
        assert rc == 0, report


def test_quit_cancels_a_running_job_first(mount):
    before = convert_raw(mount.chain["top"], share=True)

    async def body(q):
        await q.execute(
            "block-commit", {"job-id": "slow", "top": mount.chain["mid"], "speed": 64 * 1024}
        )
        await events_until(
            q, lambda e: e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "running"
        )
        await q.execute("quit")
        evs = await events_until(q, lambda e: e["event"] == "SHUTDOWN", timeout=60)
        names = summarize(evs)
        assert names.index("BLOCK_JOB_CANCELLED") < names.index("SHUTDOWN")
        assert names[-5:] == [*END_CANCELLED, "SHUTDOWN"]
        return True

    assert qmp(mount, body)
    deadline = time.monotonic() + 30
    while mounted(mount.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounted(mount.mnt)
    chain = qemu_info_chain(mount.chain["top"])
    assert [os.path.basename(c["filename"]) for c in chain] == [
        "top.qcow2",
        "mid.qcow2",
        "base.qcow2",
    ]
    assert sha(convert_raw(mount.chain["top"])) == sha(before)


def test_cli_finds_the_default_socket(tmp_path, chain):
    m = Mount(tmp_path, chain, socket=False)
    try:
        m.mount()
        assert os.path.exists(default_socket_path(m.mnt))
        r = run_qcowfs("jobs", m.mnt, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []
        r = run_qcowfs("commit", m.mnt, "--wait")
        assert r.returncode == 0, r.stderr
        r = run_qcowfs("unmount", m.mnt)
        assert r.returncode == 0, r.stderr
        assert not mounted(m.mnt) and not os.path.exists(default_socket_path(m.mnt))
    finally:
        m.teardown()
    chain_info = qemu_info_chain(chain["top"])
    assert [os.path.basename(c["filename"]) for c in chain_info] == ["top.qcow2", "base.qcow2"]
