"""The stranding guard: refuse a commit that would silently corrupt another chain.

A commit of (base, top] into base changes base and drops the images above it. Any
*other* image whose backing chain passes through them keeps reading them afterwards,
and for some clusters reads different bytes than before. The 2012 design discussion
sorts every cluster of the committed range into four allocation cases; seen from an
image I of the range ("mid": I and the range's layers below it; "top": the range's
layers above I):

1. allocated in neither       nothing is copied; base is already right there
2. in mid only                mid's data is copied into base
3. in both mid and top        top's data is copied into base (last)
4. in top only                top's data is copied into base, under mid

Who breaks, and why:
- a dependant of **base** reads base directly: cases 2-4 change base under it;
- a dependant of an **intermediate** I reads I, then base where I has nothing: case 4
  changes what it reads (top's data appears under I). In restartable mode I is
  drained too (every cluster of I is marked unallocated once base holds the range's
  view), so case 3 breaks it as well: it then reads top's version instead of I's;
- the **top** of the range keeps its own view in both modes (nothing above it can
  land in base), so its dependants break only when the dropped images are deleted
  (`--delete`) or, in an active commit, because after the pivot the guest writes into
  base (case 1: base changes where nothing in the range is allocated).
An image above top (top's overlay, the active image) keeps its view by construction
(the commit rewrites its backing file to base), so a chain reaching the committed
chain through it is safe and not reported.

The scan reads headers only, without locks (like `qemu-img -U`): the directories
holding the chain's images (not recursive) plus every guard directory (recursive).
Files are identified by (st_dev, st_ino), so a symlink, a hard link or a path through
`..` to a chain image matches it and an unrelated file of the same name does not.
Only regular files are read, opened with O_NONBLOCK (a FIFO or a device never blocks
the scan) and never on a pseudo file system (/proc, /sys, tracefs...: their "regular"
files can block or have side effects); a walk never enters another file system's
mount (/proc, /sys, /dev included) unless it is a named guard directory; a scan that
takes longer than SCAN_SECONDS stops with an error.
Backing names are resolved as the chain resolves them (`qcow.chain.resolve_backing`:
relative to the directory of the naming image's path as given, no lexical
normalisation, so `link/../x` means what the kernel says). Each file's header is read
once per scan (one 4 KiB read), and each resolved path's verdict is remembered, so a
directory of thousands of clones of one golden image costs one read and one stat per
file.
"""

from __future__ import annotations

import json
import os
import shlex
import stat as stat_mod
import time
from collections import namedtuple

from qcow.chain import MAX_CHAIN, probe_format, resolve_backing
from qcow.errors import JobError, QcowError
from qcow.header import read_backing_info
from qcow.mountinfo import mounts
from qcow.paths import absolute

from .target import MODES

__all__ = ["Dependant", "find_dependants", "guard_commit", "guard_stream", "dependants_report"]

SCAN_SECONDS = 120.0

# file systems whose files are never images: reading them can block (trace_pipe,
# /proc/kmsg) or do things; our own flat views are raw by definition
_PSEUDO_FS = frozenset(
    """
    proc sysfs debugfs tracefs securityfs configfs cgroup cgroup2
    pstore bpf fusectl efivarfs devtmpfs devpts mqueue binfmt_misc
    autofs rpc_pipefs nsfs hugetlbfs fuse.qcowfs
    """.split()
)


# --------------------------------------------------------------------------- results


_DEPENDANT_FIELDS = (
    "path",  # the dependant image, as the scan found it
    "depends_on",  # the chain image it reads through, as the chain names it
    "kind",  # 'base' | 'intermediate'
    "via",  # the image whose header names `depends_on` (== path if direct)
    "backing_name",  # the name written in `via`'s header
    "route",  # path -> ... -> depends_on, each name resolved as QEMU does
    "cases",  # the allocation cases (1-4) that change what it reads
    "base",  # the commit's base
    "above",  # the range's layers above `depends_on` (top first)
    "is_top",  # depends_on is the topmost image of the range
    "active",  # an active commit (top is the active image)
    "mode",
    "depends_on_format",
)


