"""The reader's memory bound and O(1) open; the timings themselves
are measured beside QEMU by scripts/bench.py, never asserted here.

- Opening a chain reads no table in full: a 1 TiB image opens and reads at both ends.
- Reading uses a bounded L2 cache: touching every L2 table of a 1 TiB image (128 MiB of
  tables with 64 KiB clusters) grows the process by less than 64 MiB.
"""

import json
import subprocess
import sys
import textwrap

import pytest
from qemu_helpers import M, apply_ops, create, qemu_img

import qcow

T = 1 << 40
L2_SPAN = 512 * M  # guest bytes mapped by one L2 table with 64 KiB clusters


@pytest.mark.slow
def test_open_1tib_and_read_both_ends(workdir):
    """Opening reads no table in full (its speed is measured in scripts/bench.py)."""
    img = create(str(workdir / "big.qcow2"), T)
    apply_ops(img, [("w", 0, 64 * 1024, 0x11), ("w", T - M, M, 0x12)])
    with qcow.open_chain(img) as chain:
        assert chain.virtual_size == T
        assert chain.read(0, 4096) == b"\x11" * 4096
        assert chain.read(T - 4096, 4096) == b"\x12" * 4096


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import qcow
    def status(key):   # VmRSS / VmHWM of this process in bytes (VmHWM: its peak RSS)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    img, span = sys.argv[1], int(sys.argv[2])
    with qcow.open_chain(img) as chain:
        chain.read(0, 4096)
        before = status("VmRSS")
        for rnd in range(2):
            for off in range(0, chain.virtual_size, span):
                data = chain.read(off + 8192 * (rnd + 1), 4096)
                assert data == bytes(4096), off
        # not ru_maxrss: Linux carries it over from the forking parent (pytest)
        peak = status("VmHWM")
    print(json.dumps({"before": before, "peak": peak}))
""")


@pytest.mark.slow
def test_reading_every_l2_table_of_1tib_holds_memory(workdir):
    img = str(workdir / "prealloc.qcow2")
    # every L2 table exists (2048 of them, 128 MiB), data clusters read as zeros
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, str(T))
    cp = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, img, str(L2_SPAN)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cp.returncode == 0, f"probe failed: {cp.stderr[-2000:]}"
    r = json.loads(cp.stdout)
    growth = r["peak"] - r["before"]
    print(
        f"\nreading 2048 L2 tables of 1 TiB: RSS {r['before'] / M:.1f} MiB after open, "
        f"peak {r['peak'] / M:.1f} MiB (+{growth / M:.1f} MiB)"
    )
    assert growth < 64 * M, f"reading grew the process by {growth / M:.1f} MiB ({r})"
