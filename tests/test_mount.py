"""The flat file through a real FUSE mount: reads, writes, durability, file systems.

Every image is built with qemu-img/qemu-io and judged with qemu-img (convert, check);
the mount is made with the real CLI. See mount_fixtures.py for the clean-up guarantees.
"""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from mount_fixtures import (
    M,
    check_clean,
    file_hashes,
    make_chain,
    read_file,
)
from qemu_helpers import MATRIX_CASES, convert_raw, qemu_img, rand_bytes


def sha(data):
    return hashlib.sha256(data).hexdigest()


# ---- the coverage matrix, read-only -----------------------------------------------------


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_matrix_reads_equal_qemu_convert(case, matrix, mounter):
    path = matrix.get(case)
    directory = matrix.directory(case)
    expected = convert_raw(path)
    before = file_hashes(directory)
    m = mounter(path, "--read-only")
    assert m.disk.stat().st_size == len(expected)
    assert os.listdir(m.mountpoint) == ["disk.raw"]
    assert read_file(m.disk, direct=True) == expected
    assert read_file(m.disk) == expected
    m.unmount()
    assert file_hashes(directory) == before, "--read-only changed an image"


def test_a_size_field_off_the_sector_grid_is_cut_as_qemu_cuts_it(tmp_path, mounter):
    """QEMU counts a disk in whole 512-byte sectors: a header size of 1000001 bytes (no
    qemu-img writes one, a hand-edited header can) is a disk of 999936. info, the
    mount's file and the guest view agree with qemu-img's."""
    img = tmp_path / "odd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", img], check=True, capture_output=True)
    with open(img, "r+b") as f:
        f.seek(24)  # the header's size field
        f.write((1000001).to_bytes(8, "big"))
    qemu_size = json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"]
    assert qemu_size == 999936
    info = subprocess.run(
        [sys.executable, "-m", "fusefs", "info", "--json", img], capture_output=True, text=True
    )
    assert json.loads(info.stdout)[0]["virtual-size"] == qemu_size
    expected = convert_raw(img)
    m = mounter(img, "--read-only")
    assert m.disk.stat().st_size == qemu_size
    assert read_file(m.disk, direct=True) == expected


def test_read_only_mount_refuses_writes(tmp_path, mounter):
    top = make_chain(tmp_path, size=8 * M)
    before = file_hashes(tmp_path / "images")
    m = mounter(top, "--read-only")
    with pytest.raises(OSError) as e:
        open(m.disk, "r+b")
    assert e.value.errno == errno.EROFS
    cp = subprocess.run(
        ["fallocate", "-p", "-o", "0", "-l", "4096", str(m.disk)], capture_output=True, text=True
    )
    assert cp.returncode != 0
    m.unmount()
    assert file_hashes(tmp_path / "images") == before


# ---- writes -------------------------------------------------------------------------------


def _dd(src, dst, *flags):
    subprocess.run(["dd", f"if={src}", f"of={dst}", "status=none", *flags], check=True)


def test_dd_direct_and_fsync_writes_read_back(tmp_path, mounter):
    top = make_chain(tmp_path)
    expected = bytearray(convert_raw(top))
    m = mounter(top)
    writes = [  # (offset, length, dd flags)
        (0, 1 * M, ["bs=1M", "oflag=direct", "conv=notrunc,fsync"]),
        (20 * M + 4096, 3 * M, ["bs=64k", "oflag=direct", "conv=notrunc,fsync"]),
        (40 * M, 2 * M + 8192, ["bs=4k", "oflag=direct", "conv=notrunc,fsync"]),
        (50 * M + 1234, 777777, ["bs=1M", "conv=notrunc,fsync"]),  # unaligned
        (64 * M - 4096, 4096, ["bs=4k", "oflag=direct", "conv=notrunc,fsync"]),  # last
    ]
    for i, (off, length, flags) in enumerate(writes):
        data = rand_bytes(i, off, length)
        src = tmp_path / f"w{i}"
        src.write_bytes(data)
        _dd(src, m.disk, "oflag=seek_bytes", f"seek={off}", *flags)
        expected[off : off + length] = data
    assert read_file(m.disk, direct=True) == expected
    assert read_file(m.disk) == expected
    m.unmount()
    check_clean(top)
    assert convert_raw(top) == expected
    # the kernel granted 1 MiB requests, and 1 MiB O_DIRECT requests came in whole
    assert "max_write 1048576" in m.log()
    assert "largest requests served: read 1048576, write 1048576 bytes" in m.log()


