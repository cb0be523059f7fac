#!/usr/bin/env bash
# The qcowfs demo: installs what is missing (scripts/setup.sh), builds a sample chain
# base <- mid <- top <- active with qemu-img/qemu-io in a temporary directory, shows it
# with `qcowfs info` and `qcowfs map`, checks qcowfs against QEMU itself, mounts it,
# commits top and mid into base live while dd writes through the mount, unmounts and
# shows the reduced chain, then mounts again and ends with an active commit and pivot
# that leaves base alone. Exit 0 only when every check held.
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
    # background writers first: they keep the mounted file open
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
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

MNT=$DEMO_DIR/mnt
DISK=$MNT/disk.raw
EXPECTED=$DEMO_DIR/expected.raw

# dd_writes N: N random 64 KiB blocks written with dd (conv=fsync) through the mount and,
# identically, into the expected image (what the guest must read afterwards).
dd_writes() {
    local i off blk=$DEMO_DIR/block
    for ((i = 0; i < $1; i++)); do
        off=$(( (RANDOM * 32768 + RANDOM) % (DISK_SIZE / 65536) ))
        head -c 65536 /dev/urandom > "$blk"
        dd if="$blk" of="$DISK" bs=65536 seek="$off" count=1 conv=notrunc,fsync status=none
        dd if="$blk" of="$EXPECTED" bs=65536 seek="$off" count=1 conv=notrunc status=none
        sleep 0.05
    done
}

compare_with_expected() {
    if cmp -s "$1" "$EXPECTED"; then
        say "identical: $1 and the expected image"
    else
        say "MISMATCH: $1 differs from the expected image"; return 1
    fi
}

step_mount() {
    mkdir -p "$MNT"
    cp "$DEMO_DIR/reference.raw" "$EXPECTED"
    run qcowfs mount "$ACTIVE" "$MNT"
    on_exit "qcowfs unmount '$MNT' --cancel-jobs 2>/dev/null || fusermount3 -u -z '$MNT' 2>/dev/null"
    run ls -l "$MNT"
    run dd if="$DISK" of=/dev/null bs=1M status=none
    compare_with_expected "$DISK"
}

step_live_commit() {
    say "Committing top and mid into base while dd writes through the mount"
    dd_writes 40 &
    local writer=$!
    run qcowfs commit "$MNT" --top "$TOP" --speed $((16 * MIB)) --wait
    wait "$writer"
    run qcowfs jobs "$MNT"
    compare_with_expected "$DISK"
}

step_unmount() {
    run qcowfs unmount "$MNT"
    run qemu-img info --backing-chain "$ACTIVE" | grep -E '^(image|backing file):'
    [ "$(qemu-img info --backing-chain "$ACTIVE" | grep -c '^image:')" -eq 2 ] || {
        say "the chain was not reduced to base <- active"; return 1; }
    run qemu-img check -q "$ACTIVE"
    run qemu-img check -q "$BASE"
    run qemu-img convert -O raw "$ACTIVE" "$DEMO_DIR/after.raw"
    compare_with_expected "$DEMO_DIR/after.raw"
}

step_active_commit() {
    say "Mounting base <- active again; active commit with pivot while dd writes"
    run qcowfs mount "$ACTIVE" "$MNT"
    dd_writes 40 &
    local writer=$!
    run qcowfs commit "$MNT" --active --pivot --wait
    wait "$writer"
    dd_writes 5
    compare_with_expected "$DISK"
    run qcowfs unmount "$MNT"
    say "After the pivot the guest's disk is base alone:"
    run qemu-img info "$BASE" | grep -E '^(image|backing file|virtual size):'
    ! qemu-img info "$BASE" | grep -q '^backing file:' || { say "base still has a backing file"; return 1; }
    run qemu-img check -q "$BASE"
    run qemu-img convert -O raw "$BASE" "$DEMO_DIR/final.raw"
    compare_with_expected "$DEMO_DIR/final.raw"
}

DEMO_STEPS=(build_chain show_info show_map verify_map verify_read mount live_commit unmount
            active_commit)

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
