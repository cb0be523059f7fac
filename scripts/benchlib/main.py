"""The options, the header of a run, and running the sections one after the other
(cleaning up after each, whatever happens)."""

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback

from . import __doc__ as DOC
from .chains import chain_stats
from .commit import section_active, section_commit
from .guard import section_guard
from .harness import (
    CLUSTER,
    NA,
    Ctx,
    G,
    K,
    M,
    Section,
    T,
    cleanup,
    fs_type,
    loadavg,
    render,
    run,
    say,
)
from .mount import section_mount
from .reader import section_reader
from .writer import section_writer

SECTIONS = ("reader", "writer", "mount", "commit", "active", "guard")
SECTION_INFO = {
    "reader": (section_reader, "1. reader", "qemu-img"),
    "writer": (section_writer, "2. writer", "qemu-img bench"),
    "mount": (
        section_mount,
        "3. mount: qcowfs mount vs qemu-storage-daemon FUSE export",
        "QSD",
    ),
    "commit": (
        section_commit,
        "4. commit: offline and live commit of (base, top]",
        "QEMU (qemu-img / QSD)",
    ),
    "active": (section_active, "5. active commit with pivot", "QSD"),
    "guard": (section_guard, "6. stranding guard", "-"),
}


def parse_size(text):
    t = text.strip().upper().replace("IB", "").rstrip("B")
    mult = {"K": K, "M": M, "G": G, "T": T}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" else t
    size = int(float(num) * mult)
    if size <= 0 or size % CLUSTER:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive multiple of 64 KiB")
    return size


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=DOC.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="virtual size of the test chain (default 1 GiB; --quick: 128 MiB)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}",
    )
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (tables go to stderr)",
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 5)")
    p.add_argument(
        "--commit-rounds", type=int, default=None, help="rounds of the commit sections (default 3)"
    )
    p.add_argument(
        "--runtime", type=int, default=None, help="seconds per time-based fio run (default 3)"
    )
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--tmpdir", default=None, help="where to build the chains")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 128 * M if args.quick else G
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.commit_rounds is None:
        args.commit_rounds = 1 if args.quick else 3
    if args.runtime is None:
        args.runtime = 1 if args.quick else 3
    return args


def header(ctx):
    st = chain_stats(ctx.size)
    qv = run(["qemu-img", "--version"], check=False).stdout.splitlines()[:1]
    fv = run(["fio", "--version"], check=False).stdout.strip()
    return {
        "chain": f"base <- mid <- top <- active, {ctx.size / G:g} GiB, 64 KiB clusters; flat "
        f"view {st['top']:.0%} top / {st['mid']:.0%} mid / {st['base']:.0%} base; "
        f"{st['to_commit'] / M:.0f} MiB allocated in (base, top] (mid "
        f"{st['mid_allocated'] / M:.0f} MiB, top {st['top_allocated'] / M:.0f} MiB)",
        "host": f"{platform.node()}: {len(os.sched_getaffinity(0))} CPUs, kernel "
        f"{platform.release()}, Python {platform.python_version()}, "
        f"{qv[0] if qv else 'qemu-img ?'}, {fv}",
        "tmpdir": f"{ctx.tmp} ({fs_type(ctx.tmp)})",
        "pinning": (
            f"servers/offline tools on CPU {ctx.server_cpu}, clients on CPU {ctx.client_cpu}"
            if ctx.taskset
            else "taskset missing: not pinned"
        ),
        "rounds": f"{ctx.rounds} (commit sections {ctx.commit_rounds}); medians",
        "load": f"load average at start {loadavg()} (other work on the machine skews "
        "absolute figures; the ratios are what to compare)",
    }


def run_section(ctx, name):
    """Run one section; (its Section, whether the benchmark itself failed)."""
    fn, title, vs = SECTION_INFO[name]
    sec = Section(name, title, vs)
    failed = False
    t = time.monotonic()
    say(f"section {name} ...")
    try:
        fn(ctx, sec)
    except NA as e:
        sec.na = str(e)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        sec.na = f"the benchmark itself failed: {type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
        failed = True
    finally:
        cleanup(ctx)
    sec.seconds = time.monotonic() - t
    sec.load = loadavg()
    return sec, failed


def main(argv=None):
    args = parse_args(argv)
    sections = [s for s in SECTIONS if not args.only or s in args.only]

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)

    tmp = tempfile.mkdtemp(prefix="qcowfs-bench-", dir=args.tmpdir)
    ctx = Ctx(args, os.path.realpath(tmp))
    out = sys.stderr if args.json else sys.stdout
    results = {"header": header(ctx), "sections": {}}
    rc = 0
    try:
        for k, v in results["header"].items():
            print(f"{k}: {v}", file=out, flush=True)
        for name in sections:
            sec, failed = run_section(ctx, name)
            rc = 1 if failed else rc
            results["sections"][name] = sec.to_json()
            print("\n" + render(sec), file=out, flush=True)
    except KeyboardInterrupt:
        say("interrupted: cleaning up")
        rc = 130
    finally:
        cleanup(ctx)
        if args.keep:
            say(f"kept {ctx.tmp}")
        else:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return rc
