"""The chain reader against QEMU over the whole coverage matrix.

For every case built by ``qemu_helpers.build_case``: ``chain.read`` equals
``qemu-img convert -O raw``, ``qcowfs map --json`` equals ``qemu-img map
--output=json`` extent for extent, and ``qcowfs info --json`` describes the same
chain as ``qemu-img info --backing-chain``.
"""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
from qemu_helpers import (
    MATRIX_CASES,
    K,
    M,
    build_case,
    check_case_claims,
    convert_raw,
    qemu_img,
    qemu_info_chain,
    qemu_io,
    qemu_map,
    run_qcowfs,
    sha256_tree,
)

import qcow
from qcow.errors import QcowError


def first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    for i in range(0, len(want), 4096):
        if got[i : i + 4096] != want[i : i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(want))) if got[k] != want[k])
            return (
                f"first difference at byte {j:#x}: got {got[j : j + 16].hex()} "
                f"want {want[j : j + 16].hex()}"
            )
    return "equal"


def assert_same(got, want, what):
    assert isinstance(got, bytes), f"{what}: read returned {type(got).__name__}"
    assert got == want, f"{what}: {first_difference(got, want)}"


def merge_extents(extents):
    """Turn block_status extents into qemu-img map's list: the same merge rule (equal
    flags and depth, and contiguous host offsets when there is one).

    ``block_status(..., want_zero=True)`` is the mode with qemu-img map's semantics
    (it also asks the file system for holes, as QEMU does)."""
    out = []
    for e in extents:
        d = {
            "start": e.start,
            "length": e.length,
            "depth": e.depth,
            "present": bool(e.present),
            "zero": bool(e.zero),
            "data": bool(e.data),
        }
        if e.offset is not None:
            d["offset"] = e.offset
        if e.length == 0:
            continue
        if out:
            p = out[-1]
            same = all(p[k] == d[k] for k in ("depth", "present", "zero", "data"))
            contiguous = ("offset" not in p and "offset" not in d) or (
                "offset" in p and "offset" in d and p["offset"] + p["length"] == d["offset"]
            )
            if same and contiguous and p["start"] + p["length"] == d["start"]:
                p["length"] += d["length"]
                continue
        out.append(d)
    return out


@pytest.fixture(scope="module")
def reference(matrix):
    """name -> (active image path, convert_raw bytes), computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            path = matrix.get(name)
            cache[name] = (path, convert_raw(path))
        return cache[name]

    return get


# ------------------------------------------------------------ the matrix itself


@pytest.mark.parametrize("name", MATRIX_CASES)
def test_case_has_claimed_property(name, matrix):
    """The helpers build what they claim (cluster size, compression, snapshot...),
    and QEMU finds every image clean."""
    chain = check_case_claims(name, matrix.get(name))
    assert chain, "qemu-img info returned no layer"


# ----------------------------------------------------------------- reading


@pytest.mark.parametrize("name", MATRIX_CASES)
def test_read_whole_disk_equals_qemu(name, matrix, reference):
    path, want = reference(name)
    before = sha256_tree(matrix.directory(name))
    with qcow.open_chain(path) as chain:
        assert chain.virtual_size == len(want)
        got = chain.read(0, chain.virtual_size)
    assert_same(got, want, f"{name}: whole disk")
    assert sha256_tree(matrix.directory(name)) == before, "a read-only open changed a file"


@pytest.mark.parametrize("name", MATRIX_CASES)
def test_read_unaligned_chunks(name, matrix, reference):
    path, want = reference(name)
    size = len(want)
    chain_info = qemu_info_chain(path)
    rng = random.Random(name)
    ranges = []
    for _ in range(60):
        off = rng.randrange(size)
        ranges.append((off, rng.randint(1, min(300 * K, size - off))))
    # edges: layer ends, cluster edges, the first and the last bytes
    edges = {0, size}
    for layer in chain_info:
        vs, cs = layer["virtual-size"], layer.get("cluster-size", 64 * K)
        edges.add(vs)
        edges.update(range(cs, min(size, 4 * M), max(cs, 256 * K)))
    for e in sorted(edges):
        for off, ln in ((e - 1, 2), (e - 7, 13), (e - 513, 1026), (e, 1), (e - 1, 1)):
            if 0 <= off and ln > 0 and off + ln <= size:
                ranges.append((off, ln))
    with qcow.open_chain(path) as chain:
        for off, ln in ranges:
            assert_same(chain.read(off, ln), want[off : off + ln], f"{name}: read({off}, {ln})")
        assert chain.read(size - 1, 1) == want[-1:]


@pytest.mark.parametrize("name", ["chain4", "cluster512", "short_intermediate"])
def test_read_past_end_is_an_error(name, matrix):
    path = matrix.get(name)
    with qcow.open_chain(path) as chain:
        size = chain.virtual_size
        for off, ln in ((size - 10, 20), (size, 1), (size + M, 512)):
            with pytest.raises(ValueError):
                chain.read(off, ln)


_CONCURRENT_READS = textwrap.dedent("""
    import random, sys, threading
    sys.path.insert(0, sys.argv[3])
    import qcow
    from qemu_helpers import convert_raw
    path, rounds = sys.argv[1], int(sys.argv[2])
    want = convert_raw(path)
    errors = []
    with qcow.open_chain(path, cache_bytes=256 << 10) as chain:   # small: evictions
        def worker(seed):
            rng = random.Random(seed)
            try:
                for _ in range(rounds):
                    off = rng.randrange(len(want))
                    ln = rng.randint(1, min(200 << 10, len(want) - off))
                    if chain.read(off, ln) != want[off:off + ln]:
                        errors.append(f"thread {seed}: wrong data at read({off}, {ln})")
                        return
            except Exception as e:
                errors.append(f"thread {seed}: {e!r}")
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if any(t.is_alive() for t in threads):
            errors.append("a reader thread hung")
    print("\\n".join(errors[:5]))
    sys.exit(1 if errors else 0)
