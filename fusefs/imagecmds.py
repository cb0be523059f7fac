"""`qcowfs info`, `map` and `check`: read-only inspection (check --repair aside).

info and map read metadata only and take no locks (like `qemu-img -U`), so they work on
a mounted chain too.
"""

import json
import sys

import qcow
from fusefs.mountrecord import mounted_hint
from qcow.check import EXIT_FAILED, check_refcounts_and_tables, format_report, report_json
from qcow.errors import QcowError
from qcow.header import COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from qcow.image import Qcow2Image
from qcow.image_locking import READER, WRITER, take_image_locks


def layer_info(layer, below):
    """One layer as `qemu-img info --output=json` describes it."""
    d = {
        "filename": layer.filename,
        "format": layer.format,
        "virtual-size": layer.virtual_size,
        "actual-size": _actual_size(layer),
    }
    if layer.format == "qcow2":
        h = layer.header
        d["cluster-size"] = layer.cluster_size
        d["dirty-flag"] = bool(h.incompatible_features & INCOMPAT_DIRTY)
        if layer.encrypted:
            d["encrypted"] = True
        data = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "compression-type": "zstd" if h.compression_type else "zlib",
            "lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": h.refcount_bits,
            "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
            "extended-l2": layer.extended_l2,
        }
        if h.version < 3:
            data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": h.refcount_bits}
        d["format-specific"] = {"type": "qcow2", "data": data}
        if h.drained_into:
            d["x-leftover-committed-into"] = h.drained_into
        if layer.snapshots:
            d["snapshots"] = [{"id": s.id, "name": s.name} for s in layer.snapshots]
        if h.pending_commit:
            d["x-pending-commit"] = h.pending_commit  # see commit/intent.py
        if layer.backing_name:
            d["backing-filename"] = layer.backing_name
            d["full-backing-filename"] = below.filename if below else layer.backing_name
            if layer.backing_format:
                d["backing-filename-format"] = layer.backing_format
    else:
        d["dirty-flag"] = False
    return d


def _actual_size(layer):
    import os

    return os.fstat(layer.io.fd).st_blocks * 512


def cmd_info(args):
    with qcow.open_chain(args.image, image_locking=False, metadata_only=True) as chain:
        layers = chain.layers
        infos = [
            layer_info(layer, layers[i + 1] if i + 1 < len(layers) else None)
            for i, layer in enumerate(layers)
        ]
    if args.dependants:
        from commit.guard import dependants_report

        return dependants_report(args.image, args.guard_dir, as_json=args.json)
    if args.json:
        print(json.dumps(infos, indent=4))
        return 0
    blocks = []
    for d in infos:
        lines = [
            f"image: {d['filename']}",
            f"file format: {d['format']}",
            f"virtual size: {_human(d['virtual-size'])} ({d['virtual-size']} bytes)",
            f"disk size: {_human(d['actual-size'])}",
        ]
        if "cluster-size" in d:
            lines.append(f"cluster_size: {d['cluster-size']}")
        if "backing-filename" in d:
            lines.append(f"backing file: {d['backing-filename']}")
            if "backing-filename-format" in d:
                lines.append(f"backing file format: {d['backing-filename-format']}")
        if d.get("encrypted"):
            lines.append("encrypted: yes")
        if d.get("x-leftover-committed-into"):
            lines.append(
                f"leftover: yes, a commit put its data into "
                f"{d['x-leftover-committed-into']} (mount refuses it without "
                f"--force)"
            )
        if d.get("snapshots"):
            lines.append("snapshots: " + ", ".join(s["name"] for s in d["snapshots"]))
        if d.get("x-pending-commit"):
            from commit.intent import describe

            lines.append(
                f"pending commit: {describe(d['x-pending-commit'])} (the next "
                f"'qcowfs mount' resumes it)"
            )
        fs = d.get("format-specific")
        if fs:
            lines.append("Format specific information:")
            lines += [f"    {k.replace('-', ' ')}: {_val(v)}" for k, v in fs["data"].items()]
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0


def _val(v):
    return str(v).lower() if isinstance(v, bool) else v


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def cmd_map(args):
    with qcow.open_chain(args.image, image_locking=False) as chain:
        extents = chain.block_status(0, chain.virtual_size, want_zero=True)
        names = [layer.filename for layer in chain.layers]
    if args.json:
        print("[" + ",\n".join(json.dumps(e.to_json()) for e in extents) + "]")
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for e in extents:
        if e.data and e.offset is not None:
            print(f"{e.start:<#20x}{e.length:<#20x}{e.offset:<#20x}{names[e.depth]}")
    return 0


def cmd_check(args):
    repair = bool(args.repair or args.repair_mode)  # -r leaks|all as qemu-img
    try:
        img = Qcow2Image(args.image, writable=repair, cache_bytes=16 << 20)
    except QcowError as e:
        print(f"qcowfs: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"qcowfs: {args.image}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    try:
        take_image_locks(img.io.fd, args.image, WRITER if repair else READER)
        if repair:
            img.repair_if_dirty()
        result = check_refcounts_and_tables(img, repair=repair)
        if repair and (result.corruptions or result.leaks):
            if args.output == "human":
                print(
                    "The following inconsistencies were found and repaired:\n\n"
                    f"    {result.leaks} leaked clusters\n    {result.corruptions} "
                    "corruptions\n\nDouble checking the fixed image now..."
                )
            fixed = result
            result = check_refcounts_and_tables(img)
            result.leaks_fixed = fixed.leaks - result.leaks
            result.corruptions_fixed = fixed.corruptions - result.corruptions
            if not result.corruptions and img.header.incompatible_features & INCOMPAT_DIRTY:
                img.mark_clean()
        if args.output == "json":
            print(json.dumps(report_json(result, args.image), indent=4))
        else:
            print(format_report(result))
        return result.exit_code
    except QcowError as e:
        print(f"qcowfs: {e}{mounted_hint(e, 'check')}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        img.close()
