# shellcheck shell=bash
# Set-up shared by scripts/test.sh and scripts/demo.sh (sourced, not executed).
#
# On a fresh Debian machine, as root, non-interactively and idempotently:
#   1. installs the Debian packages that are missing (one `apt-get update` first);
#   2. creates .venv if missing and runs `pip install -e '.[test]'` whenever
#      pyproject.toml is newer than the stamp file .venv/.qcowfs-installed;
#   3. builds the test guest's kernel and initramfs if missing (scripts/guest/build.sh:
#      Debian's cloud kernel unpacked into .cache/guest, never installed on the host);
#   4. loads the fuse module (best effort) and activates the venv.
# When everything is already there it only runs dpkg-query and a few stats: well under a
# second.

QCOWFS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# fuse3/libfuse3-dev/pkg-config: FUSE and building pyfuse3; gcc/libc6-dev/python3-dev:
# pyfuse3 is compiled by pip; qemu-utils (qemu-img, qemu-io) and qemu-system-common
# (qemu-storage-daemon): the reference the tests compare against; fio: benchmarks;
# e2fsprogs/util-linux: file systems on the mounted disk in later tests;
# qemu-system-x86/busybox-static: the Linux guest of tests/test_guest_vm.py (TCG, no KVM).
QCOWFS_DEB_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc libc6-dev python3-dev python3-venv
                     qemu-utils qemu-system-common fio e2fsprogs util-linux
                     qemu-system-x86 busybox-static)

qcowfs_log() { printf 'setup: %s\n' "$*" >&2; }

qcowfs_install_debian_packages() {
    local missing=() pkg status
    for pkg in "${QCOWFS_DEB_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [ "$status" = installed ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        qcowfs_log "missing Debian packages (${missing[*]}) and not root: install them first"
        return 1
    fi
    qcowfs_log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

qcowfs_setup_venv() {
    local venv="$QCOWFS_ROOT/.venv" stamp="$QCOWFS_ROOT/.venv/.qcowfs-installed"
    if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
        qcowfs_log "creating $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        rm -f "$stamp"
    fi
    if [ ! -e "$stamp" ] || [ "$QCOWFS_ROOT/pyproject.toml" -nt "$stamp" ]; then
        qcowfs_log "pip install -e '.[test]'"
        # compat mode: a plain path entry (.pth) instead of an import hook, which costs
        # every qcowfs command ~15-40 ms of start-up
        (cd "$QCOWFS_ROOT" && "$venv/bin/python" -m pip install -q \
            --config-settings editable_mode=compat -e '.[test]')
        touch "$stamp"
    fi
    # byte-compile the project as an installed package would be (pip compiles what it
    # installs, not an editable tree): only stale files, so it is quick; even where
    # PYTHONDONTWRITEBYTECODE is set, so commands do not compile their modules each start
    (cd "$QCOWFS_ROOT" && PYTHONDONTWRITEBYTECODE= "$venv/bin/python" -m compileall -q \
        qcow commit fusefs scripts >/dev/null)
}

qcowfs_load_fuse() {
    [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
    [ -e /dev/fuse ] || qcowfs_log "warning: /dev/fuse is missing; mount tests cannot run"
}

qcowfs_install_debian_packages
qcowfs_setup_venv
"$QCOWFS_ROOT/scripts/guest/build.sh"
qcowfs_load_fuse
# shellcheck disable=SC1091
. "$QCOWFS_ROOT/.venv/bin/activate"
