#!/usr/bin/env bash
# The qcowfs demo: installs what is missing (scripts/setup.sh), builds a sample chain
# base <- mid <- top <- active with qemu-img/qemu-io in a temporary directory, shows it
# with `qcowfs info` and `qcowfs map`, and checks qcowfs against QEMU itself.
# Exit 0 only when every check held.
#
# The demo is a list of steps (DEMO_STEPS below), each a function `step_<name>` that
# returns non-zero on failure. Later features add their steps (mount, dd, live commit,
# unmount) by defining a function and appending its name to DEMO_STEPS; cleanup work
# (e.g. unmounting) is registered with `on_exit "command ..."`.
#
# Environment: QCOWFS_DEMO_KEEP=1 keeps the temporary directory for inspection.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh

DEMO_DIR=$(mktemp -d "${TMPDIR:-/tmp}/qcowfs-demo.XXXXXX")
MIB=$((1 << 20))
DISK_SIZE=$((64 * MIB))
BASE=$DEMO_DIR/base.qcow2
MID=$DEMO_DIR/mid.qcow2
TOP=$DEMO_DIR/top.qcow2
ACTIVE=$DEMO_DIR/active.qcow2

# --------------------------------------------------------------- plumbing
EXIT_HOOKS=()
PASSED=()
CURRENT=""
DEMO_STEPS=()
on_exit() { EXIT_HOOKS+=("$1"); }
cleanup() {
    local rc=$? i s
    for ((i = ${#EXIT_HOOKS[@]} - 1; i >= 0; i--)); do
        eval "${EXIT_HOOKS[i]}" || true
    done
    if [ "${QCOWFS_DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: kept $DEMO_DIR"
    else
        rm -rf "$DEMO_DIR"
    fi
    echo
    echo "demo summary:"
    for s in "${DEMO_STEPS[@]}"; do
        if [[ " ${PASSED[*]} " == *" $s "* ]]; then
            echo "  ok       $s"
        elif [ "$s" = "$CURRENT" ]; then
            echo "  FAILED   $s"
        else
            echo "  skipped  $s"
        fi
    done
    if [ "$rc" -eq 0 ] && [ -z "$CURRENT" ]; then
        echo "demo: every check held"
    else
        echo "demo: FAILED (exit $rc)"
        [ "$rc" -ne 0 ] || rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT

say() { printf '%s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
qio() { qemu-io -f qcow2 "$@" >/dev/null; }

# --------------------------------------------------------------- the steps
step_build_chain() {
    say "Building base <- mid <- top <- active (${DISK_SIZE} bytes, 64 KiB clusters) in $DEMO_DIR"
    cd "$DEMO_DIR"
    run qemu-img create -q -f qcow2 base.qcow2 "$DISK_SIZE"
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    run qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 active.qcow2
    # distinct patterns per layer, overlapping so every layer shows through somewhere
    qio -c "write -P 0x11 0 $((48 * MIB))" base.qcow2
    qio -c "write -P 0x22 $((8 * MIB)) $((16 * MIB))" -c "write -z $((40 * MIB)) $((2 * MIB))" mid.qcow2
    qio -c "write -P 0x33 $((20 * MIB)) $((12 * MIB))" -c "write -P 0x3c $((50 * MIB)) 65536" top.qcow2
    qio -c "write -P 0x44 $((30 * MIB)) $((4 * MIB))" -c "write -P 0x4d 12345 777" \
        -c "write -z $((10 * MIB)) $((MIB))" active.qcow2
    cd - >/dev/null
    say "patterns: base 0x11 [0,48M), mid 0x22 [8M,24M) + zeros [40M,42M),"
    say "          top 0x33 [20M,32M) + 0x3c at 50M, active 0x44 [30M,34M) + zeros [10M,11M)"
}

step_show_info() {
    run qcowfs info "$ACTIVE"
}

step_show_map() {
    run qcowfs map "$ACTIVE"
}

step_verify_map() {
    say "Comparing 'qcowfs map --json' with 'qemu-img map --output=json'"
    python - "$ACTIVE" <<'PY'
import json, subprocess, sys
img = sys.argv[1]
ours = json.loads(subprocess.run(["qcowfs", "map", "--json", img], check=True,
                                 capture_output=True, text=True).stdout)
theirs = json.loads(subprocess.run(["qemu-img", "map", "--output=json", img], check=True,
                                   capture_output=True, text=True).stdout)
if ours != theirs:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            print(f"first difference at extent {i}:\n  qcowfs:   {a}\n  qemu-img: {b}")
            break
    print(f"qcowfs: {len(ours)} extents, qemu-img: {len(theirs)} extents")
    sys.exit(1)
print(f"identical: {len(ours)} extents")
PY
}

step_verify_read() {
    say "Comparing qcow.open_chain(...).read of the whole disk with 'qemu-img convert -O raw'"
    run qemu-img convert -O raw "$ACTIVE" "$DEMO_DIR/reference.raw"
    python - "$ACTIVE" "$DEMO_DIR/reference.raw" <<'PY'
import hashlib, sys, time
import qcow
img, ref = sys.argv[1], sys.argv[2]
h_ours, h_ref = hashlib.sha256(), hashlib.sha256()
t = time.monotonic()
bad = None
with qcow.open_chain(img) as chain, open(ref, "rb") as f:
    step = 1 << 20
    for off in range(0, chain.virtual_size, step):
        n = min(step, chain.virtual_size - off)
        a, b = chain.read(off, n), f.read(n)
        h_ours.update(a)
        h_ref.update(b)
        if a != b and bad is None:
            bad = off
    size = chain.virtual_size
    tail = f.read()
secs = time.monotonic() - t
print(f"qcowfs   sha256 {h_ours.hexdigest()}  ({size >> 20} MiB in {secs:.2f} s)")
print(f"qemu-img sha256 {h_ref.hexdigest()}")
if bad is not None or tail:
    print(f"MISMATCH in the MiB at {bad}" if bad is not None else "reference is longer")
    sys.exit(1)
PY
}

DEMO_STEPS=(build_chain show_info show_map verify_map verify_read)

# --------------------------------------------------------------- run them
# Each step runs in this shell under `set -e`: the first failing command ends the demo,
# and the EXIT trap runs the registered hooks and prints the summary.
for s in "${DEMO_STEPS[@]}"; do
    CURRENT=$s
    printf '\n=== %s\n' "$s"
    "step_$s"
    PASSED+=("$s")
done
CURRENT=""
