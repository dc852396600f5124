"""A one-line progress meter for long commands (`reconstruct`): frames done, frames/s and the
time left, redrawn in place on a terminal at most every `interval_s`; nothing at all when the
stream is not a terminal (piped or redirected into a log)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, what: str = "frames", stream: TextIO | None = None,
                 interval_s: float = 0.5):  # fmt: skip
        self.total, self.what = max(int(total), 1), what
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self._t0 = time.perf_counter()
        self._last = -float("inf")
        self._shown = False

    def update(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        elapsed = max(now - self._t0, 1e-9)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f} s left" if left != float("inf") else "? s left"
        self.stream.write(f"\r{done}/{self.total} {self.what} ({100 * done / self.total:.0f} %), "
                          f"{rate:,.0f} {self.what}/s, {eta}   ")  # fmt: skip
        self.stream.flush()
        self._shown = True

    def finish(self, note: str = "") -> None:
        """The last count, then a new line (the report follows); `note`: what comes next."""
        if self.enabled and self._shown:
            self.update(self.total, force=True)
            self.stream.write(f"{note}\n")
            self.stream.flush()
