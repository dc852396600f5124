"""One pacer for every rate limit of the senders: frames per second, without drift."""

from __future__ import annotations

import time
from collections.abc import Callable


class Pacer:
    """Holds `rate_fps` (0 or less: no limit). The n-th frame may go out at `start + n / rate`,
    counted from the pacer's creation: a late send is caught up, never carried forward as
    drift. `clock` and `sleep` are injectable (tests use a fake clock)."""

    def __init__(self, rate_fps: float, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        self.rate_fps = rate_fps
        self.frames = 0  # frames let through so far
        self._clock, self._sleep = clock, sleep
        self._t0 = clock()

    def wait(self, frames: int = 1) -> None:
        """Wait until `frames` more frames may go out, then count them."""
        if self.rate_fps > 0:
            delay_s = self._t0 + (self.frames + frames) / self.rate_fps - self._clock()
            if delay_s > 0:
                self._sleep(delay_s)
        self.frames += frames
