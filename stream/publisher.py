"""Result stream: the engine's view state on a ZeroMQ PUB socket, latest wins, and its
subscriber end for `tcbf-live view`.

A background thread takes the engine's newest view state (`EngineStates`) at most `rate_hz`
times a second (only when something changed), encodes it (`tcbf_live.viewer.state`) and sends
it without ever blocking: PUB drops messages for subscribers whose queue (SNDHWM 2) is full, so
a slow or stalled viewer costs the engine nothing, and a viewer can join or leave at any time.
Binds to loopback by default (a warning when bound beyond it); CURVE-authenticated when given
keys (`stream.transport`). `subscribe_states` opens the SUB end (capped, CURVE) and hands the
viewer a receive callable: the viewer decodes and validates, the sockets stay here.
"""

from __future__ import annotations

import logging

import zmq

from tcbf_live.stream.transport import (
    CurveKeys,
    OversizedMessage,
    ServedSocket,
    open_link,
    recv_capped,
)
from tcbf_live.stream.view_state import EngineStates
from tcbf_live.viewer.sources import MessageRejected, MessageSource
from tcbf_live.viewer.state import MAX_HEADER_BYTES, MAX_STATE_ARRAYS, MAX_STATE_BYTES, encode_state

log = logging.getLogger(__name__)

DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
MAX_VIEW_MESSAGE_BYTES = MAX_STATE_BYTES + MAX_HEADER_BYTES


class SnapshotPublisher(ServedSocket):
    def __init__(self, engine, endpoint: str = DEFAULT_PUBLISH, rate_hz: float = 10.0,
                 curve: CurveKeys | None = None):  # fmt: skip
        self.engine = engine
        self.interval_s = 1.0 / rate_hz
        self.sent = 0
        self.dropped = 0
        super().__init__(open_link(zmq.Context.instance(), zmq.PUB, endpoint, bind_here=True,
                                   hwm=2, role="the result stream (--publish)", curve=curve),
                         "tcbf-publish")  # fmt: skip

    def _run(self) -> None:
        states = EngineStates(self.engine)
        while not self._stop.wait(self.interval_s):
            try:
                state = states.latest()
                if state is None:
                    continue
                # copied: the socket lingers 0 on a shared context that is never terminated,
                # so a zero-copy buffer could be freed by libzmq after the interpreter is gone
                self._sock.send_multipart(encode_state(state), flags=zmq.NOBLOCK, copy=True)
                self.sent += 1
            except zmq.Again:
                self.dropped += 1
                states.forget()  # sent again at the next tick
            except Exception:  # publishing must never take the engine down
                log.exception("publishing a snapshot failed")


def subscribe_states(endpoint: str, curve: CurveKeys | None = None,
                     max_message_bytes: int = MAX_VIEW_MESSAGE_BYTES,
                     ctx: zmq.Context | None = None) -> MessageSource:  # fmt: skip
    """A viewer source on a result stream: SUB socket (RCVHWM 4, no linger), every whole
    message capped at `max_message_bytes` and `MAX_STATE_ARRAYS` arrays while it is received."""
    sock = open_link(ctx or zmq.Context.instance(), zmq.SUB, endpoint, bind_here=False, hwm=4,
                     role="the result stream", max_message_bytes=max_message_bytes,
                     curve=curve)  # fmt: skip

    def receive() -> list[memoryview] | None:
        try:
            parts = recv_capped(sock, max_message_bytes, MAX_STATE_ARRAYS + 1)
        except zmq.Again:
            return None
        except OversizedMessage as exc:
            raise MessageRejected("oversized", str(exc)) from None
        return [p.buffer for p in parts]

    return MessageSource(receive, sock.close)
