"""Where a window's states come from: anything with `latest()` and `close()`.

A source is polled from the GUI thread and never blocks: `latest()` returns the newest state not
seen yet, or None. In-process, the engine's own states are drawn as they are
(`tcbf_live.stream.view_state.EngineStates`). From the result stream, `MessageSource` decodes
messages that a receive callable hands it: the caller owns the socket (opened and capped in
`tcbf_live.stream`), so this package holds no socket code. Messages are untrusted: a message
refused while being received (`MessageRejected`, e.g. over the size cap) and every state that
fails `decode_state` are counted per reason and skipped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tcbf_live.viewer.state import StateError, decode_state

log = logging.getLogger(__name__)

DRAIN = 64  # messages read per poll at most: a flood cannot hold the GUI thread


class Source(Protocol):
    def latest(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class MessageRejected(Exception):
    """A message the receiver refused while receiving it; `reason` is its counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


class MessageSource:
    """States from `receive()`: the next waiting message's parts, None when none is waiting
    (never blocks), `MessageRejected` for a refused one. Only the newest message of each poll is
    decoded (latest wins). `received` counts messages, `rejected` those skipped, `reasons` why
    ("oversized", "malformed", ...)."""

    def __init__(self, receive: Callable[[], Sequence[Any] | None],
                 close: Callable[[], None] = lambda: None):  # fmt: skip
        self._receive = receive
        self._close = close
        self.received = 0
        self.rejected = 0
        self.reasons: Counter = Counter()

    def latest(self) -> dict[str, Any] | None:
        parts = None
        for _ in range(DRAIN):
            try:
                message = self._receive()
            except MessageRejected as exc:
                self.received += 1
                self._reject(exc.reason, exc)
                continue
            if message is None:
                break
            self.received += 1
            parts = message
        if parts is None:
            return None
        try:
            return decode_state([memoryview(p) for p in parts])
        except StateError as err:
            self._reject("malformed", err)
            return None

    def _reject(self, reason: str, err: Exception) -> None:
        self.rejected += 1
        self.reasons[reason] += 1
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            log.warning("skipped a result-stream message (%d so far): %s", self.rejected, err)

    def close(self) -> None:
        self._close()
