"""The construct primitives the on-disk structures are declared with.

construct imports pdb, inspect, pickle and hashlib when it loads, for features qcowfs
never calls (its Debugger, Pickled and compile()); with the modules they pull in that
was about 30 ms of every command's start, a third of an offline command's imports
(issue 13). While construct loads, those names stand for deferred modules: the real
module is imported on the first attribute looked up through one, so the features still
work if anything ever uses them.
"""

import importlib
import sys
import types

_UNUSED_AT_IMPORT = ("pdb", "inspect", "pickle", "hashlib")


class _Deferred(types.ModuleType):
    """Stands for a module not imported yet: the first attribute imports it."""

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self.__name__), attr)


def _import_construct():
    stand_ins = [name for name in _UNUSED_AT_IMPORT if name not in sys.modules]
    for name in stand_ins:
        sys.modules[name] = _Deferred(name)
    try:
        importlib.import_module("construct")
    finally:
        for name in stand_ins:  # any later import finds the real module
            del sys.modules[name]


if "construct" not in sys.modules:
    _import_construct()

from construct import (  # noqa: E402  (after the import above)
    Bytes,
    Const,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
)

__all__ = ["Bytes", "Const", "Int8ub", "Int16ub", "Int32ub", "Int64ub", "Padding", "Struct"]
