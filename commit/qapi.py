"""QMP's command plumbing shared by the job manager (commit/jobmanager.py) and the control
socket (fusefs/qmp/): QEMU's error classes, the errors a handler raises, and the one
schema every command's arguments are checked against, with QAPI's messages, before
anything runs. No I/O, no trio.

The schema (`SCHEMA`) is written in QAPI's own notation, one dict per command:
argument name -> type, a leading '*' marking an optional argument. A type is a
built-in ('str', 'int', 'size', 'bool', 'number', 'any'), the name of an enum in
`ENUMS`, or a one-item list for an array of that type (['str']). A command adds itself
with `SCHEMA["my-command"] = {"device": "str", "*speed": "int"}`; a command without an
entry takes no arguments. The control socket (fusefs.qmp.protocol) checks every
command against it before the command's handler runs, so handlers trust their
arguments.
"""

import math

from qcow.errors import JobError

from .target import MODES

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"


class QMPError(Exception):
    """Raised by a command handler to send `{"error": {"class": cls, "desc": desc}}`."""

    def __init__(self, cls, desc):
        self.cls = cls
        self.desc = desc
        super().__init__(desc)


class JobCommandError(JobError):
    """A user command a job refuses: a GenericError with QEMU's text."""

    def __init__(self, message):
        super().__init__(None, message)


ENUMS = {
    "QMPCapability": ("oob",),
    "BlockdevOnError": ("report", "ignore", "enospc", "stop", "auto"),
    "x-CommitMode": MODES,
    "NewImageMode": ("existing", "absolute-paths"),
}

_JOB_VERB = {"device": "str"}
_JOB_ID = {"id": "str"}

SCHEMA = {
    # built into the protocol (fusefs/qmp/protocol.py)
    "qmp_capabilities": {"*enable": ["QMPCapability"]},
    "query-version": {},
    "query-commands": {},
    # the daemon (fusefs/daemon.py)
    "query-named-block-nodes": {"*flat": "bool"},
    "quit": {},
    # jobs (commit/jobmanager.py); block-commit's x- members are qcowfs extensions
    "query-block-jobs": {},
    "query-jobs": {},
    "block-job-cancel": {"device": "str", "*force": "bool"},
    "block-job-set-speed": {"device": "str", "speed": "int"},
    "block-job-pause": _JOB_VERB,
    "block-job-resume": _JOB_VERB,
    "block-job-complete": _JOB_VERB,
    "job-pause": _JOB_ID,
    "job-resume": _JOB_ID,
    "job-complete": _JOB_ID,
    "job-cancel": _JOB_ID,
    "job-dismiss": _JOB_ID,
    "block-commit": {
        "*job-id": "str",
        "*device": "str",
        "*base-node": "str",
        "*base": "str",
        "*top-node": "str",
        "*top": "str",
        "*speed": "int",
        "*on-error": "BlockdevOnError",
        "*auto-finalize": "bool",
        "*auto-dismiss": "bool",
        "*backing-file": "str",
        "*filter-node-name": "str",  # accepted; qcowfs puts no filter node in the graph
        "*x-mode": "x-CommitMode",
        "*x-guard-dirs": ["str"],
        "*x-force": "bool",
        "*x-delete": "bool",
    },
    "block-stream": {
        "*job-id": "str",
        "*device": "str",
        "*base": "str",
        "*base-node": "str",
        "*speed": "int",
        "*on-error": "BlockdevOnError",
        "*auto-finalize": "bool",
        "*auto-dismiss": "bool",
        "*x-guard-dirs": ["str"],
        "*x-force": "bool",
        "*x-delete": "bool",
    },
    # the daemon (fusefs/snapshot.py)
    "blockdev-snapshot-sync": {
        "*device": "str",
        "*node-name": "str",
        "snapshot-file": "str",
        "*snapshot-node-name": "str",
        "*format": "str",
        "*mode": "NewImageMode",
    },
}

# QAPI type -> the JSON type named in "expected: ..." and a test of the value
_INT64 = (-(1 << 63), 1 << 63)
_UINT64 = (0, 1 << 64)


def _is_int(v, bounds):
    return type(v) is int and bounds[0] <= v < bounds[1]


_BUILTINS = {
    "str": ("string", lambda v: isinstance(v, str)),
    "int": ("integer", lambda v: _is_int(v, _INT64)),
    "size": ("integer", lambda v: _is_int(v, _UINT64)),
    "bool": ("boolean", lambda v: isinstance(v, bool)),
    "number": ("number", lambda v: type(v) in (int, float) and math.isfinite(v)),
    "any": ("any", lambda v: True),
}


def check_value(name, typ, value):
    """Raise QMPError unless `value` is of QAPI type `typ` (`name` is for messages)."""
    if isinstance(typ, list):
        if not isinstance(value, list):
            raise _type_error(name, "array")
        for i, item in enumerate(value):
            check_value(f"{name}[{i}]", typ[0], item)
        return
    if typ in ENUMS:
        if not isinstance(value, str):
            raise _type_error(name, "string")
        if value not in ENUMS[typ]:
            raise QMPError(GENERIC_ERROR, f"Parameter '{name}' does not accept value '{value}'")
        return
    expected, ok = _BUILTINS[typ]
    if not ok(value):
        raise _type_error(name, expected)


def _type_error(name, expected):
    return QMPError(GENERIC_ERROR, f"Invalid parameter type for '{name}', expected: {expected}")


def check_arguments(arguments, members):
    """Check `arguments` (a dict) against one command's `members` (QAPI notation), in
    QEMU's order: each member in turn (missing, then its type), then unexpected keys.
    Raises QMPError(GenericError) with QEMU's text."""
    names = set()
    for key, typ in members.items():
        name = key.lstrip("*")
        names.add(name)
        if name not in arguments:
            if not key.startswith("*"):
                raise QMPError(GENERIC_ERROR, f"Parameter '{name}' is missing")
            continue
        check_value(name, typ, arguments[name])
    for key in arguments:
        if key not in names:
            raise QMPError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