def test_writes_into_a_fresh_empty_overlay(tmp_path, mounter):
    """The usual case: a new overlay with no L2 table yet, written in 1 MiB requests
    spanning many clusters (each needs the L2 table the first one allocated)."""
    d = tmp_path / "images"
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), str(32 * M))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    top = str(d / "top.qcow2")
    m = mounter(top)
    data = rand_bytes("fresh", 0, 4 * M)
    src = tmp_path / "src"
    src.write_bytes(data)
    _dd(src, m.disk, "bs=1M", "oflag=direct", "conv=notrunc,fsync")
    expected = data + bytes(28 * M)
    assert read_file(m.disk, direct=True) == expected
    m.unmount()
    check_clean(top)
    assert convert_raw(top) == expected


def test_write_past_the_end_and_resize_are_refused(tmp_path, mounter):
    top = make_chain(tmp_path, size=8 * M)
    m = mounter(top)
    size = m.disk.stat().st_size
    with open(m.disk, "r+b", buffering=0) as f:
        f.seek(size)
        with pytest.raises(OSError) as e:
            f.write(b"x" * 4096)
        assert e.value.errno == errno.ENOSPC
        # crossing the end: cut short (buffered), refused whole (O_DIRECT)
        assert os.pwrite(f.fileno(), b"y" * 8192, size - 4096) == 4096
        import mmap

        buf = mmap.mmap(-1, 65536)
        fd = os.open(m.disk, os.O_RDWR | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as e:
                os.pwritev(fd, [buf], size - 32768)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with pytest.raises(OSError) as e:
            os.ftruncate(f.fileno(), size + 4096)
        assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            os.ftruncate(f.fileno(), size - 4096)
        assert e.value.errno == errno.EPERM
        os.ftruncate(f.fileno(), size)  # same size: a no-op, allowed
    assert m.disk.stat().st_size == size
    assert "refused to change the size" in m.log()
    m.unmount()
    check_clean(top)


def test_fallocate_punch_hole_and_zero_range(tmp_path, mounter):
    top = make_chain(tmp_path, size=32 * M)
    expected = bytearray(convert_raw(top))
    m = mounter(top)
    for args, off, length in (
        (["-p"], 8 * M, 2 * M),  # PUNCH_HOLE|KEEP_SIZE
        (["-p"], 1 * M + 512, 100000),  # unaligned
        (["-z"], 12 * M, 1 * M),  # ZERO_RANGE
        (["-z", "-n"], 0, 65536),
    ):  # ZERO_RANGE|KEEP_SIZE
        subprocess.run(
            ["fallocate", *args, "-o", str(off), "-l", str(length), str(m.disk)], check=True
        )
        expected[off : off + length] = bytes(length)
    # plain allocation (mode 0) and collapse-range are not supported
    for args in ([], ["-c"]):
        cp = subprocess.run(
            ["fallocate", *args, "-o", "0", "-l", "65536", str(m.disk)],
            capture_output=True,
            text=True,
        )
        assert cp.returncode != 0 and "not supported" in cp.stderr, cp.stderr
    assert read_file(m.disk) == expected
    assert read_file(m.disk, direct=True) == expected
    m.unmount()
    check_clean(top)
    assert convert_raw(top) == expected


def test_concurrent_writes_into_one_unallocated_cluster(tmp_path, mounter):
    """Many threads write disjoint pieces of the same fresh 64 KiB clusters at once,
    small ones and big ones: every piece lands, and no cluster is allocated twice
    (qemu-img check finds no leak)."""
    top = make_chain(tmp_path, size=32 * M)
    expected = bytearray(convert_raw(top))
    m = mounter(top)
    base_off = 12 * M  # base data or nothing below, not allocated in top
    # small pieces (served inline): 16 x 4 KiB in each of 8 fresh clusters
    pieces = [
        (base_off + c * 65536 + p * 4096, rand_bytes(c * 16 + p, 0, 4096))
        for c in range(8)
        for p in range(16)
    ]
    # big pieces (served in worker threads): 256 KiB each, neighbours sharing the
    # fresh cluster their boundary falls in
    big_off = base_off + 2 * M + 32768
    pieces += [(big_off + i * 256 * 1024, rand_bytes(("big", i), 0, 256 * 1024)) for i in range(16)]
    fd = os.open(m.disk, os.O_RDWR | os.O_DIRECT)
    import mmap

    errors = []

    def worker(items):
        try:
            for off, data in items:
                buf = mmap.mmap(-1, len(data))
                buf[:] = data
                os.pwritev(fd, [buf], off)
        except OSError as e:
            errors.append(e)

    try:
        threads = [threading.Thread(target=worker, args=(pieces[i::16],)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not errors
    for off, data in pieces:
        expected[off : off + len(data)] = data
    assert read_file(m.disk, direct=True) == expected
    m.unmount()
    check_clean(top)
    assert convert_raw(top) == expected


@pytest.mark.slow
def test_fio_verify_randwrite(tmp_path, mounter):
    top = make_chain(tmp_path, size=256 * M)
    m = mounter(top)
    cp = subprocess.run(
        [
            "fio",
            "--name=verify",
            f"--filename={m.disk}",
            "--ioengine=libaio",
            "--direct=1",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=48M",
            "--offset_increment=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_backlog=256",
            "--verify_state_save=0",
            "--group_reporting",
            "--output-format=terse",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert cp.returncode == 0, (cp.stdout[-2000:], cp.stderr[-2000:], m.log()[-2000:])
    seen = sha(read_file(m.disk, direct=True))
    m.unmount()
    check_clean(top)
    assert sha(convert_raw(top)) == seen


@pytest.mark.slow
def test_ext4_on_loop_device(tmp_path, mounter):
    top = make_chain(tmp_path, size=128 * M)
    m = mounter(top)
    src = tmp_path / "files"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(rand_bytes(100 + i, 0, (i + 1) * 37 * 1024))
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(m.disk)], capture_output=True, text=True, check=True
    ).stdout.strip()
    fsdir = tmp_path / "ext4"
    fsdir.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True)
        subprocess.run(["mount", loop, str(fsdir)], check=True)
        try:
            shutil.copytree(src, fsdir / "copy")
            subprocess.run(["sync", "-f", str(fsdir)], check=True)
            assert file_hashes(fsdir / "copy") == file_hashes(src)
        finally:
            subprocess.run(["umount", str(fsdir)], check=True)
        cp = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True)
        assert cp.returncode == 0, cp.stdout + cp.stderr
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    seen = sha(read_file(m.disk))
    m.unmount()
    check_clean(top)
    flat = convert_raw(top)
    assert sha(flat) == seen
    # and the file system in the committed-to-disk image is the same one
    img = tmp_path / "flat.raw"
    img.write_bytes(flat)
    cp = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_an_image_path_beyond_ascii_mounts(tmp_path, mounter):
    """The image's path goes into the mount table's source column, which pyfuse3 takes
    as ASCII only: a path with 'ä' in it must mount all the same."""
    d = tmp_path / "ü dir"
    d.mkdir()
    img = d / "ä.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    subprocess.run(["qemu-io", "-c", "write -P 0x7e 0 64k", img], check=True, capture_output=True)
    m = mounter(img)
    assert read_file(m.disk, direct=True) == convert_raw(img, share=True)
    m.unmount()
    check_clean(img)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_unusable_names_are_refused(tmp_path, mounter, name):
    top = make_chain(tmp_path, size=8 * M)
    before = file_hashes(tmp_path / "images")
    m, cp = mounter.attempt(top, "--name", name)  # unmounted afterwards, should it mount
    assert cp.returncode != 0 and "Traceback" not in cp.stderr, cp
    assert cp.stderr.count("\n") == 1 and "--name" in cp.stderr, cp.stderr
    assert not m.is_mounted()
    assert file_hashes(tmp_path / "images") == before


def test_name_option_and_metadata(tmp_path, mounter):
    top = make_chain(tmp_path, size=8 * M)
    m = mounter(top, name="vm.img")
    assert os.listdir(m.mountpoint) == ["vm.img"]
    st = m.disk.stat()
    assert st.st_size == 8 * M
    vfs = os.statvfs(m.mountpoint)
    assert vfs.f_blocks * vfs.f_frsize == 8 * M
    for bad in (
        lambda: open(m.mountpoint / "new", "wb"),
        lambda: os.mkdir(m.mountpoint / "d"),
        lambda: os.unlink(m.disk),
        lambda: os.rename(m.disk, m.mountpoint / "other"),
    ):
        with pytest.raises(OSError):
            bad()
    assert not (m.mountpoint / "disk.raw").exists()
    info = qemu_img("info", top, check=False)
    assert info.returncode != 0 and "lock" in info.stderr  # QEMU sees our locks
    assert qemu_img("info", "-U", top).returncode == 0
    m.unmount()
    assert qemu_img("info", top).returncode == 0  # and they are gone