class Dependant(namedtuple("Dependant", _DEPENDANT_FIELDS)):
    """An image outside the committed chain whose backing chain reads through an image
    the commit changes (kind 'base') or invalidates (kind 'intermediate')."""

    __slots__ = ()

    # --- wording ---------------------------------------------------------------

    def _cases_text(self):
        c = list(self.cases)
        if not c:
            return "no allocation case"
        if len(c) == 1:
            return f"case {c[0]}"
        if c == list(range(c[0], c[-1] + 1)):
            return f"cases {c[0]}-{c[-1]}"
        return "cases " + ", ".join(map(str, c[:-1])) + f" and {c[-1]}"

    def _copy_path(self):
        stem, ext = os.path.splitext(self.depends_on)
        return f"{stem}-copy{ext or '.qcow2'}"

    def _name_for(self, target):
        """`target` as `via`'s header should name it (rebase writes the name verbatim,
        and a relative name resolves against via's directory)."""
        if os.path.dirname(target) == os.path.dirname(self.via):
            return os.path.basename(target)
        return target

    def fix_commands(self):
        """Commands (argv lists) that keep the dependant's view valid across the commit:
        give `via` a backing file of its own holding what it reads today. For base, a
        plain copy does it; for an image of the range a copy is not enough (case 4
        still lands in base, under the copy), so it is flattened into a standalone image."""
        copy = self._copy_path()
        if self.kind == "base":
            fmt = self.depends_on_format
            first = ["cp", "--sparse=always", self.depends_on, copy]
        else:
            fmt = "qcow2"
            first = [
                "qemu-img",
                "convert",
                *(["-U"] if self.active and self.is_top else []),
                "-O",
                "qcow2",
                self.depends_on,
                copy,
            ]
        return [
            first,
            ["qemu-img", "rebase", "-u", "-b", self._name_for(copy), "-F", fmt, self.via],
        ]

    def suggestion(self):
        cmds = " && ".join(shlex.join(c) for c in self.fix_commands())
        if self.kind == "intermediate" and self.is_top and not self.active:
            return (
                f"keep {self.depends_on} (commit without --delete: its view does not "
                f"change), or first run {cmds}"
            )
        return f"to keep it valid, first run {cmds}; or commit later"

    def reason(self):
        """What the commit does to the dependant, with the allocation cases."""
        dep, base = self.depends_on, self.base or "base"
        above = ", ".join(self.above) or "the layers above it"
        through = f" (through {self.via})" if self.via != self.path else ""
        pivot = f"; after the pivot the guest writes into {base}" if self.active else ""
        if self.kind == "base":
            rng = ", ".join(self.above) or "the committed range"
            return (
                f"depends on {dep}{through}, the base this commit writes into, which "
                f"changes under it: {self._cases_text()} break it (every cluster "
                f"allocated in {rng} is copied into {dep}{pivot})"
            )
        if self.is_top:
            if self.active:
                return (
                    f"reads through {dep}{through}, the active image this commit "
                    f"pivots away from: {self._cases_text()} breaks it (where nothing "
                    f"in the range is allocated it reads {base}, into which the guest "
                    f"writes after the pivot)"
                )
            return (
                f"reads through {dep}{through}, the top of this commit: "
                f"{self._cases_text()} changes what it reads, but {dep} leaves the "
                f"chain, and deleting the dropped images (--delete) would leave it "
                f"without its backing file"
            )
        if self.mode == "restartable":
            what = (
                f"{dep} is drained into {base}: a cluster allocated in both {dep} and "
                f"{above} then reads as {above}'s, and one allocated in {above} but not "
                f"in {dep} is copied into {base}, under {dep}"
            )
        else:
            what = (
                f"a cluster allocated in {above} but not in {dep} is copied into "
                f"{base}, which it reads under {dep}"
            )
        return (
            f"reads through {dep}{through}, which this commit invalidates: "
            f"{self._cases_text()} break{'s' if len(self.cases) == 1 else ''} it "
            f"({what}{pivot})"
        )

    def message(self):
        """One line: the dependant, the image it depends on, the cases, what to do."""
        return _printable(f"{self.path}: {self.reason()}; {self.suggestion()}")

    def to_dict(self):
        d = self._asdict()
        d["route"] = list(self.route)
        d["cases"] = list(self.cases)
        d["above"] = list(self.above)
        d["message"] = self.message()
        return d


