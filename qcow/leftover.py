"""Leftovers: images a commit dropped from their chain or pivoted away from.

Such an image carries EXT_QCOWFS_DRAINED (the base its data went into). Opened as the
top of a chain it shows a disk without everything written after the commit, so
`mount` and a writable `open_chain` refuse it unless forced.

One shape is not stale: a commit that marked (part of) its range and then stopped (a
crash) before the overlay's header was rewritten to name base. There the leftovers sit
below an overlay with their base further down the same chain, and the chain still reads
right (base already holds their data); a restarted commit finishes the drop. (An
overlay someone created on a leftover afterwards looks the same and is let through.)
"""

import os

from .errors import ChainError


def leftover_of(layer):
    """The base a commit put `layer`'s data into, or None if it is no leftover."""
    header = getattr(layer, "header", None)
    return getattr(header, "drained_into", None)


def refuse_leftovers(layers):
    """ChainError naming the first leftover that makes the chain `layers` (top first)
    stale."""
    for i, layer in enumerate(layers):
        into = leftover_of(layer)
        if into and not (i > 0 and _unfinished_drop(layers, i, into)):
            raise ChainError(
                layer.filename,
                f"is a leftover of a commit into {into} and "
                f"may be out of date; use {into} instead "
                f"(--force opens it anyway)",
            )


def _unfinished_drop(layers, i, into):
    return os.path.exists(into) and any(
        os.path.samefile(layer.path, into) for layer in layers[i + 1 :]
    )
