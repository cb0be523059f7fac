"""Hostile and broken images are input, not bugs.

Each case is a valid image built with qemu-img and then corrupted in one place with
struct. Faults in what opening reads (header, extensions, L1/refcount/snapshot tables,
the backing chain) make ``qcowfs info``/``qcowfs map`` fail with one clear line that
names the file, a non-zero exit and no traceback, and ``qcow.open_chain`` raise a
``QcowError``. Faults found only when a cluster is read (a bad L2 entry, a bad
compressed descriptor) are an ``OSError(EIO)`` for that read and nothing else. No case
changes a byte of any file.
"""

import errno
import os
import re
from dataclasses import dataclass, field

import pytest
from qemu_helpers import (
    COMPRESSED,
    HDR_BACKING_OFFSET,
    HDR_BACKING_SIZE,
    HDR_CLUSTER_BITS,
    HDR_INCOMPATIBLE,
    HDR_L1_OFFSET,
    HDR_L1_SIZE,
    HDR_LENGTH,
    HDR_NB_SNAPSHOTS,
    HDR_REFCOUNT_ORDER,
    HDR_REFTABLE_OFFSET,
    HDR_SIZE,
    HDR_SNAPSHOTS_OFFSET,
    HDR_VERSION,
    L2_OFFSET_MASK,
    K,
    M,
    apply_ops,
    convert_raw,
    create,
    make_raw,
    patch,
    patch_bytes,
    qcow2_layout,
    qemu_img,
    run_qcowfs,
    sha256_tree,
)

import qcow
from qcow.errors import QcowError

G = 1 << 30


@dataclass
class Built:
    image: str  # what the user passes to qcowfs
    names: tuple = ()  # file names any of which the error line may name
    bad_offset: int | None = None  # EIO cases: a guest offset whose read must fail
    good_offset: int | None = None  # EIO cases: a guest offset that must still read fine
    pristine: bytes | None = None  # EIO cases: the disk before the corruption
    extra: dict = field(default_factory=dict)


CASES = {}


def case(name, *, kind="open", fault=r".", builder=None):
    """kind "open": refused at open. kind "eio": EIO when the bad cluster is read.
    fault: a regex (case-insensitive) the error line must match: it names the fault."""

    def deco(fn):
        CASES[name] = (kind, fault, fn)
        return fn

    return deco(builder) if builder else deco


def _valid(d, name, size=4 * M, **opts):
    """A valid image with data in several clusters (no backing file)."""
    path = create(str(d / name), size, **opts)
    apply_ops(path, [("w", 0, 256 * K, "valid"), ("w", 2 * M, 64 * K, 0x42)])
    return path


def _img(d, name):
    return _valid(d, f"{name}.qcow2")


def _header_patch(name, off, fmt, value, fault):
    def build(d):
        p = _img(d, name)
        patch(p, off, fmt, value(qcow2_layout(p)) if callable(value) else value)
        return Built(p)

    case(name, fault=fault, builder=build)


def _beyond_eof(lay):
    return (lay["file_size"] + G) // lay["cluster_size"] * lay["cluster_size"]


# --- the header ------------------------------------------------------------------
_header_patch("bad_magic", 0, "I", 0x514649FA, r"magic|not a qcow2|format")
_header_patch("version4", HDR_VERSION, "I", 4, r"version")
_header_patch("version1", HDR_VERSION, "I", 1, r"version")
_header_patch("cluster_bits8", HDR_CLUSTER_BITS, "I", 8, r"cluster")
_header_patch("cluster_bits30", HDR_CLUSTER_BITS, "I", 30, r"cluster")
_header_patch("header_length_short", HDR_LENGTH, "I", 96, r"header")
_header_patch("refcount_order7", HDR_REFCOUNT_ORDER, "I", 7, r"refcount")
_header_patch(
    "unknown_incompatible_bit",
    HDR_INCOMPATIBLE,
    "Q",
    lambda lay: lay["incompatible"] | 1 << 5,
    r"incompatible|feature|bit 5",
)

