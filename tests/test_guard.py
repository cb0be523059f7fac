"""The stranding guard: who else reads through what a commit changes.

Every image here is made by qemu-img (`create -b ... -F ...`, `rebase -u`), and where a
test relies on how a backing name resolves (symlinks, `..`), QEMU's own
`qemu-img info --backing-chain` is asked too, so the guard and QEMU agree on it.
"""

import importlib.util
import json
import os
import shutil
import subprocess

import pytest
from qemu_helpers import (
    REPO_ROOT,
    M,
    apply_ops,
    convert_raw,
    create,
    make_raw,
    qemu_img,
    qemu_info_chain,
    run_qcowfs,
    sha256_tree,
)

from commit.guard import Dependant, dependants_report, find_dependants, guard_commit
from qcow.errors import JobError, QcowError


def make_chain(d, fmt_base="qcow2"):
    """base <- mid <- top <- active in d, relative names; returns paths top first."""
    d.mkdir(parents=True, exist_ok=True)
    if fmt_base == "raw":
        base = make_raw(d / "base.raw", 4 * M, [(0, 4 * M, 0x11)])
    else:
        base = create(d / "base.qcow2", 4 * M)
        apply_ops(base, [("w", 0, 4 * M, 0x11)])
    mid = create(d / "mid.qcow2", 4 * M, backing=os.path.basename(base), backing_fmt=fmt_base)
    top = create(d / "top.qcow2", 4 * M, backing="mid.qcow2")
    active = create(d / "active.qcow2", 4 * M, backing="top.qcow2")
    return [str(d / os.path.basename(p)) for p in (active, top, mid, base)]


def ino(path):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def qemu_chain_inodes(path):
    """The inodes of the chain as QEMU resolves it (its own oracle for names)."""
    return [ino(layer["filename"]) for layer in qemu_info_chain(path, share=True)]


def commit_top(chain, **kw):
    """find_dependants for a commit of top into base (chain top first)."""
    return find_dependants(chain, [chain[3]], chain[1:3], top=chain[1], **kw)


def paths(deps):
    return sorted(d.path for d in deps)


# --------------------------------------------------------------------- the clone of mid


def test_clone_of_mid_in_same_dir_refused_and_nothing_touched(workdir):
    chain = make_chain(workdir)
    clone = create(workdir / "clone.qcow2", 4 * M, backing="mid.qcow2")
    before = sha256_tree(workdir)

    with pytest.raises(JobError) as ei:
        guard_commit(chain, 3, 1, "simple", [], False)
    lines = str(ei.value).splitlines()
    assert len(lines) == 2
    assert "refusing to commit" in lines[0] and "--force" in lines[0]
    assert lines[0].startswith(chain[1] + ": ")  # names the file, like every error
    assert lines[1].startswith(clone + ": ")
    assert chain[2] in lines[1] and "case 4" in lines[1]
    assert "qemu-img rebase -u -b mid-copy.qcow2 -F qcow2" in lines[1]
    assert sha256_tree(workdir) == before  # headers only, nothing written

    stranded = guard_commit(chain, 3, 1, "simple", [], True)
    assert [(d.path, d.depends_on, d.kind) for d in stranded] == [(clone, chain[2], "intermediate")]
    d = stranded[0]
    assert d.cases == (4,) and d.via == clone and d.backing_name == "mid.qcow2"
    assert d.message() == lines[1]
    json.dumps(d.to_dict())  # a job event can carry it
    assert find_dependants(chain, [chain[3]], chain[1:3], exclude=[clone]) == []
    assert sha256_tree(workdir) == before


def test_restartable_mode_names_case_3_too(workdir):
    chain = make_chain(workdir)
    create(workdir / "clone.qcow2", 4 * M, backing="mid.qcow2")
    [d] = guard_commit(chain, 3, 1, "restartable", [], True)
    assert d.cases == (3, 4)
    assert "cases 3-4" in d.message() and "drained" in d.message()


