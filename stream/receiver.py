"""ZeroMQ subscriber: receive native-protocol messages, decode, count and skip bad ones.

Safe by default: connects (or binds) where told, warns when bound beyond loopback, caps every
whole message (not only each part) at `max_message_bytes`, authenticates with CURVE when given
keys (`stream.transport`), never unpickles. Bad messages are counted per reason, logged
(rate-limited) and skipped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from tcbf_live.detectors.base import DecodeError, Decoder, Event, SeriesInfo
from tcbf_live.detectors.compression import native_bslz4
from tcbf_live.detectors.registry import DecoderOptions, WireProtocol
from tcbf_live.stream.lane_reader import LaneFolded, LaneTake, lane_for
from tcbf_live.stream.transport import (
    CURVE_HINT,
    DETECTOR_HINT,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_PARTS,
    CurveKeys,
    OversizedMessage,
    open_link,
    recv_capped,
    tcp_host_port,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubscriberSettings:
    endpoint: str = "tcp://127.0.0.1:5555"
    socket_type: str = "sub"  # or "pull"
    bind: bool = False  # connect by default
    rcvhwm: int = 10_000  # messages queued before PUB drops / PUSH blocks (memory bound)
    max_message_bytes: int = MAX_MESSAGE_BYTES  # one whole multipart message, all parts
    curve: CurveKeys | None = None  # CURVE server (bind) or client (connect); None: plain
    detector: bool = False  # a detector's link (DECTRIS, Merlin): cannot be authenticated


@dataclass
class StreamCounters:
    messages: int = 0
    frames: int = 0
    rejected: Counter = field(default_factory=Counter)
    lane: int = 0  # image messages read by the compiled lane (`stream.fast_lane`)

    def reject(self, err: DecodeError) -> None:
        self.rejected[err.reason] += 1
        n = sum(self.rejected.values())
        if n <= 10 or n % 1000 == 0:  # log the first few and then every 1000th
            log.warning("skipped message (%d so far): %s", n, err)


def open_socket(settings: SubscriberSettings, ctx: zmq.Context | None = None) -> zmq.Socket:
    """The receiving socket (`transport.open_link`): SUB or PULL, bound or connected."""
    kind = {"sub": zmq.SUB, "pull": zmq.PULL}[settings.socket_type]
    return open_link(ctx or zmq.Context.instance(), kind, settings.endpoint,
                     bind_here=settings.bind, hwm=settings.rcvhwm,
                     role=f"the receiver ({settings.socket_type.upper()})",
                     max_message_bytes=settings.max_message_bytes, curve=settings.curve,
                     hint=DETECTOR_HINT if settings.detector else CURVE_HINT)  # fmt: skip


def receive_cap(sock: zmq.Socket) -> int:
    """The whole-message cap of a socket: its ZMQ_MAXMSGSIZE, or the default if unset."""
    cap = sock.getsockopt(zmq.MAXMSGSIZE)
    return cap if cap > 0 else MAX_MESSAGE_BYTES


def receive_event_batches(
    sock: zmq.Socket,
    decoder: Decoder,
    counters: StreamCounters,
    timeout_s: float | None = None,
    poll_ms: int = 100,
    should_stop: Callable[[], bool] = lambda: False,
    max_messages: int = 64,
    max_message_bytes: int | None = None,
    max_message_parts: int = MAX_MESSAGE_PARTS,
    lane: Callable[[], LaneTake] | None = None,
) -> Iterator[list[Event]]:
    """Yield lists of decoded events: everything already queued (up to `max_messages`) at once,
    so consumers can hand many small messages to one kernel call. Stops after `timeout_s`
    without a message (None: never) or when `should_stop()` turns true. A message over
    `max_message_bytes` (all parts together; default: the socket's ZMQ_MAXMSGSIZE, which
    `open_socket` sets to the settings' cap) or `max_message_parts` is counted as "oversized"
    and skipped whole. `lane` (`Receiver.use_lane`) reads image messages first."""
    if max_message_bytes is None:
        max_message_bytes = receive_cap(sock)
    idle_since = time.monotonic()
    while not should_stop():
        if not sock.poll(poll_ms):
            if timeout_s is not None and time.monotonic() - idle_since > timeout_s:
                return
            continue
        idle_since = time.monotonic()
        events: list[Event] = []
        took = lane() if lane is not None else None
        if took is not None and took.folded:
            events.append(LaneFolded(took.series_id, took.folded, took.tapped))
        if took is not None and took.parts:
            counters.messages += 1
            events.extend(decode_counted(decoder, took.parts, counters))
        lane_reads = took is not None and took.series_id is not None  # then it reads on
        for _ in range(0 if lane_reads else max_messages):
            try:
                parts = recv_capped(sock, max_message_bytes, max_message_parts)
            except zmq.Again:
                break
            except OversizedMessage as exc:
                counters.messages += 1
                counters.reject(DecodeError("oversized", str(exc)))
                continue
            counters.messages += 1
            events.extend(decode_counted(decoder, [p.buffer for p in parts], counters))
        if events:
            yield events


def receive_events(sock: zmq.Socket, decoder: Decoder, counters, **kwargs) -> Iterator[Event]:
    """One decoded event at a time (see `receive_event_batches` for the arguments)."""
    for events in receive_event_batches(sock, decoder, counters, **kwargs):
        yield from events


def decode_counted(decoder: Decoder, parts: list, counters: StreamCounters) -> list[Event]:
    """Events of one message; every rejection counted (also those a multi-event decoder
    recorded while keeping the good events); a decoder bug never escapes."""
    events: list[Event] = []
    try:
        out = decoder.decode(parts)
        if isinstance(out, list):  # part-wise decoders: zero or more events
            events.extend(out)
        elif out is not None:
            events.append(out)
    except DecodeError as err:
        counters.reject(err)
    except Exception as exc:  # a decoder bug must not take the receiver down
        if sum(counters.rejected.values()) < 10:
            log.exception("decoder failed on a message")
        counters.reject(DecodeError("decoder_error", repr(exc)))
    for err in decoder.drain_errors():
        counters.reject(err)
    return events


def receive_tcp_batches(
    endpoint: str,
    decoder: Decoder,
    counters: StreamCounters,
    timeout_s: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    chunk_bytes: int = 4 << 20,
) -> Iterator[list[Event]]:
    """Event lists from a raw-TCP detector (Merlin: the detector PC is the server). Connects
    to tcp://HOST:PORT (retrying until it listens), feeds each received chunk to the byte-stream
    decoder, reconnects when the peer closes. Stops like `receive_event_batches`."""
    import select
    import socket

    host, port = tcp_host_port(endpoint)
    sock = None
    warned = False
    idle_since = time.monotonic()

    try:
        while not should_stop():
            if timeout_s is not None and time.monotonic() - idle_since > timeout_s:
                return
            if sock is None:
                try:
                    sock = socket.create_connection((host, port), timeout=0.5)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                except OSError as exc:
                    if not warned:
                        log.info("waiting for the detector at %s:%d (%s)", host, port, exc)
                        warned = True
                    time.sleep(0.1)
                    continue
                log.info("connected to %s:%d", host, port)
                stale = decoder.reset()
                if stale:  # an acquisition left open by the previous connection ends here
                    yield stale
            if not select.select([sock], [], [], 0.1)[0]:
                continue
            try:
                data = sock.recv(chunk_bytes)
            except OSError:  # reset by the peer: like a close
                data = b""
            if not data:  # the detector closed the connection: wait for the next one
                sock.close()
                sock = None
                continue
            idle_since = time.monotonic()
            counters.messages += 1
            events = decode_counted(decoder, [data], counters)
            if events:
                yield events
    finally:
        if sock is not None:
            sock.close()


class Receiver:
    """One detector link: the socket (bound or connected now, so a sender can start at once;
    a raw-TCP detector is connected to in the receiving thread) and the protocol's decoder
    (`detectors.registry`). `batches` yields the decoded event lists until idle or stopped."""

    def __init__(self, settings: SubscriberSettings, wire: WireProtocol, channel: str | None,
                 counters: StreamCounters):  # fmt: skip
        self.settings = settings
        self.counters = counters
        self.tcp = wire.transport == "tcp"
        self.sock = None if self.tcp else open_socket(settings)
        # DECTRIS: bslz4 frames left compressed, decompressed inside the accumulate kernel
        options = DecoderOptions(defer_bslz4=wire.bslz4_frames and native_bslz4(),
                                 channel=channel)  # fmt: skip
        self.decoder = wire.decoder(options)
        self._lane: Callable[[], LaneTake] | None = None

    def use_lane(self, lookup: Callable[[SeriesInfo], Any], lock, tap: bool = False) -> None:
        """DECTRIS V1 and V2: read image messages of a calibrated series (`lookup` gives its
        processor) with the compiled lane (`stream.lane_reader`), holding `lock` (the ingest
        lock) while it folds (`tap`: the blobs folded also come out, for the recorder); where
        the lane cannot run, nothing changes."""
        reader = None if self.sock is None else lane_for(self.sock, self.decoder, False, True,
                                                         tap)  # fmt: skip
        if reader is not None:
            cap = receive_cap(self.sock)

            def take() -> LaneTake:
                with lock:
                    return reader.take(lookup, cap, self.counters)

            self._lane = take

    def batches(self, should_stop: Callable[[], bool],
                timeout_s: float | None) -> Iterator[list[Event]]:  # fmt: skip
        if self.tcp:
            return receive_tcp_batches(self.settings.endpoint, self.decoder, self.counters,
                                       timeout_s=timeout_s, should_stop=should_stop)  # fmt: skip
        return receive_event_batches(self.sock, self.decoder, self.counters,
                                     timeout_s=timeout_s, should_stop=should_stop,
                                     lane=self._lane)  # fmt: skip

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