# --- tables beyond EOF, misaligned, overlapping the header ----------------------------
_header_patch("l1_beyond_eof", HDR_L1_OFFSET, "Q", _beyond_eof, r"l1")
_header_patch("l1_misaligned", HDR_L1_OFFSET, "Q", lambda lay: lay["l1_table_offset"] + 8, r"l1")
_header_patch("l1_overlaps_header", HDR_L1_OFFSET, "Q", 0, r"l1")
_header_patch("l1_size_absurd", HDR_L1_SIZE, "I", 0x1000_0000, r"l1")
# the virtual size needs more L1 entries than the table has
_header_patch("l1_too_small_for_size", HDR_SIZE, "Q", 1 << 50, r"l1|size")
_header_patch("refcount_table_beyond_eof", HDR_REFTABLE_OFFSET, "Q", _beyond_eof, r"refcount")
_header_patch(
    "refcount_table_misaligned",
    HDR_REFTABLE_OFFSET,
    "Q",
    lambda lay: lay["refcount_table_offset"] + 512,
    r"refcount",
)
_header_patch("refcount_table_overlaps_header", HDR_REFTABLE_OFFSET, "Q", 0, r"refcount")


@case("snapshot_table_beyond_eof", fault=r"snapshot")
def _b_snap_eof(d):
    p = _img(d, "snapshot_table_beyond_eof")
    lay = qcow2_layout(p)
    patch(p, HDR_NB_SNAPSHOTS, "I", 1)
    patch(p, HDR_SNAPSHOTS_OFFSET, "Q", _beyond_eof(lay))
    return Built(p)


@case("unknown_incompatible_bit_named", fault=r"frobnication")
def _b_named_bit(d):
    """An unknown incompatible bit named in the feature-name table: the error uses the name."""
    p = _img(d, "unknown_incompatible_bit_named")
    lay = qcow2_layout(p)
    ext = [e for e in lay["extensions"] if e[0] == 0x6803F857]
    assert ext, "QEMU wrote no feature-name table"
    _, pos, length = ext[0]
    with open(p, "rb") as f:
        f.seek(pos + 8)
        table = f.read(length)
    for i in range(0, length, 48):
        if table[i] == 0 and table[i + 1] == 4:  # incompatible bit 4 (extended L2)
            patch_bytes(p, pos + 8 + i, bytes([0, 5]) + b"frobnication".ljust(46, b"\0"))
            break
    else:
        raise AssertionError("no entry for incompatible bit 4")
    patch(p, HDR_INCOMPATIBLE, "Q", lay["incompatible"] | 1 << 5)
    return Built(p)


# --- backing file name --------------------------------------------------------------


def _with_backing(d, name):
    base = _valid(d, f"{name}-base.qcow2")
    top = create(str(d / f"{name}.qcow2"), 4 * M, backing=os.path.basename(base))
    apply_ops(top, [("w", 64 * K, 4 * K, 0x17)])
    return top, base


@case("backing_name_too_long", fault=r"backing")
def _b_name_long(d):
    top, _ = _with_backing(d, "backing_name_too_long")
    patch(top, HDR_BACKING_SIZE, "I", 1024)
    return Built(top)


@case("backing_name_past_cluster0", fault=r"backing")
def _b_name_past(d):
    top, _ = _with_backing(d, "backing_name_past_cluster0")
    lay = qcow2_layout(top)
    patch(top, HDR_BACKING_OFFSET, "Q", lay["cluster_size"] - 4)
    return Built(top)


@case("backing_loop", fault=r"loop|cycle|recurs|itself")
def _b_loop(d):
    a = _valid(d, "loop-a.qcow2")
    b = create(str(d / "loop-b.qcow2"), 4 * M, backing="loop-a.qcow2")
    qemu_img("rebase", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", a)
    return Built(b, names=("loop-a.qcow2",))


@case("backing_self_loop", fault=r"loop|cycle|recurs|itself")
def _b_self_loop(d):
    a = _valid(d, "self.qcow2")
    qemu_img("rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", a)
    return Built(a)


@case("missing_backing", fault=r"no such file|missing|not found|does not exist|cannot open")
def _b_missing(d):
    top, base = _with_backing(d, "missing_backing")
    os.unlink(base)
    return Built(top, names=(os.path.basename(base),))


@case("missing_backing_deeper", fault=r"no such file|missing|not found|does not exist|cannot open")
def _b_missing_deep(d):
    top, base = _with_backing(d, "missing_deep_mid")
    active = create(str(d / "missing_backing_deeper.qcow2"), 4 * M, backing=os.path.basename(top))
    os.unlink(base)
    return Built(active, names=(os.path.basename(base), os.path.basename(top)))


@case("external_data_file", fault=r"data.?file|external")
def _b_datafile(d):
    p = str(d / "external_data_file.qcow2")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'external_data_file.raw'}", p, "1M"
    )
    return Built(p)


