"""Thread locks of the format layer, and an optional lock-order checker (lockdep).

Every thread lock of `qcow` and `commit` is made here, by class name, so the order
between classes can be checked. The one order (outermost first):

    chain  ->  flush  ->  layer

- `chain` (Chain): the layer list and the order of guest writes; held for bookkeeping
  and bounded I/O only (a guest write's own data, never a fdatasync of the steady state);
- `flush` (one per layer): serialises a layer's flushes and header rewrites, and is
  held across their fdatasyncs; guest reads never take it;
- `layer` (one per layer): the layer's metadata (L1, L2 and refcount caches, header);
  held for in-memory work and bounded pwrites, never while calling up into the chain.
Two locks of one class are never held at once (a layer never calls into another).

With QCOWFS_LOCKDEP=1 in the environment (read once, at import), each lock records the
order in which every thread takes lock classes. Taking class B while holding class A
after some thread took A while holding B is an inversion: it raises `LockOrderError`
at once, carrying both stacks, even when the timing never produced the deadlock.
Without the switch `make_lock` returns a plain `threading.RLock`: nothing costs more.
"""

import os
import sys
import threading
import traceback

ORDER = ("chain", "flush", "layer")
ENABLED = os.environ.get("QCOWFS_LOCKDEP", "") not in ("", "0")


class LockOrderError(RuntimeError):
    """Two lock classes taken in both orders (a deadlock waiting for its timing)."""


def make_lock(cls):
    """A re-entrant lock of lock class `cls` (checked when lockdep is on)."""
    if not ENABLED:
        return threading.RLock()
    return CheckedLock(cls)


_graph_lock = threading.Lock()
_edges = {}  # (outer class, inner class) -> the stack that first took them so
_held = threading.local()


def _held_stack():
    stack = getattr(_held, "stack", None)
    if stack is None:
        stack = _held.stack = []
    return stack


def report(message):
    """Say it where a daemon's log and a test's output both show it."""
    sys.stderr.write(f"LOCKDEP: {message}\n")
    sys.stderr.flush()


class CheckedLock:
    """An RLock that checks the class order on every outermost acquisition."""

    def __init__(self, cls):
        self.cls = cls
        self._lock = threading.RLock()

    def _check(self):
        stack = _held_stack()
        if any(lock is self for lock in stack):
            return  # re-entry of a lock already held
        here = None
        for outer in stack:
            edge = (outer.cls, self.cls)
            if outer.cls == self.cls:
                here = here or "".join(traceback.format_stack(limit=24)[:-2])
                raise self._fail(f"two '{self.cls}' locks held at once", here, None)
            with _graph_lock:
                reverse = _edges.get((self.cls, outer.cls))
                if reverse is None and edge not in _edges:
                    here = here or "".join(traceback.format_stack(limit=24)[:-2])
                    _edges[edge] = here
            if reverse is not None:
                here = here or "".join(traceback.format_stack(limit=24)[:-2])
                raise self._fail(
                    f"'{self.cls}' taken while holding '{outer.cls}', "
                    f"but elsewhere '{outer.cls}' was taken while holding "
                    f"'{self.cls}'",
                    here,
                    reverse,
                )

    def _fail(self, what, here, other):
        message = f"lock order inversion: {what}\n--- this thread:\n{here}"
        if other:
            message += f"--- the other order, first seen:\n{other}"
        report(message)
        return LockOrderError(message)

    def acquire(self, blocking=True, timeout=-1):
        self._check()
        got = self._lock.acquire(blocking, timeout)
        if got:
            _held_stack().append(self)
        return got

    def release(self):
        stack = _held_stack()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is self:
                del stack[i]
                break
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def held_classes():
    """Lock classes the calling thread holds, outermost first (lockdep on only)."""
    return [lock.cls for lock in _held_stack()] if ENABLED else []


def reset():
    """Forget the recorded orders (tests that invert locks on purpose)."""
    with _graph_lock:
        _edges.clear()
