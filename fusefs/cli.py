"""The `qcowfs` command line: argument parsing and dispatch, nothing more.

Each sub-command lives in the module that owns it: image inspection in
`fusefs.imagecmds`, the mount daemon in `fusefs.daemon`, job control in
`fusefs.jobcmds`. Every user-caused fault arrives here as a `QcowError` and leaves as
one line on stderr with a non-zero exit; a traceback is a bug.
"""

import argparse
import importlib
import os
import sys

from commit.target import MODES
from qcow.errors import QcowError
from qcow.malloc import tune_malloc

DESCRIPTION = """\
Mount a qcow2 backing chain as one flat raw file (FUSE) and commit it live, while a
VM or any program uses the file. Images are read and written the way QEMU does;
qemu-img check/info/map agree with what qcowfs shows."""

EPILOG = """\
examples:
  qcowfs mount active.qcow2 /mnt/vm             # /mnt/vm/disk.raw is the whole chain
  qcowfs commit /mnt/vm --wait                  # fold active's backing file into base
  qcowfs commit /mnt/vm --active --pivot        # fold everything; base becomes the disk
  qcowfs jobs /mnt/vm
  qcowfs unmount /mnt/vm

RATE and sizes take binary units: 512K, 10M, 1G (a plain number is bytes)."""

MNT_HELP = "the directory a chain is mounted on (its control socket is found by itself)"
SOCKET_HELP = "the mount's control socket (QMP); only needed to override the one the mount recorded"

# sub-command -> (module, function)
_HANDLERS = {
    "info": ("fusefs.imagecmds", "cmd_info"),
    "map": ("fusefs.imagecmds", "cmd_map"),
    "check": ("fusefs.imagecmds", "cmd_check"),
    "mount": ("fusefs.daemon", "cmd_mount"),
    "unmount": ("fusefs.daemon", "cmd_unmount"),
    "commit": ("fusefs.jobcmds", "cmd_commit"),
    "stream": ("fusefs.jobcmds", "cmd_stream"),
    "snapshot": ("fusefs.jobcmds", "cmd_snapshot"),
    "jobs": ("fusefs.jobcmds", "cmd_jobs"),
    "wait": ("fusefs.jobcmds", "cmd_wait"),
    "set-speed": ("fusefs.jobcmds", "cmd_set_speed"),
    "cancel": ("fusefs.jobcmds", "cmd_job_verb"),
    "pause": ("fusefs.jobcmds", "cmd_job_verb"),
    "resume": ("fusefs.jobcmds", "cmd_job_verb"),
    "complete": ("fusefs.jobcmds", "cmd_job_verb"),
}

_VERBS = {
    "cancel": "cancel a job and wait for it to end; on a ready active commit, end it "
    "without a pivot (the chain stays as it is and base keeps a consistent copy)",
    "pause": "pause a job (it stops copying; the mount keeps serving)",
    "resume": "resume a paused job",
    "complete": "pivot a ready active commit onto base and wait for the job to end",
}


def _version():
    try:
        from importlib.metadata import version

        return version("qcowfs")
    except Exception:  # running from a source tree without installing
        return "unknown"


