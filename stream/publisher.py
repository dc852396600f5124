"""Result stream: the engine's view state on a ZeroMQ PUB socket, latest wins.

A background thread takes `Engine.snapshot()` at most `rate_hz` times a second (only when
something changed), encodes it (`stream.snapshot`) and sends it without ever blocking: PUB drops
messages for subscribers whose queue (SNDHWM 2) is full, so a slow or stalled viewer costs the
engine nothing, and a viewer can join or leave at any time. Binds to loopback by default (a
warning when bound beyond it); CURVE-authenticated when given keys (`stream.transport`).
"""

from __future__ import annotations

import logging
import threading

import zmq

from tcbf_live.stream.transport import CurveKeys, bind
from tcbf_live.stream.view_state import encode_state, state_key, view_state

log = logging.getLogger("tcbf.publish")

DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"


class SnapshotPublisher:
    def __init__(self, engine, endpoint: str = DEFAULT_PUBLISH, rate_hz: float = 10.0,
                 curve: CurveKeys | None = None):  # fmt: skip
        self.engine = engine
        self.interval_s = 1.0 / rate_hz
        self.sent = 0
        self.dropped = 0
        self._sock = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 2)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            bind(self._sock, endpoint, "the result stream (--publish)", curve)
        except Exception:
            self._sock.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcbf-publish", daemon=True)

    def start(self) -> SnapshotPublisher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._sock.close()

    def _run(self) -> None:
        last = None
        while not self._stop.wait(self.interval_s):
            try:
                result = self.engine.snapshot()
                if result is None:
                    continue
                key = state_key(result)
                if key == last:
                    continue
                rejected = sum(self.engine.counters.rejected.values())
                parts = encode_state(view_state(result, rejected))
                # copied: the socket lingers 0 on a shared context that is never terminated,
                # so a zero-copy buffer could be freed by libzmq after the interpreter is gone
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
                self.sent += 1
                last = key
            except zmq.Again:
                self.dropped += 1
            except Exception:  # publishing must never take the engine down
                log.exception("publishing a snapshot failed")
