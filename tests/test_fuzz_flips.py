"""Random byte flips in a valid chain's metadata never crash the reader.

Hypothesis flips bytes in the header and extensions, the backing name, the L1 table,
the refcount table, an L2 table (plain and compressed entries) and the snapshot table
of a two-layer chain, then opens it and reads. Allowed outcomes: a ``QcowError``, an
``OSError`` with errno EIO for a read, or bytes of the right length — and where the
flips only touched structures a read never needs (refcount and snapshot tables), bytes
equal to the original disk. Anything else (another exception, a hang, unbounded memory)
fails. Each example runs under a time bound and an address-space bound.
"""

import contextlib
import errno
import os
import resource
import shutil
import signal
import tempfile
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from qemu_helpers import K, M, apply_ops, convert_raw, create, make_raw, qcow2_layout, qemu_img

import qcow
from qcow.errors import QcowError

EXAMPLE_SECONDS = 10
EXAMPLE_EXTRA_MEMORY = 2 << 30
READ_LIMIT = 4 * M


class Hang(BaseException):
    """Raised by SIGALRM; a BaseException so a broad ``except Exception`` cannot eat it."""


@contextlib.contextmanager
def time_bound(seconds):
    """SIGALRM after SECONDS. pytest-timeout (signal method) also uses ITIMER_REAL:
    its remaining time is put back afterwards."""

    def on_alarm(signum, frame):
        raise Hang(f"no result within {seconds}s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            left = old_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001), old_interval)


def _vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def memory_bound(extra):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """base.qcow2 (compressed clusters) <- active.qcow2 (data, zero clusters, a
    snapshot, a persistent bitmap), and the byte regions worth flipping."""
    d = tmp_path_factory.mktemp("fuzz-pristine")
    src = make_raw(str(d / "src.raw"), 2 * M, [(0, M, "fuzzbase"), (M + 64 * K, 256 * K, 0x21)])
    base = str(d / "base.qcow2")
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", src, base)
    os.unlink(src)
    active = create(str(d / "active.qcow2"), 2 * M, backing="base.qcow2")
    apply_ops(
        active,
        [("w", 64 * K, 100 * K, "fuzztop"), ("z", 0, 64 * K), ("w", M + 512 * K, 64 * K, 0x31)],
    )
    qemu_img("snapshot", "-c", "s1", active)
    apply_ops(active, [("w", 64 * K, 4 * K, 0x32)])
    qemu_img("bitmap", "--add", active, "b0")

    regions = []  # (file, start, length, neutral)
    for name in ("active.qcow2", "base.qcow2"):
        lay = qcow2_layout(str(d / name))
        hdr_end = lay["extensions_end"]
        if lay["backing_file_offset"]:
            hdr_end = max(hdr_end, lay["backing_file_offset"] + lay["backing_file_size"])
        regions.append((name, 0, hdr_end, False))
        regions.append((name, lay["l1_table_offset"], 8 * lay["l1_size"], False))
        with open(d / name, "rb") as f:
            f.seek(lay["refcount_table_offset"])
            rt = f.read(lay["refcount_table_clusters"] * lay["cluster_size"])
        used = max(i for i in range(0, len(rt), 8) if any(rt[i : i + 8])) + 8
        regions.append((name, lay["refcount_table_offset"], max(used, 64), True))
        l2 = lay["l2_tables"][0]
        entries = lay["compressed_entries"] + lay["data_entries"] + lay["zero_entries"]
        last = max(where for where, _, _ in entries if l2 <= where < l2 + lay["cluster_size"])
        regions.append((name, l2, last + 8 - l2, False))
        if lay["nb_snapshots"]:
            regions.append((name, lay["snapshots_offset"], 120, True))
    assert len(regions) >= 9
    return d, regions, convert_raw(active)


def exercise(path, want, neutral):
    """Open and read; return a short outcome label. Raises on anything not allowed."""
    try:
        chain = qcow.open_chain(path)
    except QcowError as e:
        assert str(e) and "\n" not in str(e)
        return "refused"
    outcome = "data"
    with chain:
        vs = chain.virtual_size
        assert isinstance(vs, int) and vs >= 0
        assert chain.layers and all(isinstance(la.path, str) for la in chain.layers)
        n = min(vs, READ_LIMIT)
        for off in range(0, n, 256 * K):
            ln = min(256 * K, n - off)
            try:
                got = chain.read(off, ln)
            except QcowError:
                outcome = "error"
                continue
            except OSError as e:
                assert e.errno == errno.EIO, f"read({off}, {ln}): {e!r}"
                outcome = "eio"
                continue
            assert isinstance(got, bytes) and len(got) == ln, (off, ln, type(got))
            if neutral:
                assert got == want[off : off + ln], f"read({off}, {ln}) changed by a neutral flip"
        span = min(vs, 8 * M)
        if span:
            try:
                ext = chain.block_status(0, span)
            except QcowError:
                pass
            except OSError as e:
                assert e.errno == errno.EIO, repr(e)
            else:
                pos = 0
                for e in ext:
                    assert e.start == pos and e.length > 0, ext
                    pos += e.length
                assert pos == span, ext
    return outcome


flip = st.tuples(
    st.integers(0, 10_000),  # region (modulo)
    st.integers(0, 1 << 31),  # position in the region (modulo)
    st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]), st.integers(1, 255)),
)


@pytest.mark.slow
@settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(flips=st.lists(flip, min_size=1, max_size=4))
def test_flips_give_a_clean_error_or_data(pristine, flips):
    src, regions, want = pristine
    work = tempfile.mkdtemp(prefix="qcowfs-fuzz-")
    try:
        for name in ("active.qcow2", "base.qcow2"):
            shutil.copyfile(src / name, os.path.join(work, name))
        neutral = True
        for r, pos, mask in flips:
            name, start, length, is_neutral = regions[r % len(regions)]
            neutral = neutral and is_neutral
            where = start + pos % length
            with open(os.path.join(work, name), "r+b") as f:
                f.seek(where)
                byte = f.read(1)[0]
                f.seek(where)
                f.write(bytes([byte ^ mask]))
        with memory_bound(EXAMPLE_EXTRA_MEMORY), time_bound(EXAMPLE_SECONDS):
            outcome = exercise(os.path.join(work, "active.qcow2"), want, neutral)
        event(f"outcome: {outcome}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_unflipped_chain_reads_back(pristine):
    """The fuzz baseline itself: the pristine chain opens and reads exactly."""
    src, regions, want = pristine
    assert exercise(str(src / "active.qcow2"), want, True) == "data"
