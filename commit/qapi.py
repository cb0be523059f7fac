"""QMP's command plumbing shared by the job manager (commit/job.py) and the control
socket (fusefs/qmp.py): QEMU's error classes, the error a handler raises, and argument
checking with QAPI's messages. No I/O, no trio.
"""

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


_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", dict: "object", list: "array", float: "number"}


def check_args(arguments, required=None, optional=None):
    """Validate a command's arguments the way QEMU's QAPI visitor does.

    `required`/`optional` map a parameter name to a type (str, int, bool, dict, list,
    float) or a tuple of types. Raises `QMPError(GenericError, ...)` with QEMU's text.
    Returns a dict with every optional parameter present (None when absent).
    """
    required = required or {}
    optional = optional or {}
    for key in arguments:
        if key not in required and key not in optional:
            raise QMPError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
    result = {}
    for spec, must in ((required, True), (optional, False)):
        for key, typ in spec.items():
            if key not in arguments:
                if must:
                    raise QMPError(GENERIC_ERROR, f"Parameter '{key}' is missing")
                result[key] = None
                continue
            value = arguments[key]
            types = typ if isinstance(typ, tuple) else (typ,)
            ok = False
            for t in types:
                if t is int:
                    ok = isinstance(value, int) and not isinstance(value, bool)
                elif t is float:
                    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                else:
                    ok = isinstance(value, t)
                if ok:
                    break
            if not ok:
                raise QMPError(
                    GENERIC_ERROR,
                    f"Invalid parameter type for '{key}', expected: {_TYPE_NAMES.get(types[0], types[0].__name__)}",
                )
            result[key] = value
    return result
