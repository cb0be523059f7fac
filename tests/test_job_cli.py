"""`qcowfs commit/jobs/cancel/pause/resume/complete` (fusefs/jobcmds.py) against a real
control socket with fake jobs, and the offline path against a stand-in engine."""

import json
import os
import sys

import pytest
from test_qmp_support import FakeJobs, MiB, Raw, ServerThread

from fusefs.cli import main as qcowfs_main


class Plan:
    """What the next job does; the recording factory applies it."""

    def __init__(self):
        self.steps = 4
        self.active = False
        self.fail_at = None
        self.work = 0.0
        self.received = []


@pytest.fixture
def chain(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    files = {}
    for name in ("base", "mid", "top", "active"):
        p = d / f"{name}.qcow2"
        p.write_bytes(b"QFI\xfb")
        files[name] = str(p)
    return files


@pytest.fixture
def env(tmp_path, chain):
    plan = Plan()
    fake = FakeJobs()
    nodes = [
        {"node-name": f"node{i}", "file": chain[n], "virtual-size": 64 * MiB, "format": "qcow2"}
        for i, n in enumerate(("active", "top", "mid", "base"))
    ]

    def factory(args):
        plan.received.append(dict(args))
        rest = {
            "job-id": args.get("job-id", "commit"),
            "x-steps": plan.steps,
            "x-active": plan.active,
            "x-work": plan.work,
        }
        if plan.fail_at is not None:
            rest["x-fail-at"] = plan.fail_at
        return fake.factory(rest)

    async def query_nodes(args):
        return nodes

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "ctl.sock"
    with ServerThread(sock, factory, {"query-named-block-nodes": query_nodes}) as st:
        yield type(
            "Env",
            (),
            {
                "plan": plan,
                "fake": fake,
                "mnt": str(mnt),
                "sock": str(sock),
                "server": st,
                "chain": chain,
            },
        )


def cli(*argv):
    return qcowfs_main([str(a) for a in argv])


def live(env, *argv):
    return cli("commit", env.mnt, "--control-socket", env.sock, *argv)


def wait_gone(env, job_id="commit"):
    import time

    deadline = time.monotonic() + 10
    while True:
        r = Raw(env.sock, negotiate=True)
        jobs = r.execute("query-block-jobs")["return"]
        r.close()
        if not any(j["device"] == job_id for j in jobs):
            return
        assert time.monotonic() < deadline
        time.sleep(0.02)


def wait_status(env, status, job_id="commit"):
    import time

    deadline = time.monotonic() + 10
    while True:
        r = Raw(env.sock, negotiate=True)
        jobs = r.execute("query-block-jobs")["return"]
        r.close()
        if any(j["device"] == job_id and j["status"] == status for j in jobs):
            return
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_commit_without_wait_prints_the_job_id(env, capsys):
    assert live(env) == 0
    out, err = capsys.readouterr()
    assert out == "commit\n" and err == ""
    args = env.plan.received[0]
    # CLI default: the active image's backing file (virsh), as a file name of the chain
    assert args == {"job-id": "commit", "device": "node0", "top": env.chain["top"]}
    wait_gone(env)


def test_commit_options_become_block_commit_arguments(env, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(env.chain["mid"]))
    guard = tmp_path / "guard"
    guard.mkdir()
    assert (
        live(
            env,
            "--top",
            "mid.qcow2",
            "--base",
            "node3",
            "--mode",
            "restartable",
            "--speed",
            64 * MiB,
            "--job-id",
            "c-1",
            "--delete",
            "--guard-dir",
            guard,
            "--force",
        )
        == 0
    )
    assert capsys.readouterr().out == "c-1\n"
    # speed is the job's (JobManager), not the factory's
    assert env.plan.received[-1] == {
        "job-id": "c-1",
        "device": "node0",
        "top": env.chain["mid"],
        "base": env.chain["base"],
        "x-mode": "restartable",
        "x-delete": True,
        "x-guard-dirs": [str(guard)],
        "x-force": True,
    }
    wait_gone(env, "c-1")
    # a name the CLI cannot place (e.g. as written in a header, from elsewhere) goes as is
    monkeypatch.chdir(tmp_path)
    assert live(env, "--top", "some/header-name.qcow2") == 0
    assert env.plan.received[-1]["top"] == "some/header-name.qcow2"
    wait_gone(env)


def test_commit_refusals(env, capsys, tmp_path):
    other = tmp_path / "other.qcow2"
    other.write_bytes(b"x")
    assert live(env, "--top", other) == 1
    assert "is not an image of the chain" in capsys.readouterr().err
    assert live(env, "--active", "--top", env.chain["mid"]) == 1
    assert "--active commits the active image" in capsys.readouterr().err
    assert live(env, "--pivot") == 1
    assert (
        capsys.readouterr().err
        == f"qcowfs: {env.mnt}: --pivot applies to an active commit: add --active\n"
    )
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    assert cli("commit", plain_dir) == 1
    assert "is a directory but not a mountpoint" in capsys.readouterr().err
    assert cli("commit", tmp_path / "missing") == 1
    assert "No such file or directory" in capsys.readouterr().err
    assert env.plan.received == []
    # the server's refusal comes back as one line
    assert live(env) == 0
    capsys.readouterr()
    env.plan.steps = 10_000
    env.plan.work = 0.01
    assert live(env, "--job-id", "second") == 0
    assert live(env, "--job-id", "third") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qcowfs: {env.mnt}: job '") and "already running on this chain" in err
    assert cli("cancel", env.mnt, "second", "--control-socket", env.sock) == 0


def test_commit_wait_success_and_failure(env, capsys):
    assert live(env, "--wait") == 0
    out, err = capsys.readouterr()
    assert err == ""  # no terminal: no progress bar
    assert out.startswith(f"Commit complete: {env.mnt} serves ")  # what serves the disk now
    assert env.fake.outcomes["commit"]["finished"]
    env.plan.fail_at = 1
    assert live(env, "--wait") == 1
    assert (
        capsys.readouterr().err == f"qcowfs: {env.mnt}: job 'commit' failed: Input/output error\n"
    )


def test_commit_wait_progress_bar_on_a_terminal(env, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    env.plan.steps = 8
    env.plan.work = 0.1
    assert live(env, "--wait") == 0
    err = capsys.readouterr().err
    assert "commit:" in err and "100%" in err and "8.00M" in err


def test_active_wait_stops_at_ready_then_complete(env, capsys):
    env.plan.active = True
    assert live(env, "--active", "--wait") == 0
    err = capsys.readouterr().err
    assert "is ready" in err and f"qcowfs complete {env.mnt} commit" in err
    assert env.plan.received[-1]["top"] == env.chain["active"]
    r = Raw(env.sock, negotiate=True)
    assert r.execute("query-block-jobs")["return"][0]["status"] == "ready"
    r.close()
    assert cli("complete", env.mnt, "commit", "--control-socket", env.sock) == 0
    assert env.fake.outcomes["commit"]["decision"] == "complete"
    wait_gone(env)


def test_active_pivot(env, capsys):
    env.plan.active = True
    assert live(env, "--active", "--pivot") == 0  # --pivot implies --wait
    assert env.fake.outcomes["commit"]["decision"] == "complete"
    assert capsys.readouterr().err == ""


def test_cancel_of_a_ready_active_commit_keeps_the_overlay(env, capsys):
    env.plan.active = True
    assert live(env, "--active", "--wait") == 0
    assert cli("cancel", env.mnt, "commit", "--control-socket", env.sock) == 0
    assert env.fake.outcomes["commit"]["decision"] == "cancel"  # soft: no pivot, COMPLETED


def test_jobs_listing_and_verbs(env, capsys):
    assert cli("jobs", env.mnt, "--control-socket", env.sock) == 0
    assert capsys.readouterr().out == "No jobs.\n"
    assert cli("jobs", env.mnt, "--json", "--control-socket", env.sock) == 0
    assert json.loads(capsys.readouterr().out) == []
    env.plan.steps = 100_000
    env.plan.work = 0.01
    assert live(env, "--speed", 4 * MiB) == 0
    capsys.readouterr()
    assert cli("pause", env.mnt, "commit", "--control-socket", env.sock) == 0
    wait_status(env, "paused")  # a busy job parks at its next checkpoint
    assert cli("jobs", env.mnt, "--json", "--control-socket", env.sock) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert len(jobs) == 1 and jobs[0]["device"] == "commit" and jobs[0]["paused"] is True
    assert jobs[0]["status"] == "paused" and jobs[0]["speed"] == 4 * MiB
    assert cli("jobs", env.mnt, "--control-socket", env.sock) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "TYPE", "STATUS", "PROGRESS", "SPEED"]
    assert table[1].split()[:3] == ["commit", "commit", "paused"] and table[1].endswith("4.0 MiB/s")
    assert cli("pause", env.mnt, "commit", "--control-socket", env.sock) == 1
    assert capsys.readouterr().err == f"qcowfs: {env.mnt}: Job is already paused\n"
    assert cli("resume", env.mnt, "commit", "--control-socket", env.sock) == 0
    assert cli("pause", env.mnt, "commit", "--control-socket", env.sock) == 0
    # a paused job cannot be soft-cancelled in QEMU: the CLI forces it, and waits for the end
    assert cli("cancel", env.mnt, "commit", "--control-socket", env.sock) == 0
    assert env.fake.outcomes["commit"]["cancelled"]
    assert cli("jobs", env.mnt, "--control-socket", env.sock) == 0
    assert capsys.readouterr().out.endswith("No jobs.\n")
    for verb in ("cancel", "pause", "resume", "complete"):
        assert cli(verb, env.mnt, "nope", "--control-socket", env.sock) == 1
        assert capsys.readouterr().err == f"qcowfs: {env.mnt}: Block job 'nope' not found\n"


def test_complete_of_a_non_ready_job_is_refused(env, capsys):
    env.plan.steps = 100_000
    env.plan.work = 0.01
    assert live(env) == 0
    assert cli("complete", env.mnt, "commit", "--control-socket", env.sock) == 1
    assert "cannot accept command verb 'complete'" in capsys.readouterr().err
    assert cli("cancel", env.mnt, "commit", "--control-socket", env.sock) == 0


def test_ctrl_c_while_waiting_cancels_the_job(env, capsys, monkeypatch):
    from fusefs import qmp

    env.plan.steps = 100_000
    env.plan.work = 0.01
    real = qmp.QMPConnection.next_event
    calls = {"n": 0}

    def interrupted(self, timeout=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, timeout)

    monkeypatch.setattr(qmp.QMPConnection, "next_event", interrupted)
    assert live(env, "--wait") == 130
    assert "interrupted: job 'commit' cancelled" in capsys.readouterr().err
    monkeypatch.setattr(qmp.QMPConnection, "next_event", real)
    wait_gone(env)
    assert not env.fake.outcomes["commit"]["finished"]  # cancelled (maybe before its run began)


def test_no_control_socket(tmp_path, capsys):
    mnt = tmp_path / "m"
    mnt.mkdir()
    assert cli("jobs", mnt, "--control-socket", tmp_path / "none.sock") == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"qcowfs: {mnt}: no qcowfs control socket answers at ")
        and err.count("\n") == 1
    )
    os.environ.setdefault("XDG_RUNTIME_DIR", str(tmp_path))
    assert cli("cancel", mnt, "commit") == 1
    assert "no qcowfs control socket answers" in capsys.readouterr().err


