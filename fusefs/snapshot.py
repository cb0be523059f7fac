"""The live external snapshot of a mounted chain (QMP `blockdev-snapshot-sync`).

A new empty qcow2 overlay is created whose backing file is the active image (named
relative, by its file name, when both sit in one folder; else by absolute path); then,
in one hold of the chain's lock (between two guest requests), it becomes the active
layer with QEMU's write locks and the old active image is reopened read-only, so it
stops changing and can be copied (`qemu-img convert`) while the guest keeps writing.
Refused with one line when the new file exists, the mount is read-only, or a job runs
(a stream or active commit would lose its target; one job at a time keeps it simple).
"""

import logging
import os

import trio

from commit.qapi import GENERIC_ERROR, QMPError
from commit.target import node_names, require_active
from qcow.create import create_overlay
from qcow.errors import QcowError
from qcow.paths import absolute

log = logging.getLogger("qcowfs.snapshot")


def _check_supported(args):
    """What qcowfs does not do of blockdev-snapshot-sync (types were checked against
    commit.qapi.SCHEMA by the control socket)."""
    fmt = args.get("format", "qcow2")
    if fmt != "qcow2":
        raise QMPError(GENERIC_ERROR, f"format '{fmt}' is not supported for snapshots (only qcow2)")
    mode = args.get("mode", "absolute-paths")
    if mode != "absolute-paths":
        raise QMPError(
            GENERIC_ERROR,
            f"mode '{mode}' is not supported (only absolute-paths: qcowfs creates the new image)",
        )


def backing_name(new_path, active_path):
    """The name the new overlay's header gives the active image."""
    if os.path.dirname(new_path) == os.path.dirname(active_path):
        return os.path.basename(active_path)
    return active_path


def take_snapshot(chain, new_path):
    """Create the overlay and make it the active layer (blocking: a worker thread)."""
    old = chain.active
    create_overlay(new_path, old.virtual_size, backing_name(new_path, old.path), old.format)
    try:
        chain.flush()  # outside the lock: the switch then has little to do
        chain.push_overlay(new_path)
    except BaseException:
        os.unlink(new_path)
        raise
    log.info("snapshot: %s is the active image now; %s is read-only", new_path, old.path)


def check_new_image(new_path, mountpoint):
    """Refuse a snapshot file that exists, or that lies inside the mount itself (the
    mount holds only the flat file; and the daemon cannot create its own images under
    its own mountpoint). Blocking, and it may look up names in this very mount: a
    worker thread, never the trio thread, whose loop answers those lookups."""
    real = os.path.realpath(os.path.dirname(new_path))
    top = os.path.realpath(mountpoint)
    if os.path.commonpath([real, top]) == top:
        raise QcowError(new_path, f"is inside the mount {mountpoint}: put the new image elsewhere")
    if os.path.lexists(new_path):
        raise QcowError(new_path, "already exists; a snapshot creates a new image")


def make_snapshot_command(chain, jobs, read_only, mountpoint):
    """The handler of blockdev-snapshot-sync for a mount."""

    async def handler(args):
        _check_supported(args)
        async with jobs.start_lock:  # no job starts during the switch
            node = args.get("node-name", args.get("device"))
            await trio.to_thread.run_sync(
                require_active,
                chain,
                node,
                "is not the active image: only the active image can be snapshotted",
            )
            new_path = absolute(args["snapshot-file"])
            if read_only:
                raise QcowError(new_path, "the mount is read-only: no snapshot")
            running = [job.id for job in jobs.jobs() if job.status not in ("concluded", "null")]
            if running:
                raise QcowError(
                    new_path, f"job '{running[0]}' is running; take the snapshot once it has ended"
                )
            await trio.to_thread.run_sync(check_new_image, new_path, mountpoint)
            names = node_names(chain)
            wanted = args.get("snapshot-node-name")
            if wanted is not None:  # before the switch: a query in between sees it named
                names.claim(chain, new_path, wanted)
            try:
                await trio.to_thread.run_sync(take_snapshot, chain, new_path)
            except BaseException:
                names.forget(new_path)
                raise
        return {}

    return handler