@case("truncated_header", fault=r"header|truncat|short|end of file|eof")
def _b_header_truncated(d):
    """A file cut inside its header."""
    p = _img(d, "truncated_header")
    with open(p, "r+b") as f:
        f.truncate(50)
    return Built(p)


# --- faults found only when a cluster is read: EIO for that read -----------------------


def _entry_patch(name, image, entries, *, bad, good, value):
    """An "eio" case: entry number `bad` of qcow2_layout's `entries` (data_entries or
    compressed_entries) of image(d, name) set to value(entry, layout); the guest cluster
    of entry number `good` must still read fine."""

    def build(d):
        p = image(d, name)
        pristine = convert_raw(p)
        lay = qcow2_layout(p)
        where, guest, v = lay[entries][bad]
        good_offset = lay[entries][good][1]
        assert good_offset != guest
        patch(p, where, "Q", value(v, lay))
        return Built(p, bad_offset=guest, good_offset=good_offset, pristine=pristine)

    case(name, kind="eio", builder=build)


def _compressed(d, name):
    src = make_raw(str(d / f"{name}.src"), 2 * M, [(0, 2 * M, "compressible")])
    p = str(d / f"{name}.qcow2")
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", src, p)
    os.unlink(src)
    return p


def _compressed_entry(lay, nsect, host):
    """A compressed cluster descriptor: host offset `host`, and `nsect` in the field of
    additional 512-byte sectors (bits x to 61, x = 62 - (cluster_bits - 8))."""
    x = 62 - (lay["cluster_bits"] - 8)
    return COMPRESSED | (nsect << x) | host


_entry_patch(
    "l2_entry_outside_file",
    _img,
    "data_entries",
    bad=0,
    good=-1,
    value=lambda v, lay: (v & ~L2_OFFSET_MASK) | (_beyond_eof(lay) & L2_OFFSET_MASK),
)
_entry_patch(
    "l2_entry_misaligned",
    _img,
    "data_entries",
    bad=0,
    good=-1,
    value=lambda v, lay: v + 512,  # host offset not cluster-aligned
)
_entry_patch(
    "compressed_past_eof",
    _compressed,
    "compressed_entries",
    bad=3,
    good=0,
    # runs ~5 KiB past the end of the file
    value=lambda v, lay: _compressed_entry(lay, 10, lay["file_size"] - 100),
)
_entry_patch(
    "compressed_garbage",
    _compressed,
    "compressed_entries",
    bad=2,
    good=0,
    # points at the refcount table: not a deflate stream of one cluster
    value=lambda v, lay: _compressed_entry(lay, 1, lay["refcount_table_offset"]),
)


@case("l2_table_beyond_eof", kind="either")
def _b_l2_table_eof(d):
    """An L1 entry pointing beyond EOF: only reads through that L2 table fail."""
    p = str(d / "l2_table_beyond_eof.qcow2")
    create(p, 4 * M, cluster_size=4 * K)  # 4K clusters: one L2 table maps 2 MiB
    apply_ops(p, [("w", 0, 64 * K, "low"), ("w", 3 * M, 64 * K, "high")])
    pristine = convert_raw(p)
    lay = qcow2_layout(p)
    assert lay["l1"][0] and lay["l1"][1]
    patch(p, lay["l1_table_offset"] + 8, "Q", (1 << 63) | _beyond_eof(lay))
    return Built(p, bad_offset=3 * M, good_offset=0, pristine=pristine)


OPEN_CASES = [n for n, (k, _, _) in CASES.items() if k == "open"]
EIO_CASES = [n for n, (k, _, _) in CASES.items() if k == "eio"]
EITHER_CASES = [n for n, (k, _, _) in CASES.items() if k == "either"]


@pytest.fixture
def bad(request, workdir):
    name = request.param
    kind, fault, build = CASES[name]
    built = build(workdir)
    built.extra["fault"] = fault
    built.extra["hashes"] = sha256_tree(workdir)
    built.extra["dir"] = workdir
    return built


