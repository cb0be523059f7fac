"""The `qcowfs` command line: argument parsing and dispatch, nothing more.

Each sub-command lives in the module that owns it: image inspection in
`fusefs.imagecmds`, mounting in `fusefs.spawn` (the daemon it forks: `fusefs.daemon`),
unmounting in `fusefs.unmount`, job control in `fusefs.jobcmds`. A command imports only
what it uses: the offline ones (info, map, check, an offline commit) load neither trio,
pyfuse3 nor the QMP code. Every user-caused fault arrives here as a `QcowError` and
leaves as one line on stderr with a non-zero exit; a traceback is a bug.
"""

import argparse
import functools
import importlib
import os
import sys

from commit.target import MODES
from fusefs.mountrecord import mounted_hint
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
    "mount": ("fusefs.spawn", "cmd_mount"),
    "unmount": ("fusefs.unmount", "cmd_unmount"),
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

# the commands that move guest data in large buffers in this process (the mount's
# daemon is forked from it)
_MOVES_DATA = {"mount", "commit", "stream"}

_VERBS = {
    "cancel": "cancel a job and wait for it to end; on a ready active commit, end it "
    "without a pivot (the chain stays as it is and base keeps a consistent copy)",
    "pause": "pause a job (it stops copying; the mount keeps serving)",
    "resume": "resume a paused job",
    "complete": "pivot a ready active commit onto base and wait for the job to end",
}


# the long description of a sub-command (--help); others use their one-line help
_DESCRIPTIONS = {
    "mount": """\
Mount the backing chain of IMAGE (its active, topmost qcow2 image) on MOUNTPOINT as
one regular file, MOUNTPOINT/disk.raw, that reads and writes like the raw disk. The
command returns once the file answers; a daemon keeps serving it until 'qcowfs
unmount'. Images are locked as QEMU locks them. A chain containing an image that a
commit left behind (a leftover) is refused unless --force.""",
    "unmount": """\
Unmount a qcowfs mount cleanly: flush everything, mark the images clean, release the
locks and wait for the daemon to exit. Refuses while a job runs (unless --cancel-jobs)
and while the flat file is open (a VM, dd, a loop device), naming who holds it, unless
--lazy. After an active commit pivoted, says which image now holds the disk.""",
    "commit": """\
Copy the data of the images in (base, top] into base and drop them from the chain.
TARGET is a mountpoint (live, while the disk is in use) or an image file (offline,
like 'qemu-img commit'). Without --top, the active image's backing file is committed
(as virsh does); --active commits the active image itself.""",
    "stream": """\
Copy into the active image of a mounted chain every cluster it reads through from the
layers above base (QEMU's block-stream, virsh blockpull); then the active image names
base as its backing file (or none without --base) and the layers in between leave the
chain. The guest view never changes, and a guest write always wins over the copy.""",
    "snapshot": """\
Create NEW_IMAGE, a qcow2 overlay of the mount's active image, and make it the active
image between two guest requests (QEMU's blockdev-snapshot-sync). The old active image
becomes read-only: it can be copied while the guest keeps writing.""",
    "wait": """\
Attach to a job of a mount and follow it with the same progress bar and exit codes as
'commit --wait'. Ctrl-C detaches and leaves the job running.""",
    "info": """\
Show every image of IMAGE's chain, top first, as 'qemu-img info --backing-chain'
does, plus whether an image is a commit's leftover. Takes no locks.""",
    "check": """\
Check one qcow2 image's metadata as 'qemu-img check' does. Exit 0: clean, 1: could
not check, 2: corruptions, 3: leaked clusters only.""",
}


def _version():
    try:
        from importlib.metadata import version

        return version("qcowfs")
    except Exception:  # running from a source tree without installing
        return "unknown"


class _Version(argparse.Action):
    """--version: the package metadata is read only when asked for (reading it costs
    more than parsing every other option)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"qcowfs {_version()}")
        parser.exit()


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, told the terminal's width up front: left to find it, argparse
    imports shutil (and with it bz2 and lzma) on every command's start, as each
    add_argument builds a formatter."""

    def __init__(self, prog, **kw):
        kw.setdefault("width", _help_width())
        super().__init__(prog, **kw)