def _printable(text):
    """One printable line whatever the file names hold (newlines, bytes that are not
    UTF-8 and come back from the file system as surrogates)."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- scanning


def _key(st):
    return (st.st_dev, st.st_ino)


def _check_dir(d):
    try:
        st = os.stat(d)
    except OSError as e:
        raise QcowError(d, f"guard directory: {e.strerror}") from None
    except ValueError:  # a NUL byte: no such name can exist
        raise QcowError(d.replace("\0", "\\0"), "guard directory: no such directory") from None
    if not stat_mod.S_ISDIR(st.st_mode):
        raise QcowError(d, "guard directory: not a directory")


class _Scan:
    """One scan: header results cached by inode, chain verdicts by resolved path."""

    def __init__(self, targets, stop_keys, guard_dirs=()):
        self.targets = targets  # key -> chain path, the images that break dependants
        self.stop_keys = stop_keys  # keys of the committed chain (kept members stop a walk)
        self.headers = {}  # key -> HeaderInfo | None
        self.verdict = {}  # path -> (route, backing_name, target key) | None
        self.files = 0  # files examined (for the benchmark)
        self.pseudo = _pseudo_devices()
        self.guard_dirs = guard_dirs
        self.deadline = time.monotonic() + SCAN_SECONDS

    def check_time(self, where):
        if time.monotonic() > self.deadline:
            dirs = ", ".join(self.guard_dirs) or where
            raise JobError(
                where,
                f"stranding guard: scanning {dirs} took more than "
                f"{SCAN_SECONDS:g} s; name narrower guard directories",
            )

    # --- one file's header -----------------------------------------------------

    def header(self, path, key):
        if key in self.headers:
            return self.headers[key]
        self.check_time(path)
        self.headers[key] = info = _read_header(path, self.pseudo)
        return info

    # --- one candidate's backing chain -------------------------------------------

    def follow(self, path, key):
        """(route, backing_name, target key) when the backing chain of the image at
        `path` (opened by that name) reaches a target before any other chain image;
        else None. Unreadable, looping or dangling chains are None: nothing we can read
        depends on us through them."""
        trail = []
        seen = set()
        cur, ckey = path, key
        result = None
        while True:
            if cur in self.verdict:
                result = self.verdict[cur]
                break
            if ckey in seen or len(trail) >= MAX_CHAIN:
                break
            seen.add(ckey)
            trail.append(cur)
            info = self.header(cur, ckey)
            if info is None or info.format != "qcow2" or not info.backing_name:
                break
            if cur == path and info.drained_into:
                break  # drained and dropped by a restartable commit: a leftover
            name, bfmt = info.backing_name, info.backing_format
            try:
                nxt = resolve_backing(name, cur)
                st = os.stat(nxt)
            except (QcowError, OSError, ValueError):
                break
            nkey = _key(st)
            if nkey in self.targets:
                result = ((nxt,), name, nkey)
                break
            if nkey in self.stop_keys:
                break  # a kept image of the chain: its view survives the commit
            if bfmt not in (None, "qcow2") or not stat_mod.S_ISREG(st.st_mode):
                break  # opened as raw (or a device): the chain ends there
            cur, ckey = nxt, nkey
        for p in reversed(trail):
            if result is not None:
                result = ((p,) + result[0], result[1], result[2])
            self.verdict[p] = result
        return result


def _pseudo_devices():
    """st_dev of every mounted pseudo file system (from /proc/self/mountinfo)."""
    devs = set()
    for m in mounts():
        if m.fstype in _PSEUDO_FS:
            major, minor = m.dev.split(":")
            devs.add(os.makedev(int(major), int(minor)))
    return devs


def _read_header(path, pseudo):
    """qcow.header.HeaderInfo from the header alone, no lock; None when the file is not
    a regular file of a real file system, cannot be read, or its header does not parse
    (hostile headers must not stop the scan). A symlink is followed to a regular file
    only: the file is opened non-blocking and checked before anything is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode) or st.st_dev in pseudo:
                return None
            return read_backing_info(path, f)
        except (OSError, QcowError):
            return None