def test_chain_of_clones_reports_each_with_the_image_to_rebase(workdir):
    chain = make_chain(workdir)
    c1 = create(workdir / "c1.qcow2", 4 * M, backing="mid.qcow2")
    c2 = create(workdir / "c2.qcow2", 4 * M, backing="c1.qcow2")
    deps = {d.path: d for d in commit_top(chain)}
    assert set(deps) == {c1, c2}
    assert deps[c2].route == (c2, c1, chain[2])
    assert deps[c2].via == c1 and f"(through {c1})" in deps[c2].message()
    assert deps[c2].fix_commands()[-1][-1] == c1  # fixing c1 keeps c2 valid too


# ------------------------------------------------------------------------------ scope


def test_dependant_in_other_dir_found_only_with_guard_dir(tmp_path):
    chain = make_chain(tmp_path / "chain")
    deep = tmp_path / "vms" / "a" / "b"
    deep.mkdir(parents=True)
    clone = create(deep / "clone.qcow2", 4 * M, backing=chain[2])  # absolute name
    assert commit_top(chain) == []
    assert guard_commit(chain, 3, 1, "simple", [], False) == []
    deps = commit_top(chain, guard_dirs=[tmp_path / "vms"])  # recursive
    assert paths(deps) == [clone] and deps[0].depends_on == chain[2]
    with pytest.raises(JobError):
        guard_commit(chain, 3, 1, "simple", [str(tmp_path / "vms")], False)
    # a guard dir that is also the chain's dir, or given twice, changes nothing
    assert paths(commit_top(chain, guard_dirs=[tmp_path, tmp_path / "vms"])) == [clone]


def test_missing_guard_dir_is_a_clear_error(workdir):
    chain = make_chain(workdir)
    with pytest.raises(QcowError, match="guard directory"):
        guard_commit(chain, 3, 1, "simple", [str(workdir / "nope")], False)


# --------------------------------------------------------------- names: symlinks, `..`


def test_dependant_through_symlinks(tmp_path):
    chain = make_chain(tmp_path / "chain")
    cdir = tmp_path / "chain"
    # (a) the backing name is a symlink to mid
    os.symlink("mid.qcow2", cdir / "mid-link.qcow2")
    a = create(cdir / "a.qcow2", 4 * M, backing="mid-link.qcow2")
    # (b) in another directory, through a symlinked directory
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(cdir, other / "images")
    b = create(other / "b.qcow2", 4 * M, backing="images/mid.qcow2")
    # (c) the dependant itself is reached through a symlink in the guard dir
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    c_real = create(hidden / "c.qcow2", 4 * M, backing=chain[2])
    os.symlink(c_real, other / "c-link.qcow2")
    for p in (a, b, c_real):
        assert ino(chain[2]) in qemu_chain_inodes(p)  # QEMU agrees

    deps = commit_top(chain, guard_dirs=[other])
    assert paths(deps) == sorted([a, b, str(other / "c-link.qcow2")])
    assert all(d.depends_on == chain[2] and d.kind == "intermediate" for d in deps)
    # the symlink mid-link.qcow2 is mid itself, not a dependant; a link to the active
    # image is the chain, too
    os.symlink("active.qcow2", cdir / "current.qcow2")
    assert paths(commit_top(chain, guard_dirs=[other])) == paths(deps)
    # a file found under two names is reported once, by its real name
    deps = commit_top(chain, guard_dirs=[other, hidden])
    assert paths(deps) == sorted([a, b, c_real])


def test_dependant_through_dotdot(tmp_path):
    chain = make_chain(tmp_path / "chain")
    sub = tmp_path / "vms" / "sub"
    sub.mkdir(parents=True)
    d = create(sub / "clone.qcow2", 4 * M, backing="../../chain/mid.qcow2")
    e = create(tmp_path / "chain" / "e.qcow2", 4 * M, backing="../chain/base.qcow2")
    assert ino(chain[2]) in qemu_chain_inodes(d)
    deps = {x.path: x for x in commit_top(chain, guard_dirs=[tmp_path / "vms"])}
    assert set(deps) == {d, e}
    assert deps[d].depends_on == chain[2] and deps[d].kind == "intermediate"
    assert deps[e].depends_on == chain[3] and deps[e].kind == "base"