def _assert_clean_failure(cp, built, what):
    out = cp.stdout + cp.stderr
    assert "Traceback" not in out, f"{what}: traceback\n{out}"
    assert cp.returncode != 0, f"{what}: exit 0\n{out}"
    err = cp.stderr.strip("\n")
    assert err and "\n" not in err, f"{what}: stderr is not exactly one line: {cp.stderr!r}"
    names = (os.path.basename(built.image), *built.names)
    assert any(n in err for n in names), f"{what}: {err!r} names none of {names}"
    assert re.search(built.extra["fault"], err, re.I), (
        f"{what}: {err!r} does not name the fault (/{built.extra['fault']}/)"
    )


@pytest.mark.parametrize("bad", OPEN_CASES, indirect=True)
@pytest.mark.parametrize("command", ["info", "map"])
def test_cli_refuses_cleanly(bad, command):
    cp = run_qcowfs(command, bad.image, timeout=60)
    _assert_clean_failure(cp, bad, f"qcowfs {command}")
    cp = run_qcowfs(command, "--json", bad.image, timeout=60)
    _assert_clean_failure(cp, bad, f"qcowfs {command} --json")
    assert sha256_tree(bad.extra["dir"]) == bad.extra["hashes"], "a file was modified"


@pytest.mark.parametrize("bad", OPEN_CASES, indirect=True)
def test_api_refuses_at_open(bad):
    with pytest.raises(QcowError) as ei:
        with qcow.open_chain(bad.image) as chain:
            chain.read(0, 512)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    names = (os.path.basename(bad.image), *bad.names)
    assert any(n in msg for n in names), msg
    assert sha256_tree(bad.extra["dir"]) == bad.extra["hashes"], "a file was modified"


@pytest.mark.parametrize("bad", EIO_CASES, indirect=True)
def test_eio_only_for_the_bad_cluster(bad):
    with qcow.open_chain(bad.image) as chain:
        with pytest.raises(OSError) as ei:
            chain.read(bad.bad_offset, 4096)
        assert ei.value.errno == errno.EIO, ei.value
        assert not isinstance(ei.value, QcowError)
        # the rest of the disk is still served, and served correctly
        g = bad.good_offset
        assert chain.read(g, 4096) == bad.pristine[g : g + 4096]
        # the same fault again: still EIO, no state was poisoned
        with pytest.raises(OSError) as ei2:
            chain.read(bad.bad_offset + 512, 512)
        assert ei2.value.errno == errno.EIO
        assert chain.read(g, 512) == bad.pristine[g : g + 512]
    assert sha256_tree(bad.extra["dir"]) == bad.extra["hashes"], "a file was modified"


@pytest.mark.parametrize("bad", EIO_CASES, indirect=True)
@pytest.mark.parametrize("command", ["info", "map"])
def test_eio_cases_cli(bad, command):
    """info/map read no data cluster: they work, or fail cleanly."""
    cp = run_qcowfs(command, "--json", bad.image, timeout=60)
    if cp.returncode != 0:
        built = bad
        built.extra["fault"] = r"."
        _assert_clean_failure(cp, built, f"qcowfs {command}")
    else:
        assert "Traceback" not in cp.stderr
        assert cp.stdout.strip()
    assert sha256_tree(bad.extra["dir"]) == bad.extra["hashes"], "a file was modified"


@pytest.mark.parametrize("bad", EITHER_CASES, indirect=True)
def test_refused_at_open_or_eio_at_read(bad):
    """An L1 entry is read at open, the L2 table it points to only later: refusing the
    image at open and failing that read with EIO are both within the contract."""
    try:
        chain = qcow.open_chain(bad.image)
    except QcowError as e:
        assert "\n" not in str(e) and os.path.basename(bad.image) in str(e), str(e)
    else:
        with chain:
            with pytest.raises(OSError) as ei:
                chain.read(bad.bad_offset, 4096)
            assert ei.value.errno == errno.EIO, ei.value
            g = bad.good_offset
            assert chain.read(g, 4096) == bad.pristine[g : g + 4096]
    for command in ("info", "map"):
        cp = run_qcowfs(command, "--json", bad.image, timeout=60)
        assert "Traceback" not in cp.stderr
        if cp.returncode != 0:
            bad.extra["fault"] = r"."
            _assert_clean_failure(cp, bad, f"qcowfs {command}")
    assert sha256_tree(bad.extra["dir"]) == bad.extra["hashes"], "a file was modified"
