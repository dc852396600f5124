"""Active mode: take only the series the detector was armed for (SIMPLON `arm` reply).

The series header can arrive on the data socket before the arm's HTTP reply gives its id:
`Arm.takes` waits for the reply (bounded; a stop or a failed arm ends the wait and the series
is not taken). Any other series on the socket is foreign: counted and not processed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

ARM_WAIT_S = 10.0  # how long a series start waits for the arm's reply (longer than the
#                    SIMPLON client's 5 s timeout, after which the run stops anyway)


class Arm:
    """The series id the detector's arm returned, set from the command's thread."""

    def __init__(self) -> None:
        self._armed = threading.Event()
        self.series_id: int | None = None

    def expect(self, series_id: int) -> None:
        self.series_id = series_id
        self._armed.set()

    def takes(self, series_id: int, stopped: Callable[[], bool]) -> bool:
        """Whether `series_id` is the armed series (waits for the arm's reply)."""
        deadline = time.monotonic() + ARM_WAIT_S
        while not self._armed.wait(0.05):
            if stopped() or time.monotonic() > deadline:
                return False
        return series_id == self.series_id