def _candidates(flat_dirs, recursive_dirs, scan):
    """(path, key, is_symlink) of every regular file in scope, each directory once. A
    recursive walk stays on the file system of the directory it started from."""
    listed = set()  # dir keys whose files were listed
    descended = set()  # dir keys walked recursively

    def entries(d):
        try:
            with os.scandir(d) as it:
                return list(it)
        except OSError:
            return []

    def files_of(d, ents):
        for e in ents:
            try:
                if not e.is_file():
                    continue
                yield e.path, _key(e.stat()), e.is_symlink()
            except OSError:
                continue

    def dir_key(d):
        try:
            return _key(os.stat(d))
        except OSError:
            return None

    for d in flat_dirs:
        k = dir_key(d)
        if k is None or k in listed:
            continue
        listed.add(k)
        yield from files_of(d, entries(d))
    stack = [(d, None) for d in reversed(recursive_dirs)]
    while stack:
        d, dev = stack.pop()
        scan.check_time(d)
        k = dir_key(d)
        if k is None or k in descended:
            continue
        descended.add(k)
        root_dev = k[0] if dev is None else dev
        ents = entries(d)
        if k not in listed:
            listed.add(k)
            yield from files_of(d, ents)
        subdirs = []
        for e in ents:
            try:
                if (
                    e.is_dir(follow_symlinks=False)
                    and e.stat(follow_symlinks=False).st_dev == root_dev
                ):
                    subdirs.append(e.path)
            except OSError:
                continue
        stack.extend((s, root_dev) for s in reversed(sorted(subdirs)))


def _scan(chain_paths, targets, guard_dirs, exclude):
    """[(path, route, backing_name, target key)] for every file in scope (not a chain
    image, not excluded) whose chain reaches a target; one entry per file (by inode),
    preferring a path that is not a symlink."""
    chain_paths = [absolute(p) for p in chain_paths]
    guard_dirs = [absolute(d) for d in guard_dirs]
    for d in guard_dirs:
        _check_dir(d)
    stop = set()
    for p in chain_paths:
        try:
            stop.add(_key(os.stat(p)))
        except OSError:
            pass
    skip = set(stop)
    for p in exclude:
        try:
            skip.add(_key(os.stat(absolute(p))))
        except OSError:
            pass
    scan = _Scan(targets, stop, guard_dirs)
    flat = []
    for p in chain_paths:
        d = os.path.dirname(p)
        if d not in flat:
            flat.append(d)
    found = {}
    for path, key, is_link in _candidates(flat, guard_dirs, scan):
        scan.files += 1
        if key in skip:
            continue
        prev = found.get(key)
        if prev is not None and (prev[0], prev[1]) <= (is_link, path):
            continue
        hit = scan.follow(path, key)
        if hit is not None:
            found[key] = (is_link, path, hit)
    out = [(path, hit[0], hit[1], hit[2]) for _, path, hit in found.values()]
    out.sort(key=lambda r: r[0])
    return out, scan


def _target_keys(paths):
    keys = {}
    for p in paths:
        p = absolute(p)
        try:
            keys.setdefault(_key(os.stat(p)), p)
        except OSError:
            pass
    return keys


