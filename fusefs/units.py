"""Sizes and rates as people type them: `512K`, `10M`, `1G` (binary units, as qemu-img).

A plain number is bytes (a rate: bytes per second). The parsers raise QcowError with
one line naming the option, so the CLI prints it like any other user error.
"""

import re
import sys

from qcow.errors import QcowError

_UNITS = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
SMALL_RATE = 64 << 10  # a bare rate below this is most likely a forgotten suffix
MAX_RATE = (1 << 63) - 1  # QMP's speed is a signed 64-bit integer


def parse_size(text, option):
    """'10M' -> 10485760; (bytes, had_a_unit). QcowError naming `option` if malformed."""
    m = _SIZE.match(str(text))
    if not m:
        raise QcowError(
            None,
            f"{option} {text}: not a size (a number of bytes, or "
            f"with a binary unit: 512K, 10M, 1G)",
        )
    unit = m.group(2).upper()
    value = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    return int(value * (1 << _UNITS[unit])), bool(unit)


def parse_rate(text, option="--speed"):
    """Bytes per second; warns (stderr, one line) when a bare number looks too small
    to be meant as bytes per second."""
    rate, with_unit = parse_size(text, option)
    if rate > MAX_RATE:
        raise QcowError(None, f"{option} {text}: too large (at most {MAX_RATE} bytes/s)")
    if not with_unit and 0 < rate < SMALL_RATE:
        print(
            f"qcowfs: warning: {option} {text} means {rate} bytes/s (add a unit for "
            f"more: {rate}K, {rate}M)",
            file=sys.stderr,
        )
    return rate


def parse_mib(text, option="--cache-mib"):
    """A plain number is MiB (the option's name); with a unit it is converted, rounded
    up to whole MiB."""
    size, with_unit = parse_size(text, option)
    mib = -(-size // (1 << 20)) if with_unit else size
    if mib < 1:
        raise QcowError(None, f"{option} {text}: must be at least 1 MiB")
    return mib
