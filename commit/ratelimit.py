"""Rate limiting for commit jobs, live and offline: a pure token bucket."""

from .qapi import JobCommandError


class NegativeSpeed(JobCommandError, ValueError):
    """The one check of a speed, wherever it comes from (block-commit, block-stream,
    block-job-set-speed, a job created directly), in QEMU's words."""

    def __init__(self):
        super().__init__("Parameter 'speed' expects a non-negative value")


class RateLimiter:
    """Token bucket: `speed` bytes per second (0 = unlimited), bursts of one slice.

    Pure: every call takes the current time. A chunk larger than the bucket is
    allowed and paid back by waiting (the bucket goes into debt), so the long-run rate
    never exceeds `speed` by more than one slice's worth.
    """

    SLICE = 0.1  # seconds of credit a full bucket holds (QEMU's SLICE_TIME)
    MIN_DELAY = 1e-6  # shorter waits are not worth (and may not advance a float clock)

    def __init__(self, speed=0):
        self.speed = 0
        self._tokens = 0.0
        self._last = None
        self.set_speed(speed, None)

    @property
    def capacity(self):
        return self.speed * self.SLICE

    def _refill(self, now):
        if now is None:
            return
        if self._last is None:
            self._last = now
            return
        if now > self._last:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.speed)
            self._last = now

    def set_speed(self, speed, now):
        if speed < 0:
            raise NegativeSpeed()
        self._refill(now)
        old = self.speed
        self.speed = int(speed)
        if self.speed == 0:
            self._tokens = 0.0
            self._last = None
        elif old == 0:
            self._tokens = self.capacity  # a fresh limit starts with a full bucket
            self._last = now
        else:
            self._tokens = min(self._tokens, self.capacity)

    def consume(self, nbytes, now):
        """Account `nbytes`; return the seconds to wait before going on."""
        if self.speed <= 0:
            return 0.0
        if self._last is None:
            self._last = now
        self._refill(now)
        self._tokens -= nbytes
        return self.delay(now)

    def delay(self, now):
        """Seconds until the debt is paid (0 when there is none)."""
        if self.speed <= 0:
            return 0.0
        self._refill(now)
        if self._tokens > -1.0:  # less than a byte of debt
            return 0.0
        delay = -self._tokens / self.speed
        return delay if delay >= self.MIN_DELAY else 0.0
