"""The control socket: a QMP subset that QEMU's `qemu.qmp` client library can drive.

Sans-I/O at the core, in the manner of h11:

* `jsonstream` — QEMU's JSON stream reader (bytes in, JSON values out, bounded);
* `protocol` — one client's session (greeting, capabilities negotiation, schema check,
  dispatch to the command table, reply and event encoding), no sockets, no trio;
* `server` — the trio server on a Unix socket (accept loop, one task per client,
  client and buffer bounds, event broadcast);
* `client` — the blocking client the command line talks to a mount with;
* `address` — a socket address for a path longer than sun_path.

Importing this package loads only the client side: the server (and trio) load on first
use of one of their names, so a CLI command that only talks to a mount starts fast.
"""

from importlib import import_module

from commit.qapi import COMMAND_NOT_FOUND  # callers tell a missing command by its class

from ..mountrecord import default_socket_path
from .client import QMPCallError, QMPConnection

# name -> submodule, loaded on first access
_LAZY = {
    "QMPServer": "server",
    "QMPProtocol": "protocol",
    "Request": "protocol",
    "format_event": "protocol",
    "JSONStreamer": "jsonstream",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)


__all__ = ["COMMAND_NOT_FOUND", "QMPCallError", "QMPConnection", "default_socket_path", *_LAZY]