def _probe_format(path):
    try:
        return probe_format(path)
    except OSError:
        return "raw"


def _chain_order(chain_paths):
    """[(inode key or None, path)] of the chain, top first, for the wording."""
    order = []
    for p in chain_paths:
        try:
            order.append((_key(os.stat(p)), p))
        except OSError:
            order.append((None, p))
    return order


def _broken_cases(kind, is_top, active, mode):
    """The allocation cases (module doc) that change what a dependant of a `kind` image
    reads."""
    if kind == "base":
        return (1, 2, 3, 4) if active else (2, 3, 4)
    if is_top:
        return (1,) if active else ()
    if active:
        return (1, 4)
    return (3, 4) if mode == "restartable" else (4,)


def find_dependants(
    chain_paths,
    changed,
    invalidated,
    guard_dirs=(),
    exclude=(),
    *,
    mode="simple",
    top=None,
    active=False,
):
    """Every image in scope, outside the chain, whose backing chain reads through an
    image in `changed` (kind 'base') or `invalidated` (kind 'intermediate').

    chain_paths: the chain being committed, top first (as `chain.layers` gives them);
    its images are never reported, and a walk that meets one of them that is in
    neither set stops there (that image keeps its view). Scope: the directories
    holding chain_paths (not recursive) plus guard_dirs (recursive). exclude: more
    files not to report. mode/top/active only refine the wording (which allocation
    cases break each dependant): top is the topmost image of the range (default: the
    topmost chain image in changed or invalidated), active says top is the active
    image. Sorted by dependant path.
    """
    chain_paths = [absolute(p) for p in chain_paths]
    base_keys = _target_keys(changed)
    inter_keys = {k: p for k, p in _target_keys(invalidated).items() if k not in base_keys}
    targets = {**inter_keys, **base_keys}
    if not targets:
        return []
    hits, _ = _scan(chain_paths, targets, guard_dirs, exclude)
    if not hits:
        return []

    order = _chain_order(chain_paths)
    index = {k: i for i, (k, _) in enumerate(order) if k is not None}
    range_keys = [k for k in targets if k in index]
    top_key = next(iter(_target_keys([top])), None) if top is not None else None
    if top_key in index:
        top_i = index[top_key]
    else:
        top_i = min((index[k] for k in range_keys), default=0)
    base_path = next(iter(base_keys.values()), None)
    base_i = index.get(next(iter(base_keys), None), len(order))
    fmt_cache = {}

    out = []
    for path, route, name, tkey in hits:
        kind = "base" if tkey in base_keys else "intermediate"
        dep = targets[tkey]
        i = index.get(tkey)
        is_top = kind == "intermediate" and i == top_i
        if kind == "base":
            above = tuple(p for _, p in order[top_i:base_i])
        else:
            above = tuple(p for _, p in order[top_i:i]) if i is not None else ()
        cases = _broken_cases(kind, is_top, active, mode)
        if dep not in fmt_cache:
            fmt_cache[dep] = _probe_format(dep)
        via = route[-2] if len(route) >= 2 else path
        out.append(
            Dependant(
                path=path,
                depends_on=dep,
                kind=kind,
                via=via,
                backing_name=name,
                route=tuple(route),
                cases=cases,
                base=base_path,
                above=above,
                is_top=is_top,
                active=active,
                mode=mode,
                depends_on_format=fmt_cache[dep],
            )
        )
    return out


# --------------------------------------------------------------------------- entries


