"""A hang is diagnosable: thread dumps on SIGQUIT/SIGUSR1, and the request watchdog."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
from mount_fixtures import make_chain, wait_until

from fusefs.watchdog import Watchdog


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGUSR1])
def test_signal_writes_every_threads_stack_to_the_log(tmp_path, mounter, sig):
    m = mounter(make_chain(tmp_path, size=8 << 20))
    with open(m.disk, "rb") as f:
        assert len(f.read(4096)) == 4096
    os.kill(m.daemon_pid(), sig)

    def whole_dump(log):
        # every thread, not one: the watchdog's and the trio loop's stacks (the dump is
        # written a thread at a time, so its start alone is no proof of the rest)
        return ("qcowfs-watchdog" in log or "watchdog.py" in log) and "trio" in log

    wait_until(lambda: whole_dump(m.log()), 10, "every thread's stack in the log")
    assert "Thread 0x" in m.log() or "Current thread" in m.log()
    with open(m.disk, "rb") as f:  # and it still serves
        assert len(f.read(4096)) == 4096
    m.unmount()


def test_watchdog_warns_once_with_stacks_for_a_stuck_request(tmp_path, caplog):
    out = open(tmp_path / "dump.txt", "w+")
    dog = Watchdog(lambda: out, limit=0.3, period=0.05)
    dog.start()
    try:
        caplog.set_level(logging.WARNING, logger="qcowfs.watchdog")
        token = dog.begin("read", 4096, 512)
        fast = dog.begin("write", 0, 4096)
        dog.end(fast)  # a finished request is never reported
        release = threading.Event()
        stuck = threading.Thread(target=release.wait, name="stuck-request")
        stuck.start()
        wait_until(
            lambda: any("in flight" in r.message for r in caplog.records),
            10,
            "the watchdog's warning",
        )
        time.sleep(0.5)  # more periods: still one warning
        warnings = [r.message for r in caplog.records if "in flight" in r.message]
        assert len(warnings) == 1, warnings
        assert "FUSE read request (offset 4096, 512 bytes)" in warnings[0]
        out.seek(0)
        dump = out.read()
        assert "Thread 0x" in dump and "wait" in dump  # the stuck thread's stack
        dog.end(token)
        release.set()
        stuck.join()
    finally:
        dog.stop()
        out.close()


def test_watchdog_warns_when_the_loop_stops_beating(tmp_path, caplog):
    out = open(tmp_path / "dump.txt", "w+")
    dog = Watchdog(lambda: out, limit=0.3, period=0.05)
    caplog.set_level(logging.WARNING, logger="qcowfs.watchdog")
    dog.loop_beat = time.monotonic()  # the heartbeat task ran once, then no more
    dog.start()
    try:
        wait_until(
            lambda: any("event loop" in r.message for r in caplog.records), 10, "the loop warning"
        )
    finally:
        dog.stop()
        out.close()
