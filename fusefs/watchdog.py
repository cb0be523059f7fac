"""Making a hang diagnosable: thread dumps on demand, and a watchdog for stuck requests.

A frozen block device takes its guest down, so a daemon that stops answering must say
where it stands:
- SIGQUIT or SIGUSR1 writes every thread's Python stack to the log (`faulthandler`,
  which works even when the trio thread itself is stuck);
- a watchdog thread logs one warning, with every thread's stack, when a FUSE request
  has been in flight longer than QCOWFS_WATCHDOG_SECONDS (default 30), or when the trio
  loop has not run for that long. It is a thread, not a trio task, so that it still
  runs when the loop is blocked.
Per request it costs one dict insert and one pop.
"""

import faulthandler
import itertools
import logging
import os
import signal
import threading
import time

log = logging.getLogger("qcowfs.watchdog")

DEFAULT_LIMIT = 30.0


def install_thread_dump(stream):
    """SIGQUIT / SIGUSR1 -> all threads' stacks into `stream` (a file with a fileno)."""
    for sig in (signal.SIGQUIT, signal.SIGUSR1):
        faulthandler.register(sig, file=stream, all_threads=True, chain=False)


class Watchdog:
    def __init__(self, stream, limit=None, period=1.0):
        self.stream = stream  # () -> the file the stacks go to (the log's now)
        self.limit = (
            limit
            if limit is not None
            else float(os.environ.get("QCOWFS_WATCHDOG_SECONDS", DEFAULT_LIMIT))
        )
        self.period = min(period, self.limit / 2)
        self.inflight = {}  # token -> (start, what, offset, length)
        self._tokens = itertools.count()
        self.loop_beat = time.monotonic()
        self._warned = set()
        self._stop = threading.Event()
        self._thread = None

    # -- the hot path ----------------------------------------------------------------

    def begin(self, what, offset, length):
        token = next(self._tokens)
        self.inflight[token] = (time.monotonic(), what, offset, length)
        return token

    def end(self, token):
        self.inflight.pop(token, None)

    # -- the loop's heartbeat (a trio task) ------------------------------------------

    async def heartbeat(self):
        import trio

        while True:
            self.loop_beat = time.monotonic()
            await trio.sleep(self.period)

    # -- the watchdog thread ---------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._watch, name="qcowfs-watchdog", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self):
        loop_warned = False
        while not self._stop.wait(self.period):
            now = time.monotonic()
            stuck = [
                (token, entry)
                for token, entry in list(self.inflight.items())
                if now - entry[0] > self.limit and token not in self._warned
            ]
            for token, (start, what, offset, length) in stuck:
                self._warned.add(token)
                self._dump(
                    f"a FUSE {what} request (offset {offset}, {length} bytes) "
                    f"has been in flight for {now - start:.0f} s"
                )
            self._warned &= set(self.inflight)
            late = now - self.loop_beat > self.limit
            if late and not loop_warned:
                self._dump(f"the trio event loop has not run for {now - self.loop_beat:.0f} s")
            loop_warned = late

    def _dump(self, what):
        log.warning("watchdog: %s; the stacks of every thread follow", what)
        for handler in logging.getLogger().handlers:
            handler.flush()
        try:
            stream = self.stream()
            faulthandler.dump_traceback(file=stream, all_threads=True)
            stream.flush()
        except (OSError, ValueError, TypeError):
            pass