def guard_commit(chain_layer_paths, base_index, top_index, mode, guard_dirs, force, *, delete=True):
    """The check the commit engine runs before every start (live, offline, each
    restart). chain_layer_paths: top first; commits (base, top] into base.

    Changed: base. Invalidated: the images strictly between top and base (in
    restartable mode these are the drained layers), plus top itself when the commit is
    active (the guest writes into base after the pivot) or when the dropped images may
    be deleted (`delete`, the job's --delete; True when unknown). Raises JobError (a
    summary line, then one line per dependant) when dependants exist and not force;
    otherwise returns them, so a forced job can say what it stranded.
    """
    paths = [os.fspath(p) for p in chain_layer_paths]
    if not 0 <= top_index < base_index < len(paths):
        raise JobError(
            paths[0] if paths else None,
            f"bad commit range: top index {top_index}, base index {base_index} "
            f"in a chain of {len(paths)} images",
        )
    if mode not in MODES:
        raise JobError(paths[top_index], f"unknown commit mode '{mode}'")
    active = top_index == 0
    base, top = paths[base_index], paths[top_index]
    invalidated = paths[top_index + 1 : base_index]
    if active or delete:
        invalidated = [top] + invalidated
    deps = find_dependants(
        paths,
        [base],
        invalidated,
        guard_dirs,
        mode="simple" if active else mode,
        top=top,
        active=active,
    )
    if deps and not force:
        n = len(deps)
        summary = (
            f"refusing to commit into {base}: {n} image{'s' if n > 1 else ''} "
            f"outside the chain depend{'s' if n == 1 else ''} on what the commit "
            f"changes; nothing was touched (--force commits anyway and strands "
            f"{'them' if n > 1 else 'it'})"
        )
        raise JobError(top, "\n".join([summary] + [d.message() for d in deps]))
    return deps


def dependants_report(image, guard_dirs, as_json=False):
    """`qcowfs info IMAGE --dependants [--guard-dir DIR]`: every qcow2 image in scope
    whose backing chain reads through IMAGE (directly or through other images), one
    line each (`DEPENDANT -> ... -> IMAGE`), or a JSON list. Scope: the directories of
    IMAGE's chain plus the guard directories. Exit status 0."""
    import qcow

    with qcow.open_chain(image, image_locking=False, metadata_only=True) as chain:
        chain_paths = [layer.path for layer in chain.layers]
    targets = _target_keys([image])
    hits, _ = _scan(chain_paths, targets, guard_dirs or (), ())
    rows = []
    for path, route, name, _ in hits:
        rows.append(
            {
                "filename": path,
                "depends-on": os.fspath(image),
                "via": route[-2] if len(route) >= 2 else path,
                "backing-filename": name,
                "backing-chain": list(route),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=4))
        return 0
    for r in rows:
        print(_printable(" -> ".join(r["backing-chain"][:-1] + [r["depends-on"]])))
    if not rows:
        import sys

        scope = sorted(
            {os.path.dirname(p) for p in chain_paths} | {absolute(d) for d in guard_dirs or ()}
        )
        print(
            _printable(f"no image depends on {image} (searched {', '.join(scope)})"),
            file=sys.stderr,
        )
    return 0


def guard_stream(chain_layer_paths, dropped, guard_dirs, force):
    """The check before a stream that deletes the images it drops (`--delete`):
    streaming itself changes no image anyone else reads, but an image outside the
    chain reading through a dropped one loses its backing file. Raises JobError (a
    summary line, then one line per dependant) unless force; returns them."""
    paths = [os.fspath(p) for p in chain_layer_paths]
    deps = find_dependants(paths, [], list(dropped), guard_dirs)
    if deps and not force:
        n = len(deps)
        lines = [
            f"refusing to stream with --delete: {n} image{'s' if n > 1 else ''} "
            f"outside the chain read{'s' if n == 1 else ''} through the images it "
            f"would delete; nothing was touched (stream without --delete keeps "
            f"them; --force deletes anyway)"
        ]
        raise JobError(paths[0], "\n".join(lines + [stream_dependant_line(d) for d in deps]))
    return deps


def stream_dependant_line(d):
    through = f" (through {d.via})" if d.via != d.path else ""
    return _printable(
        f"{d.path}: reads through {d.depends_on}{through}, which stream --delete deletes"
    )
