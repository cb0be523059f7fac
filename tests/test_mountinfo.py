"""/proc/self/mountinfo read one way everywhere (qcow/mountinfo.py): a mountpoint whose
name the kernel escapes is found, through a real mount."""

from mount_fixtures import make_chain, mounted_fstype, read_file
from qemu_helpers import convert_raw

from qcow.mountinfo import MOUNTINFO, mount_at, unescape


def test_octal_escapes_decode():
    assert unescape(rb"/mnt/a\040b\011c\012d\134e") == b"/mnt/a b\tc\nd\\e"
    assert unescape(rb"/mnt/plain") == b"/mnt/plain"


def test_mountpoint_with_space_and_backslash(tmp_path, mounter):
    top = make_chain(tmp_path)
    mnt = tmp_path / "a b\\c"
    mnt.mkdir()
    m = mounter(top, mountpoint=mnt)
    with open(MOUNTINFO, "rb") as f:
        table = f.read()
    assert b"a\\040b\\134c" in table  # the kernel escaped it: the parser had work to do
    found = mount_at(str(mnt))
    assert found is not None and found.fstype == "fuse.qcowfs"
    assert mounted_fstype(mnt) == "fuse.qcowfs"
    assert read_file(m.disk) == convert_raw(top, share=True)
    m.unmount()  # finds the mount, its record and its daemon by that name
    assert mount_at(str(mnt)) is None