def _add(sub, name, help, description=None):
    return sub.add_parser(
        name,
        help=help,
        description=description or help[:1].upper() + help[1:] + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _socket(s):
    s.add_argument("--control-socket", metavar="PATH", help=SOCKET_HELP)


def _guard(s):
    s.add_argument(
        "--guard-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also look in DIR for images that depend on the chain's images "
        "(the stranding guard); may be repeated",
    )


def _add_mount(sub):
    s = _add(
        sub,
        "mount",
        "mount a chain as one flat raw file",
        """\
Mount the backing chain of IMAGE (its active, topmost qcow2 image) on MOUNTPOINT as
one regular file, MOUNTPOINT/disk.raw, that reads and writes like the raw disk. The
command returns once the file answers; a daemon keeps serving it until 'qcowfs
unmount'. Images are locked as QEMU locks them. A chain containing an image that a
commit left behind (a leftover) is refused unless --force.""",
    )
    s.add_argument("image", metavar="IMAGE", help="the active (topmost) qcow2 image of the chain")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    s.add_argument(
        "--read-only",
        action="store_true",
        help="never write any image (no repair, no commit); the flat file is read-only",
    )
    s.add_argument(
        "--foreground",
        action="store_true",
        help="run the daemon in this process (logs warnings to the terminal) "
        "until unmounted or interrupted",
    )
    s.add_argument(
        "--name",
        default="disk.raw",
        help="the flat file's name in the mountpoint (default: disk.raw)",
    )
    _socket(s)
    s.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users open the flat file (needs user_allow_other in "
        "/etc/fuse.conf for non-root)",
    )
    s.add_argument(
        "--cache-mib",
        default="32",
        metavar="SIZE",
        help="metadata cache per image: MiB, or a size with a unit (256M, 1G); default 32",
    )
    s.add_argument(
        "--nonempty",
        action="store_true",
        help="mount even if MOUNTPOINT is not empty (hiding its files)",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="mount even a chain containing a commit's leftover image (it may "
        "show a disk without later writes)",
    )
    s.add_argument(
        "--log-file",
        metavar="PATH",
        help="the daemon's log (default: next to the control socket, <socket>.log)",
    )
    s.add_argument(
        "--no-resume",
        action="store_true",
        help="leave an interrupted commit recorded in the chain as it is "
        "(default: the mount resumes it)",
    )


def _add_unmount(sub):
    s = _add(
        sub,
        "unmount",
        "flush, release locks and unmount",
        """\
Unmount a qcowfs mount cleanly: flush everything, mark the images clean, release the
locks and wait for the daemon to exit. Refuses while a job runs (unless --cancel-jobs)
and while the flat file is open (a VM, dd, a loop device), naming who holds it, unless
--lazy. After an active commit pivoted, says which image now holds the disk.""",
    )
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument(
        "--cancel-jobs", action="store_true", help="cancel running jobs instead of refusing"
    )
    s.add_argument(
        "--lazy",
        action="store_true",
        help="detach even while the flat file is open (as umount -l): the "
        "daemon serves the open files and finishes once they are closed",
    )
    _socket(s)


def _add_commit(sub):
    s = _add(
        sub,
        "commit",
        "commit (base, top] into base, live or offline",
        """\
Copy the data of the images in (base, top] into base and drop them from the chain.
TARGET is a mountpoint (live, while the disk is in use) or an image file (offline,
like 'qemu-img commit'). Without --top, the active image's backing file is committed
(as virsh does); --active commits the active image itself.""",
    )
    s.add_argument(
        "target",
        metavar="TARGET",
        help="a mountpoint (live commit) or an active image file (offline commit)",
    )
    s.add_argument(
        "--top",
        metavar="IMG",
        help="the topmost image to commit (default: the active image's backing file)",
    )
    s.add_argument(
        "--base", metavar="IMG", help="the image to commit into (default: the bottom of the chain)"
    )
    s.add_argument(
        "--active",
        action="store_true",
        help="commit the active image too: live, the job keeps base in sync "
        "until 'complete' pivots the mount onto base; offline, base "
        "becomes the image to use",
    )
    s.add_argument(
        "--mode",
        choices=MODES,
        default="simple",
        help="simple (default, as QEMU) or restartable (drains intermediates "
        "one by one; a restarted commit never copies a cluster twice)",
    )
    s.add_argument(
        "--speed", metavar="RATE", help="limit copying into base to RATE bytes/s (512K, 10M, 1G)"
    )
    s.add_argument("--job-id", metavar="ID", help="the job's name (default: commit)")
    s.add_argument(
        "--wait",
        action="store_true",
        help="follow the job to its end with a progress bar; exit 0 only on "
        "success (an active commit: until ready)",
    )
    s.add_argument(
        "--pivot",
        action="store_true",
        help="with --active: wait for ready, then pivot onto base (implies --wait)",
    )
    s.add_argument(
        "--delete",
        action="store_true",
        help="delete the images the commit dropped (after a pivot: the old "
        "active image and the intermediates)",
    )
    s.add_argument(
        "--quiet", action="store_true", help="do not print what the disk is served from at the end"
    )
    _guard(s)
    s.add_argument(
        "--force",
        action="store_true",
        help="commit even if the stranding guard finds images depending on "
        "ones the commit changes (they are listed), or offline, a chain "
        "holding a leftover",
    )
    _socket(s)


def _add_stream(sub):
    s = _add(
        sub,
        "stream",
        "pull the backing chain (down to base) into the active image of a mount",
        """\
Copy into the active image of a mounted chain every cluster it reads through from the
layers above base (QEMU's block-stream, virsh blockpull); then the active image names
base as its backing file (or none without --base) and the layers in between leave the
chain. The guest view never changes, and a guest write always wins over the copy.""",
    )
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument(
        "--base",
        metavar="IMG",
        help="the image that stays below the active one (default: none, the whole chain is pulled)",
    )
    s.add_argument("--speed", metavar="RATE", help="limit copying to RATE bytes/s (512K, 10M, 1G)")
    s.add_argument("--job-id", metavar="ID", help="the job's name (default: stream)")
    s.add_argument(
        "--wait",
        action="store_true",
        help="follow the job to its end with a progress bar; exit 0 only on success",
    )
    s.add_argument("--delete", action="store_true", help="delete the images that left the chain")
    _guard(s)
    s.add_argument(
        "--force",
        action="store_true",
        help="with --delete: delete even images other chains depend on",
    )
    _socket(s)


def _add_snapshot(sub):
    s = _add(
        sub,
        "snapshot",
        "live external snapshot: NEW_IMAGE becomes the active image of a mount",
        """\
Create NEW_IMAGE, a qcow2 overlay of the mount's active image, and make it the active
image between two guest requests (QEMU's blockdev-snapshot-sync). The old active image
becomes read-only: it can be copied while the guest keeps writing.""",
    )
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument("new_image", metavar="NEW_IMAGE", help="the overlay to create (must not exist)")
    _socket(s)


def _add_jobs(sub):
    s = _add(sub, "jobs", "list the jobs of a mount")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument(
        "--json", action="store_true", help="print query-block-jobs' return value as JSON"
    )
    _socket(s)


def _add_wait(sub):
    s = _add(
        sub,
        "wait",
        "follow a running job to its end",
        """\
Attach to a job of a mount and follow it with the same progress bar and exit codes as
'commit --wait'. Ctrl-C detaches and leaves the job running.""",
    )
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument(
        "job_id", nargs="?", metavar="JOB_ID", help="the job (default: the mount's only job)"
    )
    s.add_argument(
        "--quiet", action="store_true", help="do not print what the disk is served from at the end"
    )
    _socket(s)


def _add_set_speed(sub):
    s = _add(sub, "set-speed", "change a running job's speed limit")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument("job_id", metavar="JOB_ID", help="the job (see 'qcowfs jobs')")
    s.add_argument(
        "speed",
        metavar="RATE",
        help="bytes/s with an optional binary unit (512K, 10M, 1G); 0: no limit",
    )
    _socket(s)


def _add_job_verbs(sub):
    for verb, text in _VERBS.items():
        s = _add(sub, verb, text)
        s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
        s.add_argument("job_id", metavar="JOB_ID", help="the job (see 'qcowfs jobs')")
        _socket(s)


def _add_info(sub):
    s = _add(
        sub,
        "info",
        "the chain, like qemu-img info --backing-chain",
        """\
Show every image of IMAGE's chain, top first, as 'qemu-img info --backing-chain'
does, plus whether an image is a commit's leftover. Takes no locks.""",
    )
    s.add_argument("image", metavar="IMAGE", help="the active (topmost) image of the chain")
    s.add_argument(
        "--json", action="store_true", help="a JSON list with qemu-img info --output=json's keys"
    )
    s.add_argument(
        "--dependants",
        action="store_true",
        help="instead, list the images in the chain's directories (and "
        "--guard-dir) that depend on each image of the chain",
    )
    _guard(s)


def _add_map(sub):
    s = _add(sub, "map", "allocation through the chain, like qemu-img map")
    s.add_argument("image", metavar="IMAGE", help="the active (topmost) image of the chain")
    s.add_argument("--json", action="store_true", help="qemu-img map --output=json's list")


def _add_check(sub):
    s = _add(
        sub,
        "check",
        "consistency check, like qemu-img check",
        """\
Check one qcow2 image's metadata as 'qemu-img check' does. Exit 0: clean, 1: could
not check, 2: corruptions, 3: leaked clusters only.""",
    )
    s.add_argument("image", metavar="IMAGE", help="the qcow2 image to check")
    s.add_argument(
        "--repair",
        action="store_true",
        help="fix leaks and refcount errors (as qemu-img check -r all)",
    )
    s.add_argument(
        "-r",
        dest="repair_mode",
        choices=("leaks", "all"),
        help="as qemu-img: repair (same as --repair)",
    )
    s.add_argument(
        "--output",
        choices=("human", "json"),
        default="human",
        help="human (default) or json (qemu-img check --output=json's keys)",
    )


def build_parser():
    p = argparse.ArgumentParser(
        prog="qcowfs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"qcowfs {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_mount(sub)
    _add_unmount(sub)
    _add_commit(sub)
    _add_stream(sub)
    _add_snapshot(sub)
    _add_jobs(sub)
    _add_wait(sub)
    _add_set_speed(sub)
    _add_job_verbs(sub)
    _add_info(sub)
    _add_map(sub)
    _add_check(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    tune_malloc()  # large I/O buffers from the heap (see qcow/malloc.py)
    module, func = _HANDLERS[args.command]
    try:
        # the import too: a Ctrl-C while a slow machine still loads the command's module
        # is an interrupt like any other, not a traceback
        handler = getattr(importlib.import_module(module), func)
        rc = handler(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        # `qcowfs info ... | head`: the reader left, which is no fault of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except QcowError as e:
        print(f"qcowfs: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # a fault found only while reading (a bad L2 entry: EIO), or the file system
        name = f"{e.filename}: " if e.filename else ""
        print(f"qcowfs: {name}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