""")


@pytest.mark.parametrize(
    "name", ["chain4", "compressed_zstd", "compressed_zlib", "extended_l2", "snapshot"]
)
def test_concurrent_reads(name, matrix):
    """The API is thread-safe: several threads reading at once all get the right bytes.
    Run in a child process, so a crash (a C extension used from several threads at
    once can segfault) fails this test instead of killing the whole run."""
    path = matrix.get(name)
    cp = subprocess.run(
        [
            sys.executable,
            "-c",
            _CONCURRENT_READS,
            path,
            "150",
            os.path.dirname(os.path.abspath(__file__)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if cp.returncode < 0:
        pytest.fail(
            f"concurrent reads crashed the process with signal {-cp.returncode}"
            f"\n{cp.stderr[-1500:]}"
        )
    assert cp.returncode == 0, cp.stdout + cp.stderr[-1500:]


@pytest.mark.parametrize("name", MATRIX_CASES)
def test_layers_match_qemu(name, matrix):
    path = matrix.get(name)
    chain_info = qemu_info_chain(path)
    with qcow.open_chain(path) as chain:
        got = [(os.path.realpath(la.path), la.format, la.virtual_size) for la in chain.layers]
        for la in chain.layers:
            assert os.path.isabs(la.path), la.path
    want = [(os.path.realpath(i["filename"]), i["format"], i["virtual-size"]) for i in chain_info]
    assert got == want


@pytest.mark.parametrize("name", MATRIX_CASES)
def test_block_status_merges_to_qemu_map(name, matrix):
    path = matrix.get(name)
    want = qemu_map(path)
    with qcow.open_chain(path) as chain:
        extents = chain.block_status(0, chain.virtual_size, want_zero=True)
    got = merge_extents(extents)
    assert got == want


@pytest.mark.parametrize(
    "name", ["chain4", "extended_l2", "raw_base_chain", "short_unaligned", "compressed_zlib_4k"]
)
def test_block_status_of_subranges(name, matrix):
    """Any sub-range gives extents that tile exactly that range and agree with the
    extents of the whole disk."""
    path = matrix.get(name)
    full = qemu_map(path)

    def covering(pos):
        return next(e for e in full if e["start"] <= pos < e["start"] + e["length"])

    rng = random.Random(name)
    with qcow.open_chain(path) as chain:
        size = chain.virtual_size
        for _ in range(30):
            off = rng.randrange(size)
            ln = rng.randint(1, size - off)
            ext = chain.block_status(off, ln, want_zero=True)
            assert ext, (off, ln)
            pos = off
            for e in ext:
                assert e.start == pos and e.length > 0, (off, ln, ext)
                ref = covering(e.start)
                for k in ("depth", "present", "zero", "data"):
                    assert getattr(e, k) == ref[k], (off, ln, e, ref)
                assert e.start + e.length <= ref["start"] + ref["length"], (e, ref)
                if "offset" in ref:
                    assert e.offset == ref["offset"] + (e.start - ref["start"]), (e, ref)
                else:
                    assert e.offset is None, (e, ref)
                pos += e.length
            assert pos == off + ln, (off, ln, ext)


def test_close_releases_locks(workdir):
    path = build_case("compat11", workdir)
    with qcow.open_chain(path) as chain:
        chain.read(0, 4096)
    # a writer can open every layer again
    qemu_io(path, "write -q -P 0x99 0 512")
    qemu_io(str(workdir / "base.qcow2"), "write -q -P 0x98 0 512")


# ----------------------------------------------------------------- the CLI


@pytest.mark.parametrize("name", MATRIX_CASES)
def test_cli_map_json_equals_qemu(name, matrix):
    path = matrix.get(name)
    cp = run_qcowfs("map", "--json", path)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == qemu_map(path)


def _same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


@pytest.mark.parametrize("name", MATRIX_CASES)
def test_cli_info_json_matches_qemu(name, matrix):
    path = matrix.get(name)
    want = qemu_info_chain(path)
    cp = run_qcowfs("info", "--json", path)
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    assert isinstance(got, list) and len(got) == len(want), got
    for ours, theirs in zip(got, want, strict=True):
        assert _same_file(ours["filename"], theirs["filename"]), (ours, theirs)
        for key in ("format", "virtual-size"):
            assert ours[key] == theirs[key], (key, ours, theirs)
        for key in ("cluster-size", "backing-filename", "backing-filename-format", "dirty-flag"):
            if key in theirs:
                assert ours.get(key) == theirs[key], (key, ours, theirs)
            else:
                assert ours.get(key) is None, (key, ours, theirs)
        if "full-backing-filename" in theirs:
            assert _same_file(ours["full-backing-filename"], theirs["full-backing-filename"]), (
                ours,
                theirs,
            )
        assert bool(ours.get("encrypted", False)) == bool(theirs.get("encrypted", False))


@pytest.mark.parametrize("name", ["chain4", "raw_base_chain", "snapshot"])
def test_cli_human_output(name, matrix):
    path = matrix.get(name)
    info = run_qcowfs("info", path)
    assert info.returncode == 0, info.stderr
    for layer in qemu_info_chain(path):
        assert os.path.basename(layer["filename"]) in info.stdout, info.stdout
    mp = run_qcowfs("map", path)
    assert mp.returncode == 0, mp.stderr
    assert mp.stdout.strip(), "qcowfs map printed nothing"
    assert "Traceback" not in info.stderr + mp.stderr


# ------------------------------------------------------------- encryption


@pytest.fixture(scope="module")
def _luks_image(tmp_path_factory):
    # LUKS set-up costs seconds (anti-forensic split): create once, copy per test.
    # QEMU's PBKDF benchmark sometimes measures 0 ms of CPU time and gives up with
    # "Unable to get accurate CPU usage": try again.
    path = str(tmp_path_factory.mktemp("luks") / "enc.qcow2")
    for attempt in range(5):
        cp = qemu_img(
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=hunter2",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            path,
            "1M",
            check=attempt == 4,
        )
        if cp.returncode == 0:
            return path
    raise AssertionError("unreachable")


@pytest.fixture
def encrypted_image(_luks_image, workdir):
    path = str(workdir / "enc.qcow2")
    shutil.copyfile(_luks_image, path)
    return path


def test_encrypted_image_is_described_and_refused(encrypted_image, workdir):
    path = encrypted_image
    assert qemu_info_chain(path)[0].get("encrypted") is True
    before = sha256_tree(workdir)

    cp = run_qcowfs("info", "--json", path)
    assert cp.returncode == 0, cp.stderr
    layers = json.loads(cp.stdout)
    assert layers[0]["encrypted"] is True
    assert layers[0]["virtual-size"] == M

    with pytest.raises(QcowError) as ei:
        with qcow.open_chain(path) as chain:
            chain.read(0, 512)
    msg = str(ei.value)
    assert "\n" not in msg and "enc.qcow2" in msg and "encrypt" in msg.lower(), msg
    assert sha256_tree(workdir) == before


def test_encrypted_backing_is_refused(encrypted_image, workdir):
    enc = encrypted_image
    top = str(workdir / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", enc, "-F", "qcow2", top, "1M")
    with pytest.raises(QcowError):
        with qcow.open_chain(top) as chain:
            chain.read(0, 512)


def test_eio_is_an_oserror():
    # The contract's EIO convention, as test_badinput relies on it.
    from qcow.errors import eio

    e = eio("x.qcow2", "bad L2 entry")
    assert isinstance(e, OSError) and e.errno == errno.EIO and "x.qcow2" in str(e)
