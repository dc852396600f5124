"""Where the viewer's states come from: the engine in this process, or the result stream.

Both are polled from the GUI thread and never block: `latest()` returns the newest state not
seen yet, or None.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from stream.snapshot import StateError, decode_state, state_key, view_state

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
    """States from a `SnapshotPublisher` (SUB; only the newest queued message is decoded)."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.received = 0
        self.rejected = 0
        self._sock = (ctx or zmq.Context.instance()).socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, 4)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 512 << 20)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)

    def latest(self) -> dict[str, Any] | None:
        parts = None
        while True:  # drain: latest wins
            try:
                parts = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.received += 1
        if parts is None:
            return None
        try:
            return decode_state([p.buffer for p in parts])
        except StateError as err:
            self.rejected += 1
            if self.rejected <= 10:
                log.warning("skipped a result-stream message: %s", err)
            return None

    def close(self) -> None:
        self._sock.close()