def test_dotdot_after_a_symlink_resolves_as_the_kernel_does(tmp_path):
    """`lnk/../mid.qcow2` is the `..` of wherever lnk points, not a lexical shortcut:
    both ways round, the guard must agree with QEMU (and the kernel)."""
    chain = make_chain(tmp_path / "chain")
    (tmp_path / "chain" / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere" / "deep"
    (elsewhere / "dir").mkdir(parents=True)
    create(elsewhere / "mid.qcow2", 4 * M)  # a different "mid.qcow2"
    vms = tmp_path / "vms"
    vms.mkdir()
    # lexically vms/mid.qcow2 (no such file); really chain/sub/.. = chain/mid.qcow2
    os.symlink(tmp_path / "chain" / "sub", vms / "lnk1")
    hit = create(vms / "hit.qcow2", 4 * M, backing="lnk1/../mid.qcow2")
    # lexically chain/mid.qcow2 (a chain image!); really elsewhere/deep/mid.qcow2
    os.symlink(elsewhere / "dir", tmp_path / "chain" / "lnk2")
    miss = create(tmp_path / "chain" / "miss.qcow2", 4 * M, backing="lnk2/../mid.qcow2")
    assert ino(chain[2]) in qemu_chain_inodes(hit)
    assert ino(chain[2]) not in qemu_chain_inodes(miss)
    assert paths(commit_top(chain, guard_dirs=[vms])) == [hit]


# ------------------------------------------------------------------------ base alone


def test_dependant_on_base_alone_is_refused_too(tmp_path):
    chain = make_chain(tmp_path / "chain")
    other = tmp_path / "other"
    other.mkdir()
    onbase = create(other / "onbase.qcow2", 4 * M, backing="../chain/base.qcow2")
    with pytest.raises(JobError) as ei:
        guard_commit(chain, 3, 1, "simple", [str(other)], False)
    assert onbase in str(ei.value) and "cases 2-4" in str(ei.value)
    [d] = guard_commit(chain, 3, 1, "simple", [str(other)], True)
    assert (d.path, d.depends_on, d.kind, d.cases) == (onbase, chain[3], "base", (2, 3, 4))
    assert d.fix_commands()[0][:2] == ["cp", "--sparse=always"]


def test_dependant_on_raw_base(workdir):
    chain = make_chain(workdir, fmt_base="raw")
    onbase = create(workdir / "onbase.qcow2", 4 * M, backing="base.raw", backing_fmt="raw")
    [d] = guard_commit(chain, 3, 1, "simple", [], True)
    assert (d.path, d.kind) == (onbase, "base")
    assert d.fix_commands()[1][-3:] == ["-F", "raw", onbase]


def test_header_past_the_first_block_falls_back_to_the_whole_cluster(workdir, monkeypatch):
    """The scan reads one 4 KiB block; a header whose extensions or backing name lie
    beyond it (possible with big clusters) is read whole instead, not skipped."""
    import qcow.header

    chain = make_chain(workdir)
    clone = create(workdir / "clone.qcow2", 4 * M, backing="mid.qcow2")
    monkeypatch.setattr(qcow.header, "HEADER_PROBE_BYTES", 112)  # extensions lie past it
    assert paths(commit_top(chain)) == [clone]


def test_odd_file_names_give_one_printable_line_each(workdir):
    chain = make_chain(workdir)
    odd = os.fsdecode(bytes(workdir) + b"/two\nlines-\xff.qcow2")
    create(odd, 4 * M, backing="mid.qcow2")
    with pytest.raises(JobError) as ei:
        guard_commit(chain, 3, 1, "simple", [], False)
    lines = str(ei.value).splitlines()
    assert len(lines) == 2 and "two\\nlines-\\udcff.qcow2" in lines[1]
    lines[1].encode("utf-8")  # printable as it is
    cp = run_qcowfs("info", chain[2], "--dependants")
    assert cp.returncode == 0, cp.stderr
    assert len(cp.stdout.splitlines()) == 3  # active, the odd one, top


# ------------------------------------------------------------------ no false positives


def test_no_false_positives(tmp_path):
    chain = make_chain(tmp_path / "chain")
    cdir = tmp_path / "chain"
    # the chain itself, a hard link and a symlink to its images
    os.link(chain[2], cdir / "mid-hardlink.qcow2")
    os.symlink("top.qcow2", cdir / "top-alias.qcow2")
    # a snapshot overlay above the active image: the commit keeps active's view
    create(cdir / "snap.qcow2", 4 * M, backing="active.qcow2")
    # same file names as the chain's, different files, in another directory
    other = tmp_path / "other"
    other.mkdir()
    create(other / "base.qcow2", 4 * M)
    create(other / "mid.qcow2", 4 * M, backing="base.qcow2")
    create(other / "clone.qcow2", 4 * M, backing="mid.qcow2")
    create(other / "clone2.qcow2", 4 * M, backing=str(other / "base.qcow2"))
    # junk a scan must survive: text, a bad qcow2 header, a FIFO, broken links,
    # a dangling backing file, a loop, an empty file, a directory named like an image
    (other / "notes.txt").write_text("hello\n")
    (other / "bad.qcow2").write_bytes(b"QFI\xfb" + bytes(60) + b"\xff" * 100)
    (other / "empty.qcow2").write_bytes(b"")
    os.mkfifo(other / "fifo.qcow2")
    os.symlink("nowhere.qcow2", other / "broken-link.qcow2")
    create(other / "x.qcow2", 4 * M)
    create(other / "dangling.qcow2", 4 * M, backing="x.qcow2")
    os.unlink(other / "x.qcow2")
    create(other / "l1.qcow2", 4 * M)
    create(other / "l2.qcow2", 4 * M, backing="l1.qcow2")
    qemu_img("rebase", "-u", "-b", "l2.qcow2", "-F", "qcow2", str(other / "l1.qcow2"))
    (other / "dir.qcow2").mkdir()

    assert commit_top(chain, guard_dirs=[other]) == []
    assert guard_commit(chain, 3, 1, "simple", [str(other)], False) == []
    assert guard_commit(chain, 3, 1, "restartable", [str(other)], False) == []
    assert guard_commit(chain, 3, 2, "simple", [str(other)], False) == []


def test_dependant_of_top_only_matters_when_the_dropped_images_are_deleted(workdir):
    """top keeps its own view (nothing above it lands in base), so an overlay on top
    only loses out if top is deleted: reported unless the caller says it is not."""
    chain = make_chain(workdir)
    ontop = create(workdir / "ontop.qcow2", 4 * M, backing="top.qcow2")
    assert guard_commit(chain, 3, 1, "simple", [], False, delete=False) == []
    [d] = guard_commit(chain, 3, 1, "simple", [], True)  # delete unknown
    assert (d.path, d.depends_on, d.cases, d.is_top) == (ontop, chain[1], (), True)
    assert "--delete" in d.message() and "no allocation case" in d.message()
    # committing mid alone: top is above the range, its overlays keep their view
    assert guard_commit(chain, 3, 2, "simple", [], False) == []


def test_active_commit(workdir):
    chain = make_chain(workdir)
    snap = create(workdir / "snap.qcow2", 4 * M, backing="active.qcow2")
    clone = create(workdir / "clone.qcow2", 4 * M, backing="mid.qcow2")
    deps = {d.path: d for d in guard_commit(chain, 3, 0, "simple", [], True, delete=False)}
    assert set(deps) == {snap, clone}
    assert deps[snap].cases == (1,) and "pivot" in deps[snap].message()
    assert deps[clone].cases == (1, 4)


def test_bad_range_is_a_job_error(workdir):
    chain = make_chain(workdir)
    for b, t in ((1, 1), (1, 2), (4, 1), (3, -1)):
        with pytest.raises(JobError):
            guard_commit(chain, b, t, "simple", [], False)
    with pytest.raises(JobError):
        guard_commit(chain, 3, 1, "fast", [], False)


# ----------------------------------------------- the cases are real; the fixes work


def _case_setup(d):
    chain = make_chain(d)
    apply_ops(chain[2], [("w", 0, 64 * 1024, 0x22)])  # mid only: case 2
    apply_ops(
        chain[1],
        [
            ("w", 0, 64 * 1024, 0x33),  # both: case 3
            ("w", 1 * M, 64 * 1024, 0x44),
        ],
    )  # top only: case 4
    create(d / "clone.qcow2", 4 * M, backing="mid.qcow2")
    create(d / "onbase.qcow2", 4 * M, backing="base.qcow2")
    return chain


@pytest.mark.parametrize("fix", [False, True])
def test_reported_breakage_is_real_and_the_suggested_fix_prevents_it(tmp_path, fix):
    """qemu-img commit of top into base as the oracle: without the fix the dependants'
    views change (what the guard says); after running its suggested commands they
    don't."""
    d = tmp_path / "c"
    chain = _case_setup(d)
    views = {n: convert_raw(d / n) for n in ("clone.qcow2", "onbase.qcow2")}
    deps = guard_commit(chain, 3, 1, "simple", [], True)
    assert {(os.path.basename(x.path), x.kind) for x in deps} == {
        ("clone.qcow2", "intermediate"),
        ("onbase.qcow2", "base"),
    }
    if fix:
        for dep in deps:
            for cmd in dep.fix_commands():
                subprocess.run(cmd, check=True, capture_output=True)
        assert guard_commit(chain, 3, 1, "simple", [], False) == []
    qemu_img("commit", "-q", "-b", "base.qcow2", chain[1])
    for n, before in views.items():
        after = convert_raw(d / n)
        assert (after == before) == fix, n


# ------------------------------------------------- end to end: qcowfs commit IMAGE


def _clone_setup(d):
    chain = _case_setup(d)
    os.unlink(d / "onbase.qcow2")
    return chain, str(d / "clone.qcow2")


def test_offline_commit_refused_then_forced(workdir):
    chain, clone = _clone_setup(workdir)
    before = sha256_tree(workdir)
    cp = run_qcowfs("commit", chain[0])
    assert cp.returncode == 1 and "Traceback" not in cp.stderr
    err = cp.stderr.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("qcowfs: ") and "--force" in err[0]
    assert err[1].startswith(clone + ": ") and "case 4" in err[1]
    assert sha256_tree(workdir) == before  # nothing touched

    cp = run_qcowfs("commit", chain[0], "--force")
    assert cp.returncode == 0, cp.stderr
    assert [os.path.basename(x["filename"]) for x in qemu_info_chain(chain[0])] == [
        "active.qcow2",
        "base.qcow2",
    ]


def test_forced_offline_commit_names_what_it_stranded(workdir):
    chain, clone = _clone_setup(workdir)
    cp = run_qcowfs("commit", chain[0], "--force")
    assert cp.returncode == 0, cp.stderr
    assert clone in cp.stdout + cp.stderr


# -------------------------------------------------------------- qcowfs info --dependants


def test_info_dependants_cli(tmp_path):
    chain = make_chain(tmp_path / "chain")
    cdir = tmp_path / "chain"
    clone = create(cdir / "clone.qcow2", 4 * M, backing="mid.qcow2")
    other = tmp_path / "other"
    other.mkdir()
    far = create(other / "far.qcow2", 4 * M, backing="../chain/clone.qcow2")

    cp = run_qcowfs("info", chain[2], "--dependants")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == [
        f"{chain[0]} -> {chain[1]} -> {chain[2]}",
        f"{clone} -> {chain[2]}",
        f"{chain[1]} -> {chain[2]}",
    ]
    cp = run_qcowfs("info", chain[2], "--dependants", "--guard-dir", str(other), "--json")
    assert cp.returncode == 0, cp.stderr
    rows = json.loads(cp.stdout)
    assert [r["filename"] for r in rows] == [chain[0], clone, chain[1], far]
    assert rows[3]["backing-chain"][-1].endswith("mid.qcow2")
    assert rows[3]["via"] == str(other / "../chain/clone.qcow2")
    assert all(r["depends-on"] == chain[2] for r in rows)

    cp = run_qcowfs("info", chain[0], "--dependants")
    assert cp.returncode == 0 and cp.stdout == "" and "no image depends" in cp.stderr
    cp = run_qcowfs("info", chain[0], "--dependants", "--json")
    assert cp.returncode == 0 and json.loads(cp.stdout) == []
    cp = run_qcowfs("info", chain[0], "--dependants", "--guard-dir", str(tmp_path / "no"))
    assert cp.returncode == 1 and "Traceback" not in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1 and "guard directory" in cp.stderr


def test_dependants_report_in_process(workdir, capsys):
    chain = make_chain(workdir)
    clone = create(workdir / "clone.qcow2", 4 * M, backing="base.qcow2")
    assert dependants_report(chain[3], []) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"{clone} -> {chain[3]}" in out and len(out) == 4  # active, top, mid, clone


# ---------------------------------------------------------------- a big directory


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_guard", REPO_ROOT / "scripts" / "benchlib" / "guard.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_scan_of_2000_files(tmp_path):
    """Correctness on a big directory (the timing is the guard section of scripts/bench.py)."""
    bench = _bench_module()
    chain, expected = bench.build_bench_dir(tmp_path / "images", 2000, dependants=7)
    assert len(os.listdir(tmp_path / "images")) == 2005 and len(expected) == 7
    deps = commit_top(chain)
    assert paths(deps) == sorted(expected)
    assert all(isinstance(d, Dependant) and d.depends_on == chain[2] for d in deps)
    with pytest.raises(JobError) as ei:
        guard_commit(chain, 3, 1, "simple", [], False)
    assert len(str(ei.value).splitlines()) == 8
    shutil.rmtree(tmp_path / "images")


def test_live_commit_refused_then_forced_job_says_what_it_strands(workdir, mounter):
    """Over the control socket: block-commit is refused while a clone depends on mid;
    with x-force the job runs, and query-block-jobs and its events say it was forced
    and name the clone it strands."""
    from fusefs.qmp import QMPCallError, QMPConnection

    chain, clone = _clone_setup(workdir)
    m = mounter(chain[0])
    with QMPConnection(str(m.socket)) as conn:
        with pytest.raises(QMPCallError) as ei:
            conn.execute("block-commit", {"job-id": "c", "top": chain[1]})
        assert clone in ei.value.desc and "nothing was touched" in ei.value.desc
        conn.execute(
            "block-commit", {"job-id": "c", "top": chain[1], "x-force": True, "auto-dismiss": False}
        )
        done = None
        for event in conn.events(timeout=60):
            if event["event"] == "BLOCK_JOB_COMPLETED":
                done = event["data"]
                break
        assert done is not None and done.get("x-forced") is True
        assert any(clone in line for line in done["x-stranded"])
        [job] = conn.execute("query-block-jobs")
        assert job["x-forced"] is True and any(clone in s for s in job["x-stranded"])
        conn.execute("job-dismiss", {"id": "c"})
    m.unmount()
    assert [os.path.basename(layer["filename"]) for layer in qemu_info_chain(chain[0])] == [
        "active.qcow2",
        "base.qcow2",
    ]