# ------------------------------------------------------------------ offline


def test_offline_commit_calls_the_engine(tmp_path, capsys, monkeypatch):
    import commit.engine

    image = tmp_path / "active.qcow2"
    image.write_bytes(b"QFI\xfb")
    seen = {}

    def run_offline(img, **kw):
        seen["image"] = img
        seen.update(kw)
        kw["progress"](MiB, 2 * MiB)
        kw["progress"](2 * MiB, 2 * MiB)
        dep = type(
            "Dependant", (), {"message": lambda self: "/img/other.qcow2 depends on /img/base.qcow2"}
        )()
        return ["/img/mid.qcow2"], [dep]

    monkeypatch.setattr(commit.engine, "run_offline", run_offline)
    assert (
        cli(
            "commit",
            image,
            "--top",
            "mid.qcow2",
            "--mode",
            "restartable",
            "--speed",
            "5M",
            "--delete",
            "--guard-dir",
            tmp_path,
            "--force",
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out == "Image committed.\n"
    assert (
        err == "qcowfs: warning: stranded (--force): /img/other.qcow2 depends on /img/base.qcow2\n"
    )
    progress = seen.pop("progress")
    assert callable(progress)
    assert seen == {
        "image": str(image),
        "top": "mid.qcow2",
        "base": None,
        "mode": "restartable",
        "speed": 5 << 20,
        "delete": True,
        "guard_dirs": [str(tmp_path)],
        "force": True,
    }
    assert cli("commit", image, "--active", "--pivot") == 1
    assert "--pivot applies to a live commit" in capsys.readouterr().err


def test_offline_engine_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import commit.engine
    from qcow.errors import JobError

    image = tmp_path / "active.qcow2"
    image.write_bytes(b"QFI\xfb")

    def refuse(img, **kw):
        raise JobError(img, "an offline commit cannot be active")

    monkeypatch.setattr(commit.engine, "run_offline", refuse)
    assert cli("commit", image, "--active") == 1
    assert capsys.readouterr().err == f"qcowfs: {image}: an offline commit cannot be active\n"
