"""Stream a frame source (simulator or recorded file) in any registered wire protocol.

The sender encodes (`detectors.registry`: each protocol's encoder), paces (`Pacer`) and loops;
it opens no socket. The command opens the link (ZeroMQ PUB/PUSH or a raw TCP server, through
`stream.transport`) and hands `run_sender` a factory for it: a context manager that yields
something with `send_multipart` and, on a clean exit, sends every queued message before it
returns (a process exiting with queued zero-copy frames crashes and loses the series' end).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol, TextIO

import numpy as np

from tcbf_live.detectors.base import Message, SeriesInfo
from tcbf_live.detectors.registry import protocol
from tcbf_live.simulators.pacing import Pacer

HEADER_ROOM_BYTES = 64 << 10  # a native message's msgpack header is < 1 KiB: ample room
MAX_MESSAGE_BYTES = 256 << 20  # the receivers' default cap on one whole message


class FrameSource(Protocol):
    n_frames: int

    def series_info(self, series_id: int) -> SeriesInfo: ...

    def iter_batches(self, batch: int = 32) -> Iterator[tuple[int, np.ndarray]]: ...


class MessageSink(Protocol):
    """Where messages go: a ZeroMQ socket, or `ByteStream` over a TCP connection."""

    def send_multipart(self, msg_parts: Sequence[Any], copy: bool = True) -> Any: ...


LinkFactory = Callable[[int], AbstractContextManager[MessageSink | None]]
"""Opens the link for messages of up to this many bytes; yields the sink, or None when the
sender was stopped before a receiver came."""


class ByteStream:
    """A MessageSink over a connected byte stream (raw TCP): each message's parts, joined."""

    def __init__(self, conn: Any):
        self.conn = conn  # anything with `sendall(bytes)`

    def send_multipart(self, msg_parts: Sequence[Any], copy: bool = True) -> None:
        self.conn.sendall(b"".join(bytes(p) for p in msg_parts))


@dataclass(frozen=True)
class SendSettings:
    """How to put a series on the wire (the link itself is the command's)."""

    protocol: str = "native"  # a `detectors.registry` name
    encoding: str = "raw"  # one of the protocol's encodings
    batch: int = 16
    rate_fps: float = 0.0  # 0: as fast as possible
    loop: bool = False
    repeat_start_s: float = 0.5  # re-announce `start` so late subscribers can decode
    cache_bytes: int = 512 << 20  # loop from memory when the whole series fits
    max_message_bytes: int = MAX_MESSAGE_BYTES  # batched messages shrink to stay under it


def new_series_id() -> int:
    return int.from_bytes(os.urandom(4), "little") >> 1 or 1


class Progress:
    """One-line terminal progress bar on stderr (a summary line only when not a terminal)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled=None):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.live or (now - self._last < 0.1 and done < self.total):
            return
        self._last = now
        frac = done / max(self.total, 1)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        fps = done / max(now - self.t0, 1e-9)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} frames {fps:8.0f} fps")
        self.stream.flush()

    def close(self, done: int) -> None:
        dt = time.perf_counter() - self.t0
        end = "\n" if self.live else ""
        self.stream.write(
            f"{end}{self.label}: {done} frames in {dt:.2f} s ({done / max(dt, 1e-9):.0f} fps)\n"
        )
        self.stream.flush()


def _send(sink: MessageSink, messages: list[Message]) -> None:
    for message in messages:
        sink.send_multipart(message, copy=False)  # frames go out zero-copy


def stream_series(
    sink: MessageSink,
    source: FrameSource,
    settings: SendSettings,
    series_id: int,
    batches: Iterator[tuple[int, np.ndarray]] | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Send start, all frames (paced; `start` repeated where the protocol does) and end.
    A recording that carries its own wire data in this protocol (and no `batches` given) is
    sent unchanged. Returns frames sent."""
    encoder = protocol(settings.protocol).encoder
    info = source.series_info(series_id)
    replay = encoder.replay(source, info, settings.encoding) if batches is None else None
    _send(sink, replay.start if replay is not None else encoder.start(info))
    pacer = Pacer(settings.rate_fps)
    if replay is not None:
        messages = ((1, [message]) for message in replay.frames)
    else:
        batches = batches or source.iter_batches(settings.batch)
        messages = _encoded(info, settings, batches)
    for n, message in messages:
        if should_stop():
            break
        pacer.wait(n)
        _send(sink, message)
        if progress:
            progress.update(pacer.frames)
    _send(sink, encoder.end(series_id, pacer.frames))
    return pacer.frames


def _encoded(info: SeriesInfo, settings: SendSettings, batches):
    """(frame count, messages) per batch; a protocol that repeats `start` re-announces it
    every `settings.repeat_start_s`, ahead of the batch's messages."""
    proto = protocol(settings.protocol)
    last_start = time.perf_counter()
    for seq, (first, frames) in enumerate(batches):
        messages = proto.encoder.frames(info.series_id, first, frames, seq + 1, settings.encoding)
        now = time.perf_counter()
        if proto.repeats_start and now - last_start >= settings.repeat_start_s:
            messages = [*proto.encoder.start(info, repeat=True), *messages]
            last_start = now
        yield len(frames), messages


def fit_batch(settings: SendSettings, frame_nbytes: int) -> SendSettings:
    """`settings` with a batch small enough that one batched message (header included)
    stays under `max_message_bytes` (at least one frame)."""
    if not protocol(settings.protocol).batched:
        return settings
    room = settings.max_message_bytes - HEADER_ROOM_BYTES
    return replace(settings, batch=max(1, min(settings.batch, room // max(frame_nbytes, 1))))


def message_nbytes(settings: SendSettings, frame_nbytes: int) -> int:
    """The largest message the sender puts on the link (the link sizes its queue by it)."""
    return frame_nbytes * (settings.batch if protocol(settings.protocol).batched else 1)


def run_sender(
    source: FrameSource,
    settings: SendSettings,
    open_link: LinkFactory,
    should_stop: Callable[[], bool] = lambda: False,
    show_progress: bool | None = None,
) -> int:
    """Open the link, stream one series (or loop with `settings.loop`, each pass a new series
    id), close it. Returns frames sent, once the link has sent them (see `LinkFactory`)."""
    frame_nbytes = source.series_info(0).frame_nbytes
    settings = fit_batch(settings, frame_nbytes)
    total = 0
    with open_link(message_nbytes(settings, frame_nbytes)) as sink:
        if sink is None:
            return 0
        cached: list[tuple[int, np.ndarray]] | None = None
        fits = source.n_frames * frame_nbytes <= settings.cache_bytes
        encoder = protocol(settings.protocol).encoder
        if encoder.replay(source, source.series_info(0), settings.encoding) is not None:
            fits = False  # a recording's own wire data: replayed unchanged on every pass
        while True:
            series_id = new_series_id()
            progress = Progress(source.n_frames, f"series {series_id}", enabled=show_progress)
            if settings.loop and fits and cached is None:
                cached = list(source.iter_batches(settings.batch))
            n = stream_series(sink, source, settings, series_id, iter(cached) if cached else None,
                              progress, should_stop)  # fmt: skip
            progress.close(n)
            total += n
            if not settings.loop or should_stop():
                break
    return total
