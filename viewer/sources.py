"""Where the viewer's states come from: the engine in this process, or the result stream.

Both are polled from the GUI thread and never block: `latest()` returns the newest state not
seen yet, or None. The result stream is untrusted input: every message is capped as a whole
(bytes and parts) while it is received, and every state is validated (`decode_state`) before
anything is drawn; bad ones are counted per reason and skipped.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import zmq

from tcbf_live.stream.transport import (
    CurveKeys,
    OversizedMessage,
    connect,
    recv_capped,
    set_receive_cap,
)
from tcbf_live.stream.view_state import (
    MAX_HEADER_BYTES,
    MAX_STATE_ARRAYS,
    MAX_STATE_BYTES,
    StateError,
    decode_state,
    state_key,
    view_state,
)

log = logging.getLogger("tcbf.viewer")


class EngineSource:
    """States built from `Engine.snapshot()` (in-process viewer)."""

    def __init__(self, engine):
        self.engine = engine
        self._last = None

    def latest(self) -> dict[str, Any] | None:
        result = self.engine.snapshot()
        if result is None:
            return None
        key = state_key(result)
        if key == self._last:
            return None
        self._last = key
        return view_state(result, sum(self.engine.counters.rejected.values()))

    def close(self) -> None:
        pass


class SocketSource:
    """States from a `SnapshotPublisher` (SUB; only the newest queued message is decoded).
    `rejected` counts the messages skipped, `reasons` why ("oversized", "malformed")."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None,
                 curve: CurveKeys | None = None,
                 max_message_bytes: int = MAX_STATE_BYTES + MAX_HEADER_BYTES):  # fmt: skip
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self.received = 0
        self.rejected = 0
        self.reasons: Counter = Counter()
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, 4)
        set_receive_cap(self._sock, max_message_bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            connect(self._sock, endpoint, curve)
        except Exception:
            self._sock.close()
            raise

    def latest(self) -> dict[str, Any] | None:
        parts = None
        for _ in range(64):  # drain (latest wins), bounded: a flood cannot hold the GUI thread
            try:
                message = recv_capped(self._sock, self.max_message_bytes, MAX_STATE_ARRAYS + 1)
            except zmq.Again:
                break
            except OversizedMessage as exc:
                self.received += 1
                self._reject("oversized", exc)
                continue
            self.received += 1
            parts = message
        if parts is None:
            return None
        try:
            return decode_state([p.buffer for p in parts])
        except StateError as err:
            self._reject("malformed", err)
            return None

    def _reject(self, reason: str, err: Exception) -> None:
        self.rejected += 1
        self.reasons[reason] += 1
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            log.warning("skipped a result-stream message (%d so far): %s", self.rejected, err)

    def close(self) -> None:
        self._sock.close()
