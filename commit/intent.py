"""A commit's durable intent, so that an interrupted commit resumes on the next mount.

Before its first write a (non-active) commit records what it does — job id, mode, top,
base, forced, speed — in a qcowfs header extension (EXT_QCOWFS_COMMIT) of the overlay of its
top: that image stays in the chain until the very end (a restartable commit drops the
drained layers below it, never it), is always qcow2 (a raw base could hold nothing),
and QEMU ignores and keeps the extension. The record is removed when the job
completes or is cancelled; after a kill -9 or a power cut it is still there, and
`qcowfs mount` resumes the job (a restartable commit from where the durable state
says, a simple one from scratch: both are safe to run again).

An active commit records nothing: it changes nothing the chain reads before its
pivot, so after a crash there is nothing to finish.
"""

import json
import logging

from qcow.errors import QcowError
from qcow.header import EXT_QCOWFS_COMMIT

log = logging.getLogger("qcowfs.commit")


def with_intent(target, job_id, force, speed, steps):
    """Wrap a commit's steps: the record is written before the first step and removed
    once the steps return or are closed (a cancel); an error leaves it."""
    if target.active:
        return (yield from steps)
    chain = target.chain
    overlay = chain.layers[target.top_index - 1].path
    record = {
        "job-id": job_id,
        "mode": target.mode,
        "top": target.top_path,
        "base": target.base_path,
        "force": bool(force),
        "speed": int(speed or 0),
    }
    if target.backing_file is not None:
        record["backing-file"] = target.backing_file
    recorded = _set(chain, overlay, record)
    try:
        result = yield from steps
    except GeneratorExit:
        if recorded:
            _set(chain, overlay, None)
        raise
    if recorded:
        _set(chain, overlay, None)
    return result


def _set(chain, path, record):
    """Write (or with None remove) the record in the layer at `path`, durably. False
    when it does not fit in the header (tiny clusters): the job then runs unrecorded."""
    layer = next(layer for layer in chain.layers if layer.path == path)
    data = json.dumps(record, sort_keys=True).encode() if record is not None else None
    if layer.header.extension(EXT_QCOWFS_COMMIT) == data:
        return True
    was_read_only = layer.read_only
    if was_read_only:
        layer = chain.reopen(layer, True)
    try:
        # the record relies on nothing else in the image: not behind the guest's writes
        layer.set_extension(EXT_QCOWFS_COMMIT, data, flush_first=False)
    except QcowError as e:
        log.warning(
            "%s: cannot record the commit's intent (%s); if it is interrupted, "
            "start it again by hand",
            path,
            e.message,
        )
        return False
    finally:
        if was_read_only:
            chain.reopen(layer, False)
    return True


def resume_plan(chain, read_only, no_resume):
    """What a mount does about a commit record in its chain: None when there is none,
    else (one line for the user, block-commit arguments to resume it or None)."""
    found = pending_commit(chain)
    if found is None:
        return None
    layer, record = found
    what = f"{layer.path}: {describe(record)}"
    if "error" in record:
        return f"{what}; ignored", None
    if read_only:
        return f"{what} is pending; not resumed on a read-only mount", None
    if no_resume:
        return f"{what} is pending; left as it is (--no-resume)", None
    paths = {lyr.path for lyr in chain.layers}
    if record["top"] not in paths or record["base"] not in paths:
        clear_record(chain, layer)  # it got as far as dropping top: done
        return f"{what} had finished; its record is removed", None
    args = {
        "job-id": record["job-id"],
        "top": record["top"],
        "base": record["base"],
        "x-mode": record["mode"],
    }
    if record.get("force"):
        args["x-force"] = True
    if isinstance(record.get("speed"), int) and record["speed"] > 0:
        args["speed"] = record["speed"]
    if isinstance(record.get("backing-file"), str):
        args["backing-file"] = record["backing-file"]
    return f"{what}: resuming it", args


def pending_commit(chain):
    """(layer, record) of the first layer holding a commit record, or None."""
    for layer in chain.layers:
        record = getattr(layer, "header", None) and layer.header.pending_commit
        if record:
            return layer, record
    return None


def clear_record(chain, layer):
    """Remove a record whose commit already finished (its top left the chain)."""
    _set(chain, layer.path, None)


def describe(record):
    """One line's worth: what the interrupted commit was."""
    if "error" in record:
        return record["error"]
    return (
        f"an interrupted commit (job '{record['job-id']}', {record['mode']} mode) of "
        f"{record['top']} into {record['base']}"
    )
