"""The qcow2 format layer: headers, tables, refcounts, the backing chain.

Free of FUSE and trio: used offline (`qcowfs info/map/check`, offline commit), by the
mount, and by tests.
"""

from .chain import Chain, Extent, open_chain
from .errors import (
    ChainError,
    CorruptImage,
    ImageLockConflict,
    JobError,
    QcowError,
    UnsupportedImage,
)
from .malloc import tune_malloc

__all__ = [
    "open_chain",
    "Chain",
    "Extent",
    "tune_malloc",
    "QcowError",
    "CorruptImage",
    "UnsupportedImage",
    "ChainError",
    "ImageLockConflict",
    "JobError",
]