@functools.cache
def _help_width():
    """What argparse would use: $COLUMNS, else the terminal's width, else 80; less 2."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return (columns if columns > 0 else 80) - 2


def _add(sub, name, help):
    return sub.add_parser(
        name,
        help=help,
        description=_DESCRIPTIONS.get(name) or help[:1].upper() + help[1:] + ".",
        formatter_class=_HelpFormatter,
    )


def _flag(s, name, help):
    s.add_argument(name, action="store_true", help=help)


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
    s = _add(sub, "mount", "mount a chain as one flat raw file")
    s.add_argument("image", metavar="IMAGE", help="the active (topmost) qcow2 image of the chain")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    _flag(
        s, "--read-only", "never write any image (no repair, no commit); the flat file is read-only"
    )
    _flag(
        s,
        "--foreground",
        "run the daemon in this process (logs warnings to the terminal) "
        "until unmounted or interrupted",
    )
    s.add_argument(
        "--name",
        default="disk.raw",
        help="the flat file's name in the mountpoint (default: disk.raw)",
    )
    _socket(s)
    _flag(
        s,
        "--allow-other",
        "let other users open the flat file (needs user_allow_other in "
        "/etc/fuse.conf for non-root)",
    )
    s.add_argument(
        "--cache-mib",
        default="32",
        metavar="SIZE",
        help="metadata cache per image: MiB, or a size with a unit (256M, 1G); default 32",
    )
    _flag(s, "--nonempty", "mount even if MOUNTPOINT is not empty (hiding its files)")
    _flag(
        s,
        "--force",
        "mount even a chain containing a commit's leftover image (it may "
        "show a disk without later writes)",
    )
    s.add_argument(
        "--log-file",
        metavar="PATH",
        help="the daemon's log (default: next to the control socket, <socket>.log)",
    )
    _flag(
        s,
        "--no-resume",
        "leave an interrupted commit recorded in the chain as it is "
        "(default: the mount resumes it)",
    )


def _add_unmount(sub):
    s = _add(sub, "unmount", "flush, release locks and unmount")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    _flag(s, "--cancel-jobs", "cancel running jobs instead of refusing")
    _flag(
        s,
        "--lazy",
        "detach even while the flat file is open (as umount -l): the "
        "daemon serves the open files and finishes once they are closed",
    )
    _socket(s)


def _add_commit(sub):
    s = _add(sub, "commit", "commit (base, top] into base, live or offline")
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
    _flag(
        s,
        "--active",
        "commit the active image too: live, the job keeps base in sync "
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
    _flag(
        s,
        "--wait",
        "follow the job to its end with a progress bar; exit 0 only on "
        "success (an active commit: until ready)",
    )
    _flag(s, "--pivot", "with --active: wait for ready, then pivot onto base (implies --wait)")
    _flag(
        s,
        "--delete",
        "delete the images the commit dropped (after a pivot: the old "
        "active image and the intermediates)",
    )
    _flag(s, "--quiet", "do not print what the disk is served from at the end")
    _guard(s)
    _flag(
        s,
        "--force",
        "commit even if the stranding guard finds images depending on "
        "ones the commit changes (they are listed), or offline, a chain "
        "holding a leftover",
    )
    _socket(s)


def _add_stream(sub):
    s = _add(
        sub, "stream", "pull the backing chain (down to base) into the active image of a mount"
    )
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument(
        "--base",
        metavar="IMG",
        help="the image that stays below the active one (default: none, the whole chain is pulled)",
    )
    s.add_argument("--speed", metavar="RATE", help="limit copying to RATE bytes/s (512K, 10M, 1G)")
    s.add_argument("--job-id", metavar="ID", help="the job's name (default: stream)")
    _flag(s, "--wait", "follow the job to its end with a progress bar; exit 0 only on success")
    _flag(s, "--delete", "delete the images that left the chain")
    _guard(s)
    _flag(s, "--force", "with --delete: delete even images other chains depend on")
    _socket(s)


def _add_snapshot(sub):
    s = _add(
        sub, "snapshot", "live external snapshot: NEW_IMAGE becomes the active image of a mount"
    )
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument("new_image", metavar="NEW_IMAGE", help="the overlay to create (must not exist)")
    _socket(s)


def _add_jobs(sub):
    s = _add(sub, "jobs", "list the jobs of a mount")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    _flag(s, "--json", "print query-block-jobs' return value as JSON")
    _socket(s)


def _add_wait(sub):
    s = _add(sub, "wait", "follow a running job to its end")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument(
        "job_id", nargs="?", metavar="JOB_ID", help="the job (default: the mount's only job)"
    )
    _flag(s, "--quiet", "do not print what the disk is served from at the end")
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


def _add_job_verb(sub, verb):
    s = _add(sub, verb, _VERBS[verb])
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help=MNT_HELP)
    s.add_argument("job_id", metavar="JOB_ID", help="the job (see 'qcowfs jobs')")
    _socket(s)


def _add_info(sub):
    s = _add(sub, "info", "the chain, like qemu-img info --backing-chain")
    s.add_argument("image", metavar="IMAGE", help="the active (topmost) image of the chain")
    _flag(s, "--json", "a JSON list with qemu-img info --output=json's keys")
    _flag(
        s,
        "--dependants",
        "instead, list the images in the chain's directories (and "
        "--guard-dir) that depend on each image of the chain",
    )
    _guard(s)


def _add_map(sub):
    s = _add(sub, "map", "allocation through the chain, like qemu-img map")
    s.add_argument("image", metavar="IMAGE", help="the active (topmost) image of the chain")
    _flag(s, "--json", "qemu-img map --output=json's list")


def _add_check(sub):
    s = _add(sub, "check", "consistency check, like qemu-img check")
    s.add_argument("image", metavar="IMAGE", help="the qcow2 image to check")
    _flag(s, "--repair", "fix leaks and refcount errors (as qemu-img check -r all)")
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


# every command's sub-parser, in the order `qcowfs --help` lists them
_ADDERS = {
    "mount": _add_mount,
    "unmount": _add_unmount,
    "commit": _add_commit,
    "stream": _add_stream,
    "snapshot": _add_snapshot,
    "jobs": _add_jobs,
    "wait": _add_wait,
    "set-speed": _add_set_speed,
    **{verb: functools.partial(_add_job_verb, verb=verb) for verb in _VERBS},
    "info": _add_info,
    "map": _add_map,
    "check": _add_check,
}


def build_parser(command=None):
    """The whole parser, or with `command` one holding only that command's sub-parser:
    it parses that command's arguments alike, and building every command's arguments
    would cost a command's start more than the parsing itself."""
    p = argparse.ArgumentParser(
        prog="qcowfs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--version", action=_Version, nargs=0, help="show program's version number and exit"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in _ADDERS.items():
        if command in (None, name):
            add(sub)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0] if argv else None
    args = build_parser(first if first in _ADDERS else None).parse_args(argv)
    if args.command in _MOVES_DATA:
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
        print(f"qcowfs: {e}{mounted_hint(e, args.command)}", file=sys.stderr)
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
