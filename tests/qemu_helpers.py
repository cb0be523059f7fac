"""QEMU's own tools as the reference for every test, and the coverage matrix.

Every test module imports this (pytest puts ``tests/`` on ``sys.path``). The names
``qemu_img``, ``qemu_io``, ``convert_raw``, ``qemu_map``, ``qemu_check``,
``qemu_info_chain``, ``MATRIX_CASES`` and ``build_case`` are relied on by other test
modules: keep them and their signatures.

The images are built only with ``qemu-img``/``qemu-io`` (never with our own writer), so
they are what QEMU produces. ``qcow2_layout`` is a small, independent header/table
parser used to find bytes to corrupt and to check that a built case really has the
property it claims; it is deliberately not the project's reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

K = 1 << 10
M = 1 << 20

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- tools


class ToolError(subprocess.CalledProcessError):
    """A failed qemu-img/qemu-io/qcowfs run; str() includes what it printed."""

    def __str__(self):
        return (
            f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
            f"stdout: {self.stdout!r}\nstderr: {self.stderr!r}"
        )


def _run(cmd, check=True, timeout=300, env=None):
    cmd = [str(c) for c in cmd]
    cp = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if check and cp.returncode != 0:
        raise ToolError(cp.returncode, cmd, cp.stdout, cp.stderr)
    return cp


def qemu_img(*args, check=True) -> subprocess.CompletedProcess:
    """Run ``qemu-img ARGS`` (text output captured); raise ToolError on failure if check."""
    return _run(["qemu-img", *args], check=check)


def qemu_io(img, *cmds, fmt="qcow2", check=True) -> subprocess.CompletedProcess:
    """Run ``qemu-io -f FMT -c CMD... IMG``. qemu-io exits non-zero when a command fails."""
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    args.append(img)
    return _run(args, check=check)


def _share(share):
    return ["-U"] if share else []


def convert_raw(img, snapshot=None, *, share=False) -> bytes:
    """The whole disk as QEMU sees it: ``qemu-img convert -O raw [-l SNAP] IMG``.

    ``share=True`` adds ``-U`` (needed while qcowfs holds the image's locks)."""
    fd, out = tempfile.mkstemp(prefix="qcowfs-ref-", suffix=".raw")
    os.close(fd)
    try:
        args = ["convert", *_share(share), "-O", "raw"]
        if snapshot is not None:
            args += ["-l", f"snapshot.name={snapshot}"]
        qemu_img(*args, img, out)
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def qemu_map(img, *, share=False) -> list[dict]:
    """``qemu-img map --output=json IMG`` as a list of dicts."""
    return json.loads(qemu_img("map", *_share(share), "--output=json", img).stdout)


def qemu_check(img, *, share=False) -> tuple[int, dict]:
    """``qemu-img check --output=json IMG`` -> (exit code, parsed report or {})."""
    cp = qemu_img("check", *_share(share), "--output=json", img, check=False)
    try:
        report = json.loads(cp.stdout) if cp.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    return cp.returncode, report


def qemu_info_chain(img, *, share=False) -> list[dict]:
    """``qemu-img info --backing-chain --output=json IMG``: one dict per layer, top first."""
    return json.loads(
        qemu_img("info", *_share(share), "--backing-chain", "--output=json", img).stdout
    )


def run_qcowfs(*args, timeout=120, check=False) -> subprocess.CompletedProcess:
    """Run our CLI as a user would: ``python -m fusefs ARGS`` (same as the console script)."""
    return _run([sys.executable, "-m", "fusefs", *args], check=check, timeout=timeout)


def sha256_tree(directory) -> dict[str, str]:
    """sha256 of every regular file under DIRECTORY, keyed by relative path."""
    out = {}
    root = Path(directory)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------- test data


def stamp_bytes(tag: str, start: int, length: int) -> bytes:
    """Compressible but position-identifying data: each 32-byte record at disk offset
    ``o`` (a multiple of 32) reads ``TAG@<o in hex>``. A read from the wrong place or
    the wrong layer shows up, unlike with a uniform pattern."""
    first = start // 32 * 32
    end = start + length
    recs = [f"{tag[:10]:<10}@{o:020x}\n".encode() for o in range(first, end, 32)]
    data = b"".join(recs)[start - first : start - first + length]
    assert len(data) == length
    return data


def rand_bytes(seed, start: int, length: int) -> bytes:
    """Incompressible deterministic data."""
    return random.Random(f"{seed}:{start}").randbytes(length)


def data_for(spec, start: int, length: int) -> bytes:
    """spec: int (a byte pattern), str (stamp tag) or ("rand", seed)."""
    if isinstance(spec, int):
        return bytes([spec]) * length
    if isinstance(spec, str):
        return stamp_bytes(spec, start, length)
    if isinstance(spec, tuple) and spec[0] == "rand":
        return rand_bytes(spec[1], start, length)
    raise ValueError(f"bad data spec {spec!r}")


def apply_ops(img, ops, fmt="qcow2"):
    """Apply guest operations with qemu-io in one run.

    ops: ("w", off, len, spec) write; ("c", off, len, spec) compressed write (whole
    clusters); ("z", off, len) write zeroes; ("zu", off, len) write zeroes, may unmap;
    ("d", off, len) discard."""
    if not ops:
        return
    tmpdir = tempfile.mkdtemp(prefix="qcowfs-src-")
    try:
        cmds = []
        for i, op in enumerate(ops):
            kind = op[0]
            if kind in ("w", "c"):
                _, off, ln, spec = op
                flag = "-c " if kind == "c" else ""
                if isinstance(spec, int):
                    cmds.append(f"write -q {flag}-P {spec:#x} {off} {ln}")
                else:
                    src = os.path.join(tmpdir, f"src{i}")
                    with open(src, "wb") as f:
                        f.write(data_for(spec, off, ln))
                    cmds.append(f"write -q {flag}-s {src} {off} {ln}")
            elif kind == "z":
                cmds.append(f"write -q -z {op[1]} {op[2]}")
            elif kind == "zu":
                cmds.append(f"write -q -z -u {op[1]} {op[2]}")
            elif kind == "d":
                cmds.append(f"discard -q {op[1]} {op[2]}")
            else:
                raise ValueError(f"bad op {op!r}")
        qemu_io(img, *cmds, fmt=fmt)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def make_raw(path, size, writes=(), holes_after=None):
    """A raw file of SIZE bytes, sparse except where WRITES ((off, len, spec)...) put data."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, ln, spec in writes:
            f.seek(off)
            f.write(data_for(spec, off, ln))
    return str(path)


def create(path, size, *, backing=None, backing_fmt="qcow2", **opts):
    """qemu-img create -f qcow2 [-b BACKING -F FMT] [-o k=v,...] PATH SIZE.

    opts keys use underscores (cluster_size=..., compat=..., extended_l2="on")."""
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    args += [path, str(size)]
    qemu_img(*args)
    return str(path)


# --------------------------------------------------------------- layout parsing

HDR_VERSION = 4
HDR_BACKING_OFFSET = 8
HDR_BACKING_SIZE = 16
HDR_CLUSTER_BITS = 20
HDR_SIZE = 24
HDR_CRYPT = 32
HDR_L1_SIZE = 36
HDR_L1_OFFSET = 40
HDR_REFTABLE_OFFSET = 48
HDR_REFTABLE_CLUSTERS = 56
HDR_NB_SNAPSHOTS = 60
HDR_SNAPSHOTS_OFFSET = 64
HDR_INCOMPATIBLE = 72
HDR_COMPATIBLE = 80
HDR_AUTOCLEAR = 88
HDR_REFCOUNT_ORDER = 96
HDR_LENGTH = 100

L2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COMPRESSED = 1 << 62
COPIED = 1 << 63


def patch(path, offset, fmt, value):
    """Overwrite bytes in place: struct.pack('>'+fmt, value) at OFFSET."""
    data = struct.pack(">" + fmt, value)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def patch_bytes(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def qcow2_layout(path) -> dict:
    """Where things are in a (valid) qcow2 file: header fields, extensions, tables.

    Returns a dict with the header fields, ``extensions`` [(type, file offset of the
    extension header, length)], ``l1`` (entries), ``l2_tables`` (file offsets),
    ``l2_entry_size``, ``data_entries`` and ``compressed_entries`` — lists of
    (file offset of the L2 entry, guest offset, entry value) — and
    ``zero_entries`` likewise for standard entries with the zero flag."""
    with open(path, "rb") as f:
        raw = f.read()
    (
        magic,
        version,
        bfo,
        bfs,
        cbits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
    ) = struct.unpack_from(">IIQIIQIIQQIIQ", raw, 0)
    lay = dict(
        magic=magic,
        version=version,
        backing_file_offset=bfo,
        backing_file_size=bfs,
        cluster_bits=cbits,
        size=size,
        crypt_method=crypt,
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=nb_snap,
        snapshots_offset=snap_off,
        file_size=len(raw),
    )
    if version >= 3:
        inc, comp, auto, rorder, hlen = struct.unpack_from(">QQQII", raw, 72)
    else:
        inc = comp = auto = 0
        rorder, hlen = 4, 72
    lay.update(
        incompatible=inc,
        compatible=comp,
        autoclear=auto,
        refcount_order=rorder,
        header_length=hlen,
        compression_type=raw[104] if version >= 3 and hlen > 104 else 0,
    )
    cs = 1 << cbits
    lay["cluster_size"] = cs
    exts = []
    pos = hlen
    while pos + 8 <= cs:
        etype, elen = struct.unpack_from(">II", raw, pos)
        if etype == 0:
            break
        exts.append((etype, pos, elen))
        pos += 8 + (elen + 7) // 8 * 8
    lay["extensions"] = exts
    lay["extensions_end"] = pos + 8
    lay["backing_name"] = raw[bfo : bfo + bfs].decode(errors="replace") if bfo else None
    extended = bool(inc & (1 << 4))
    esize = 16 if extended else 8
    lay["l2_entry_size"] = esize
    l1 = list(struct.unpack_from(f">{l1_size}Q", raw, l1_off)) if l1_size else []
    lay["l1"] = l1
    lay["l2_tables"] = []
    data, compressed, zero = [], [], []
    entries = cs // esize
    for i, e in enumerate(l1):
        l2_off = e & L2_OFFSET_MASK
        if not l2_off:
            continue
        lay["l2_tables"].append(l2_off)
        for j in range(entries):
            where = l2_off + j * esize
            (v,) = struct.unpack_from(">Q", raw, where)
            guest = (i * entries + j) * cs
            if v & COMPRESSED:
                compressed.append((where, guest, v))
            elif v & L2_OFFSET_MASK:
                data.append((where, guest, v))
            elif v & 1 and not extended:
                zero.append((where, guest, v))
    lay.update(data_entries=data, compressed_entries=compressed, zero_entries=zero)
    return lay


def l1_entries_needed(size, cluster_bits, extended=False):
    cs = 1 << cluster_bits
    per_l2 = cs // (16 if extended else 8)
    return -(-size // (cs * per_l2))


def fmt_specific(info: dict) -> dict:
    return info.get("format-specific", {}).get("data", {})


# ------------------------------------------------------------ the coverage matrix

_BUILDERS: dict = {}
_CLAIMS: dict = {}


def _case(name):
    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def _claim(name):
    def deco(fn):
        _CLAIMS[name] = fn
        return fn

    return deco


def _p(d, name):
    return str(Path(d) / name)


def _two_layer(d, *, base_opts=None, top_opts=None, size=4 * M, base_ops=None, top_ops=None):
    """base.qcow2 <- top.qcow2 with default data unless ops are given."""
    base = create(_p(d, "base.qcow2"), size, **(base_opts or {}))
    apply_ops(
        base,
        base_ops
        if base_ops is not None
        else [
            ("w", 0, M, "base"),
            ("w", 2 * M - 3000, 70 * K, ("rand", "base")),
            ("w", size - 64 * K, 64 * K, 0xB1),
        ],
    )
    top = create(_p(d, "top.qcow2"), size, backing="base.qcow2", **(top_opts or {}))
    apply_ops(
        top,
        top_ops
        if top_ops is not None
        else [
            ("w", 64 * K + 100, 150 * K, "top"),
            ("w", M - 512, 1024, 0x7A),
            ("w", 2 * M, 4 * K, ("rand", "top")),
            ("w", 3 * M + 1, 5, 0x7B),
            ("z", 512 * K, 64 * K),
        ],
    )
    return top


# --- format versions -------------------------------------------------------


@_case("compat010")
def _b_compat010(d):
    return _two_layer(d, base_opts={"compat": "0.10"}, top_opts={"compat": "0.10"})


@_claim("compat010")
def _c_compat010(path, chain):
    assert [fmt_specific(i)["compat"] for i in chain] == ["0.10", "0.10"]
    assert qcow2_layout(path)["version"] == 2


@_case("compat11")
def _b_compat11(d):
    return _two_layer(d, base_opts={"compat": "1.1"}, top_opts={"compat": "1.1"})


@_claim("compat11")
def _c_compat11(path, chain):
    assert [fmt_specific(i)["compat"] for i in chain] == ["1.1", "1.1"]
    assert qcow2_layout(path)["version"] == 3


# --- cluster sizes ---------------------------------------------------------


def _cluster_case(d, cs):
    if cs < 2 * M:
        size = 4 * M
        top_ops = [
            ("w", 0, 3 * cs + 17, "top"),
            ("w", 5 * cs - 7, 2 * cs + 9, ("rand", "top")),
            ("w", M - 100, 300, 0x5C),
            ("z", 16 * cs, 2 * cs),
            ("w", 2 * M + cs // 2, cs, "top2"),
            ("d", M + 64 * K, 64 * K),
        ]
    else:
        size = 8 * M
        top_ops = [
            ("w", 0, 17, 0x5C),  # a tiny write: COW a whole 2M cluster
            ("w", 2 * M - 4 * K, 8 * K, "span"),  # across a cluster boundary
            ("z", 4 * M, 2 * M),  # a whole zero cluster
            ("w", 6 * M + 12345, 100 * K, ("rand", "top")),
        ]
    base = create(_p(d, "base.qcow2"), size, cluster_size=64 * K)
    apply_ops(
        base,
        [("w", 0, 2 * M, "base"), ("w", 3 * M, 64 * K, ("rand", 1)), ("w", size - M, M, "bend")],
    )
    top = create(_p(d, "top.qcow2"), size, backing="base.qcow2", cluster_size=cs)
    apply_ops(top, top_ops)
    return top


for _cs, _nm in (
    (512, "cluster512"),
    (4 * K, "cluster4k"),
    (64 * K, "cluster64k"),
    (2 * M, "cluster2m"),
):
    _BUILDERS[_nm] = (lambda cs: lambda d: _cluster_case(d, cs))(_cs)
    _CLAIMS[_nm] = (
        lambda cs: lambda path, chain: _assert_eq(chain[0]["cluster-size"], cs, "cluster-size")
    )(_cs)


def _assert_eq(a, b, what):
    assert a == b, f"{what}: {a!r} != {b!r}"


# --- refcount widths -------------------------------------------------------


def _refcount_case(d, bits):
    base = create(_p(d, "base.qcow2"), 4 * M, refcount_bits=bits, cluster_size=4 * K)
    apply_ops(base, [("w", 0, M, "base"), ("w", 3 * M, 8 * K, 0x21)])
    if bits > 1:  # refcount 2 for shared clusters needs more than one bit
        qemu_img("snapshot", "-c", "s1", base)
        apply_ops(base, [("w", 4 * K, 4 * K, 0x22)])
    top = create(
        _p(d, "top.qcow2"), 4 * M, backing="base.qcow2", refcount_bits=bits, cluster_size=4 * K
    )
    apply_ops(top, [("w", 100 * K, 300 * K, "top"), ("z", 0, 8 * K)])
    return top


for _bits in (1, 16, 64):
    _BUILDERS[f"refcount{_bits}"] = (lambda b: lambda d: _refcount_case(d, b))(_bits)
    _CLAIMS[f"refcount{_bits}"] = (
        lambda b: (
            lambda path, chain: _assert_eq(
                [fmt_specific(i)["refcount-bits"] for i in chain], [b, b], "refcount-bits"
            )
        )
    )(_bits)


# --- zero clusters over backing data ---------------------------------------


@_case("zero_over_backing")
def _b_zero(d):
    base = create(_p(d, "base.qcow2"), 4 * M)
    apply_ops(base, [("w", 0, 4 * M, "base")])
    top = create(_p(d, "top.qcow2"), 4 * M, backing="base.qcow2")
    apply_ops(
        top,
        [
            ("z", 0, 64 * K),  # zero cluster, no allocation
            ("zu", 128 * K, 128 * K),  # zero clusters, may unmap
            ("z", 300 * K + 7, 10 * K),  # unaligned: explicit zeros (COW)
            ("w", 2 * M, 128 * K, 0x3C),
            ("z", 2 * M, 128 * K),  # preallocated zero clusters (zero + offset)
            ("d", M, 128 * K),  # discard over backing: zero clusters in v3
            ("w", 3 * M, 64 * K, "top"),
        ],
    )
    return top


@_claim("zero_over_backing")
def _c_zero(path, chain):
    m = qemu_map(path)
    zeros = [e for e in m if e["depth"] == 0 and e["zero"] and not e["data"]]
    assert zeros, "no zero extents at depth 0"
    assert any("offset" in e for e in zeros), "no preallocated zero cluster"
    assert qcow2_layout(path)["zero_entries"], "no L2 entry with the zero flag"


# --- compressed clusters ---------------------------------------------------


def _compressed_case(d, ctype, cs):
    src = make_raw(
        _p(d, "src.raw"),
        4 * M,
        [
            (0, M, "compress"),
            (M + 4 * K, 200 * K, ("rand", "c")),  # incompressible: stored plainly
            (2 * M, 512 * K, 0x44),
            (3 * M + 1000, 300 * K, "tail"),
        ],
    )
    base = _p(d, "base.qcow2")
    qemu_img(
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        f"compression_type={ctype},cluster_size={cs}",
        src,
        base,
    )
    os.unlink(src)
    top = create(
        _p(d, "top.qcow2"), 4 * M, backing="base.qcow2", compression_type=ctype, cluster_size=cs
    )
    apply_ops(
        top,
        [
            ("w", 100 * K + 3, 1000, 0x45),  # partial write into a compressed cluster
            ("c", 3 * M - 4 * cs, 2 * cs, "topc"),  # compressed in the overlay too
            ("z", 2 * M + 64 * K, 64 * K),
        ],
    )
    return top


def _compressed_claim(ctype):
    def claim(path, chain):
        assert [fmt_specific(i)["compression-type"] for i in chain] == [ctype, ctype]
        for img in (path, chain[1]["filename"]):
            rc, rep = qemu_check(img)
            assert rc == 0 and rep["compressed-clusters"] > 0, (img, rc, rep)

    return claim


_BUILDERS["compressed_zlib"] = lambda d: _compressed_case(d, "zlib", 64 * K)
_CLAIMS["compressed_zlib"] = _compressed_claim("zlib")
_BUILDERS["compressed_zstd"] = lambda d: _compressed_case(d, "zstd", 64 * K)
_CLAIMS["compressed_zstd"] = _compressed_claim("zstd")
_BUILDERS["compressed_zlib_4k"] = lambda d: _compressed_case(d, "zlib", 4 * K)
_CLAIMS["compressed_zlib_4k"] = _compressed_claim("zlib")


# --- extended L2 ------------------------------------------------------------


@_case("extended_l2")
def _b_extl2(d):
    base = create(_p(d, "base.qcow2"), 4 * M)
    apply_ops(base, [("w", 0, 4 * M, "base")])
    top = create(
        _p(d, "top.qcow2"), 4 * M, backing="base.qcow2", cluster_size=64 * K, extended_l2="on"
    )
    apply_ops(
        top,
        [
            ("w", 4 * K, 4 * K, 0x51),  # one subcluster
            ("w", 20 * K, 8 * K, "top"),  # two subclusters
            ("z", 40 * K, 4 * K),  # a zero subcluster
            ("w", 100 * K + 100, 1000, 0x52),  # inside one subcluster: COW from backing
            ("w", 192 * K, 64 * K, ("rand", "x")),  # a whole cluster
            ("zu", M, 12 * K),  # zero subclusters in an unallocated cluster
            ("w", 2 * M - 2 * K, 4 * K, 0x53),  # across a cluster boundary
        ],
    )
    return top


@_claim("extended_l2")
def _c_extl2(path, chain):
    assert fmt_specific(chain[0])["extended-l2"] is True
    m = qemu_map(path)
    sub = [e for e in m if e["depth"] == 0 and e["length"] < 64 * K]
    assert sub, "no sub-cluster extents at depth 0"
    assert any(e["zero"] and e["depth"] == 0 for e in m), "no zero subcluster"


@_case("extended_l2_past_short_base")
def _b_extl2_short(d):
    """2 MiB clusters of 32 subclusters over a 1 MiB base: unallocated subclusters of
    allocated clusters read through to base below 1 MiB, and past base's end read as
    zeros where the top's file has their place (qemu-img map gives it)."""
    base = create(_p(d, "base.qcow2"), M)
    apply_ops(base, [("w", 0, M, "base")])
    top = create(
        _p(d, "top.qcow2"), 4 * M, backing="base.qcow2", cluster_size=2 * M, extended_l2="on"
    )
    apply_ops(
        top, [("w", 64 * K, 64 * K, 0x51), ("w", 2 * M + 4 * K, 4 * K, 0x52), ("z", 3 * M, 64 * K)]
    )
    return top


@_claim("extended_l2_past_short_base")
def _c_extl2_short(path, chain):
    assert chain[1]["virtual-size"] < chain[0]["virtual-size"]
    m = qemu_map(path)
    assert any(not e["present"] and "offset" in e for e in m), m


# --- raw backing / raw base --------------------------------------------------


@_case("raw_backing")
def _b_rawbacking(d):
    base = make_raw(
        _p(d, "base.raw"),
        4 * M,
        [(0, M, "rawbase"), (M + 12345, 70 * K, ("rand", "r")), (3 * M, 4 * K, 0x61)],
    )
    top = create(_p(d, "top.qcow2"), 4 * M, backing="base.raw", backing_fmt="raw")
    apply_ops(top, [("w", 4 * K, 70 * K, "top"), ("z", 3 * M, 64 * K), ("w", 2 * M, 64 * K, 0x62)])
    assert base
    return top


@_claim("raw_backing")
def _c_rawbacking(path, chain):
    assert [i["format"] for i in chain] == ["qcow2", "raw"]
    assert chain[0]["backing-filename-format"] == "raw"


@_case("raw_base_chain")
def _b_rawchain(d):
    os.makedirs(_p(d, "sub"), exist_ok=True)
    make_raw(_p(d, "sub/base.raw"), 4 * M, [(0, 2 * M, "rawbase"), (3 * M, M, 0x71)])
    mid = create(
        _p(d, "mid.qcow2"), 4 * M, backing="sub/base.raw", backing_fmt="raw", cluster_size=4 * K
    )
    apply_ops(mid, [("w", M - 2 * K, 8 * K, "mid"), ("z", 3 * M + 4 * K, 4 * K)])
    top = create(_p(d, "top.qcow2"), 4 * M, backing="mid.qcow2")
    apply_ops(top, [("w", 0, 64 * K, "top"), ("w", 3 * M + 64 * K - 1, 2, 0x72)])
    return top


@_claim("raw_base_chain")
def _c_rawchain(path, chain):
    assert [i["format"] for i in chain] == ["qcow2", "qcow2", "raw"]
    assert chain[1]["backing-filename"] == "sub/base.raw"


# --- a 4-layer chain with data around layer-size boundaries --------------------


@_case("chain4")
def _b_chain4(d):
    base = create(_p(d, "base.qcow2"), 3 * M)
    apply_ops(base, [("w", 0, 3 * M, "base")])
    mid = create(_p(d, "mid.qcow2"), 4 * M, backing="base.qcow2", cluster_size=4 * K)
    apply_ops(mid, [("w", 3 * M - 32 * K, 64 * K, "mid"), ("w", 512 * K, 64 * K, 0x22)])
    # absolute backing name for variety
    top = create(_p(d, "top.qcow2"), 5 * M, backing=os.path.abspath(mid))
    apply_ops(
        top,
        [
            ("w", 4 * M - 4 * K, 8 * K, "top"),
            ("w", 540 * K, 8 * K, 0x33),
            ("z", 3 * M - 64 * K, 32 * K),
        ],
    )
    active = create(_p(d, "active.qcow2"), 5 * M, backing="./top.qcow2", cluster_size=16 * K)
    apply_ops(
        active,
        [
            ("w", 5 * M - 16 * K, 16 * K, "active"),
            ("w", 544 * K, 2 * K, 0x44),
            ("w", 3 * M - 1, 2, 0x45),
        ],
    )
    return active


@_claim("chain4")
def _c_chain4(path, chain):
    assert [Path(i["filename"]).name for i in chain] == [
        "active.qcow2",
        "top.qcow2",
        "mid.qcow2",
        "base.qcow2",
    ]
    assert [i["virtual-size"] for i in chain] == [5 * M, 5 * M, 4 * M, 3 * M]
    depths = {e["depth"] for e in qemu_map(path)}
    assert depths >= {0, 1, 2, 3}, depths


# --- sizes that differ along the chain ------------------------------------------


@_case("top_larger")
def _b_top_larger(d):
    base = create(_p(d, "base.qcow2"), 2 * M)
    apply_ops(base, [("w", 0, 2 * M, "base")])
    top = create(_p(d, "top.qcow2"), 3 * M + 1536, backing="base.qcow2")
    apply_ops(top, [("w", 2 * M - 1000, 2000, "top"), ("w", 3 * M, 1536, 0x1F)])
    return top


@_claim("top_larger")
def _c_top_larger(path, chain):
    assert chain[0]["virtual-size"] == 3 * M + 1536 > chain[1]["virtual-size"]


@_case("short_intermediate")
def _b_274(d):
    # QEMU iotest 274: base 2M <- mid 1M <- top 2M; [1M,2M) of top reads zeros.
    base = create(_p(d, "base.qcow2"), 2 * M)
    create(_p(d, "mid.qcow2"), M, backing="base.qcow2")
    top = create(_p(d, "top.qcow2"), 2 * M, backing="mid.qcow2")
    apply_ops(base, [("w", 0, 2 * M, 0x01)])
    apply_ops(top, [("w", 1536 * K, 4 * K, 0x0C)])
    return top


@_claim("short_intermediate")
def _c_274(path, chain):
    assert [i["virtual-size"] for i in chain] == [2 * M, M, 2 * M]
    data = convert_raw(path)
    assert data[:M] == b"\x01" * M and data[M : M + 4 * K] == bytes(4 * K)


@_case("short_unaligned")
def _b_short_unaligned(d):
    base = create(_p(d, "base.qcow2"), 512 * K)
    apply_ops(base, [("w", 0, 512 * K, "base")])
    mid = create(_p(d, "mid.qcow2"), 253 * K, backing="base.qcow2")
    apply_ops(mid, [("w", 240 * K, 13 * K, "mid")])  # up to mid's unaligned EOF
    top = create(_p(d, "top.qcow2"), 512 * K, backing="mid.qcow2", cluster_size=4 * K)
    apply_ops(top, [("w", 250 * K, 2 * K, 0x0D), ("w", 400 * K, 512, 0x0E)])
    return top


@_claim("short_unaligned")
def _c_short_unaligned(path, chain):
    assert chain[1]["virtual-size"] == 253 * K
    assert (253 * K) % chain[1]["cluster-size"]
    data = convert_raw(path)
    assert data[253 * K : 256 * K] == bytes(3 * K)


@_case("backing_larger")
def _b_backing_larger(d):
    base = create(_p(d, "base.qcow2"), 4 * M)
    apply_ops(base, [("w", 0, 4 * M, "base")])
    top = create(_p(d, "top.qcow2"), 2 * M, backing="base.qcow2")
    apply_ops(top, [("w", 2 * M - 4 * K, 4 * K, 0x2E)])
    return top


@_claim("backing_larger")
def _c_backing_larger(path, chain):
    assert chain[0]["virtual-size"] == 2 * M < chain[1]["virtual-size"] == 4 * M


# --- internal snapshots ---------------------------------------------------------


@_case("snapshot")
def _b_snapshot(d):
    img = create(_p(d, "snap.qcow2"), 4 * M, cluster_size=16 * K)
    apply_ops(img, [("w", 0, 2 * M, "before"), ("w", 3 * M, 64 * K, 0x5A)])
    qemu_img("snapshot", "-c", "snap1", img)
    apply_ops(
        img,
        [
            ("w", 100 * K + 5, 50 * K, "after"),  # COW of shared clusters
            ("d", M, 64 * K),
            ("w", 2 * M + 32 * K, 32 * K, 0x5B),
        ],
    )
    qemu_img("snapshot", "-c", "snap2", img)
    apply_ops(img, [("w", 0, 16 * K, 0x5C), ("z", 3 * M, 16 * K)])
    return img


@_claim("snapshot")
def _c_snapshot(path, chain):
    assert [s["name"] for s in chain[0].get("snapshots", [])] == ["snap1", "snap2"]
    assert convert_raw(path, "snap1") != convert_raw(path)


# --- an L1 table longer than the virtual size needs (valid: after a shrink) -------


@_case("shrunk_l1")
def _b_shrunk(d):
    img = create(_p(d, "shrunk.qcow2"), 8 * M, cluster_size=512)
    apply_ops(img, [("w", 0, 600 * K, "shrunk"), ("w", 7 * M, 64 * K, 0x3D)])
    qemu_img("resize", "-q", "--shrink", img, str(M))
    return img


@_claim("shrunk_l1")
def _c_shrunk(path, chain):
    lay = qcow2_layout(path)
    assert lay["size"] == M
    assert lay["l1_size"] > l1_entries_needed(M, lay["cluster_bits"])


MATRIX_CASES: list[str] = list(_BUILDERS)


def build_case(name, directory) -> str:
    """Build coverage-matrix case NAME in DIRECTORY; return the active image's
    absolute path. Images are built with qemu-img/qemu-io only."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return str(Path(_BUILDERS[name](directory)).resolve())


def check_case_claims(name, path):
    """Assert that a built case has the property its name claims, that every qcow2
    layer passes ``qemu-img check`` cleanly, and that backing formats are recorded."""
    chain = qemu_info_chain(path)
    for layer in chain:
        if layer["format"] == "qcow2":
            rc, rep = qemu_check(layer["filename"])
            assert rc == 0, (layer["filename"], rc, rep)
            assert rep.get("check-errors", 0) == 0 and not rep.get("leaks"), rep
        if "backing-filename" in layer:
            assert layer.get("backing-filename-format"), layer  # always -F
    _CLAIMS.get(name, lambda p, c: None)(path, chain)
    return chain
