#!/usr/bin/env bash
# Builds the Linux guest that tests/test_guest_vm.py boots under QEMU, from Debian packages
# only, into ${QCOWFS_GUEST_DIR:-<repo>/.cache/guest}:
#   vmlinuz       Debian's cloud kernel, taken out of its .deb with dpkg-deb -x: nothing is
#                 installed into the host's /boot or /lib/modules;
#   initramfs.gz  busybox-static, the kernel modules the virtio disk needs (ext4 is built in),
#                 and scripts/guest/init as /init.
# Needs busybox-static (scripts/setup.sh installs it) and root (dev/console is a device node).
# The kernel package is fetched once (apt-get download) and only what the guest needs is
# kept. Idempotent: when initramfs.gz is newer than its sources it does nothing.
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${QCOWFS_GUEST_DIR:-$(dirname "$(dirname "$here")")/.cache/guest}
busybox=/bin/busybox
modules=(virtio_pci virtio_blk)   # their dependencies come from modules.dep
meta=linux-image-cloud-amd64      # depends on the current versioned cloud kernel

log() { printf 'guest: %s\n' "$*" >&2; }
trap 'log "failed (line $LINENO: $BASH_COMMAND)"' ERR

up_to_date() {
    local src
    [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ] || return 1
    for src in "$here/init" "$here/build.sh" "$busybox"; do
        [ "$out/initramfs.gz" -nt "$src" ] || return 1
    done
}

# The versioned package the meta package points at (linux-image-6.1.0-57-cloud-amd64...).
kernel_package() {
    apt-cache depends "$meta" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1
}

# modules.dep paths of MODULES and of everything they depend on.
module_closure() {
    local dep=$1; shift
    local m
    for m in "$@"; do
        awk -v m="$m" -F': *' '{ n = $1; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n) }
            n == m { print $1; k = split($2, d, " "); for (i = 1; i <= k; i++) print d[i] }' \
            "$dep"
    done | sort -u
}

# $out/vmlinuz and $out/modules/lib/modules/<version>/: the kernel and the modules the
# guest needs, out of the kernel package (fetched once; the rest of it is not kept).
fetch_kernel() {
    [ -s "$out/vmlinuz" ] && [ -d "$out/modules" ] && return 0
    local pkg deb tree moddir="" kver rel
    pkg=$(kernel_package || true)
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(kernel_package || true)
    fi
    [ -n "$pkg" ] || { log "no package $meta in the apt sources"; return 1; }
    log "fetching $pkg (not installed: only unpacked into $out)"
    deb="$out/deb" tree="$out/deb/tree"
    rm -rf "$deb" "$out/modules"
    mkdir -p "$deb"
    (cd "$deb" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
    dpkg-deb -x "$deb/$pkg"_*.deb "$tree"
    for rel in "$tree"/lib/modules/* "$tree"/usr/lib/modules/*; do
        [ -d "$rel" ] && moddir=$rel && break
    done
    [ -n "$moddir" ] || { log "no modules in $pkg"; return 1; }
    kver=$(basename "$moddir")
    "$busybox" depmod -b "${moddir%/lib/modules/*}" "$kver"
    for rel in $(module_closure "$moddir/modules.dep" "${modules[@]}"); do
        mkdir -p "$out/modules/lib/modules/$kver/$(dirname "$rel")"
        cp "$moddir/$rel" "$out/modules/lib/modules/$kver/$rel"
    done
    "$busybox" depmod -b "$out/modules" "$kver"
    cp "$tree/boot/vmlinuz-$kver" "$out/vmlinuz"
    rm -rf "$deb"
}

build_initramfs() {
    local stage="$out/initramfs.tmp" applet
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,dev,proc,sys,run,mnt}
    cp -a "$out/modules/lib" "$stage/lib"
    cp "$busybox" "$stage/bin/busybox"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$stage/bin/$applet"
    done
    install -m 0755 "$here/init" "$stage/init"
    mknod -m 600 "$stage/dev/console" c 5 1
    (cd "$stage" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) \
        > "$out/initramfs.gz.tmp"
    rm -rf "$stage"
    mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
    log "built $out/initramfs.gz"
}

up_to_date && exit 0
[ -x "$busybox" ] || { log "$busybox is missing: install busybox-static"; exit 1; }
mkdir -p "$out"
fetch_kernel
build_initramfs
