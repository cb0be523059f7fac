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

from qcow.errors import QcowError
from qcow.malloc import tune_malloc

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
    "cancel": ("fusefs.jobcmds", "cmd_job_verb"),
    "pause": ("fusefs.jobcmds", "cmd_job_verb"),
    "resume": ("fusefs.jobcmds", "cmd_job_verb"),
    "complete": ("fusefs.jobcmds", "cmd_job_verb"),
}


def build_parser():
    p = argparse.ArgumentParser(prog="qcowfs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("mount", help="mount a chain as one flat raw file")
    s.add_argument("image")
    s.add_argument("mountpoint")
    s.add_argument("--read-only", action="store_true")
    s.add_argument("--foreground", action="store_true")
    s.add_argument("--name", default="disk.raw")
    s.add_argument("--control-socket", metavar="PATH")
    s.add_argument("--allow-other", action="store_true")
    s.add_argument("--cache-mib", type=int, default=32, metavar="N")
    s.add_argument("--log-file", metavar="PATH")
    s.add_argument("--no-resume", action="store_true",
                   help="leave an interrupted commit of the chain as it is")

    s = sub.add_parser("unmount", help="flush, release locks and unmount")
    s.add_argument("mountpoint")
    s.add_argument("--cancel-jobs", action="store_true")
    s.add_argument("--control-socket", metavar="PATH")

    s = sub.add_parser("commit", help="commit (base, top] into base, live or offline")
    s.add_argument("target", help="a mountpoint (live) or an image file (offline)")
    s.add_argument("--top", metavar="IMG")
    s.add_argument("--base", metavar="IMG")
    s.add_argument("--active", action="store_true")
    s.add_argument("--mode", choices=("simple", "restartable"), default="simple")
    s.add_argument("--speed", type=int, default=0, metavar="BYTES_PER_S")
    s.add_argument("--job-id", metavar="ID")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--pivot", action="store_true")
    s.add_argument("--delete", action="store_true")
    s.add_argument("--guard-dir", action="append", default=[], metavar="DIR")
    s.add_argument("--force", action="store_true")
    s.add_argument("--control-socket", metavar="PATH")

    s = sub.add_parser("stream", help="pull the backing chain (down to base) into the "
                                      "active image of a mount")
    s.add_argument("mountpoint")
    s.add_argument("--base", metavar="IMG")
    s.add_argument("--speed", type=int, default=0, metavar="BYTES_PER_S")
    s.add_argument("--job-id", metavar="ID")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--delete", action="store_true")
    s.add_argument("--guard-dir", action="append", default=[], metavar="DIR")
    s.add_argument("--force", action="store_true")
    s.add_argument("--control-socket", metavar="PATH")

    s = sub.add_parser("snapshot", help="live external snapshot: NEW_IMAGE becomes the "
                                        "active image of a mount")
    s.add_argument("mountpoint")
    s.add_argument("new_image")
    s.add_argument("--control-socket", metavar="PATH")

    s = sub.add_parser("jobs", help="list the jobs of a mount")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")
    s.add_argument("--control-socket", metavar="PATH")

    for verb in ("cancel", "pause", "resume", "complete"):
        s = sub.add_parser(verb, help=f"{verb} a job of a mount")
        s.add_argument("mountpoint")
        s.add_argument("job_id")
        s.add_argument("--control-socket", metavar="PATH")

    s = sub.add_parser("info", help="the chain, like qemu-img info --backing-chain")
    s.add_argument("image")
    s.add_argument("--json", action="store_true")
    s.add_argument("--dependants", action="store_true")
    s.add_argument("--guard-dir", action="append", default=[], metavar="DIR")

    s = sub.add_parser("map", help="allocation through the chain, like qemu-img map")
    s.add_argument("image")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("check", help="consistency check, like qemu-img check")
    s.add_argument("image")
    s.add_argument("--repair", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    tune_malloc()           # large I/O buffers from the heap (see qcow/malloc.py)
    module, func = _HANDLERS[args.command]
    handler = getattr(importlib.import_module(module), func)
    try:
        return handler(args) or 0
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
    except BrokenPipeError:
        # `qcowfs info ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
