"""Stream a frame source (simulator or recorded file) over ZeroMQ in the native protocol.

Each `run_sender` call owns its ZeroMQ context and terminates it at the end: every queued
message (zero-copy frames included) is sent, or dropped after `linger_s`, while its buffers
are alive, before the call returns (a process exiting with queued zero-copy frames crashes and
loses the end of the series).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol, TextIO

import numpy as np
import zmq

from tcbf_live.detectors import dectris_v1, dectris_v2, merlin
from tcbf_live.detectors.base import SeriesInfo
from tcbf_live.detectors.native import encode_end, encode_frames, encode_start
from tcbf_live.stream.transport import (
    CURVE_HINT,
    DETECTOR_HINT,
    MAX_MESSAGE_BYTES,
    CurveKeys,
    bind,
    release_context,
    warn_if_exposed,
)

logger = logging.getLogger("tcbf.sender")

HEADER_ROOM_BYTES = 64 << 10  # a native message's msgpack header is < 1 KiB: ample room

SOCKET_TYPES = {"pub": zmq.XPUB, "push": zmq.PUSH}  # XPUB: a PUB that sees subscriptions


class FrameSource(Protocol):
    n_frames: int

    def series_info(self, series_id: int) -> SeriesInfo: ...

    def iter_batches(self, batch: int = 32) -> Iterator[tuple[int, np.ndarray]]: ...


@dataclass(frozen=True)
class SendSettings:
    """How to put a series on the wire."""

    bind: str = "tcp://127.0.0.1:5555"
    socket_type: str = "pub"
    batch: int = 16
    rate_fps: float = 0.0  # 0: as fast as possible
    encoding: str = "raw"  # native: raw | lz4; dectris-v2: bslz4 | none
    protocol: str = "native"  # or "dectris-v2"
    loop: bool = False
    repeat_start_s: float = 0.5  # re-announce `start` so late subscribers can decode
    join_wait_s: float = 0.5  # PUB: give subscribers time to connect before the first message
    wait_subscriber_s: float = 0.0  # PUB: wait up to this long for a first subscription
    cache_bytes: int = 512 << 20  # loop from memory when the whole series fits
    queue_bytes: int = 256 << 20  # send queue bound (SNDHWM from the message size)
    max_message_bytes: int = MAX_MESSAGE_BYTES  # native batches shrink to stay under it
    linger_s: float = 30.0  # at the end: how long queued messages may take to go out
    curve: CurveKeys | None = None  # CURVE server keys; None: plain text


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


def stream_series(
    sock: zmq.Socket,
    source: FrameSource,
    settings: SendSettings,
    series_id: int,
    batches: Iterator[tuple[int, np.ndarray]] | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Send start, all frames (paced, with periodic start repeats) and end. Returns frames sent."""
    info = source.series_info(series_id)
    v2 = settings.protocol == "dectris-v2"
    v1 = settings.protocol == "dectris-v1"
    if v1:
        for message in dectris_v1.encode_header(info):
            sock.send_multipart(message)
    else:
        sock.send_multipart(dectris_v2.encode_start(info) if v2 else encode_start(info))
    t0 = last_start = time.perf_counter()
    sent = 0
    if (v1 or v2) and settings.encoding == "bslz4" and batches is None:
        stored = getattr(source, "iter_compressed", lambda: None)()
        if stored is not None:  # a DECTRIS file: its chunks go out unchanged
            return _stream_stored(sock, source, settings, series_id, stored, v1, should_stop)
    for seq, (first, frames) in enumerate(batches or source.iter_batches(settings.batch)):
        if should_stop():
            break
        now = time.perf_counter()
        if not (v1 or v2) and now - last_start >= settings.repeat_start_s:  # DECTRIS never does
            sock.send_multipart(encode_start(info, repeat=True))
            last_start = now
        if settings.rate_fps > 0:
            wait = t0 + (sent + len(frames)) / settings.rate_fps - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        if v2:  # one image per message, as the detector sends them
            for k, frame in enumerate(frames):
                sock.send_multipart(dectris_v2.encode_image(series_id, first + k, frame,
                                                            settings.encoding))  # fmt: skip
        elif v1:
            for k, frame in enumerate(frames):
                sock.send_multipart(dectris_v1.encode_image(series_id, first + k, frame,
                                                            settings.encoding))  # fmt: skip
        else:
            sock.send_multipart(encode_frames(series_id, first, frames, seq + 1,
                                              settings.encoding), copy=False)  # fmt: skip
        sent += len(frames)
        if progress:
            progress.update(sent)
    if v1:
        sock.send_multipart(dectris_v1.encode_end(series_id))
    else:
        sock.send_multipart(dectris_v2.encode_end(series_id) if v2 else encode_end(series_id, sent))
    return sent


def _stream_stored(sock, source, settings: SendSettings, series_id: int, stored, v1: bool,
                   should_stop: Callable[[], bool]) -> int:  # fmt: skip
    """Replay stored bslz4 chunks in a DECTRIS protocol, without recompressing."""
    info = source.series_info(series_id)
    like = np.empty(info.detector_shape, info.dtype)  # shape and dtype only
    t0 = time.perf_counter()
    sent = 0
    for index, blob in stored:
        if should_stop():
            break
        if settings.rate_fps > 0:
            wait = t0 + (sent + 1) / settings.rate_fps - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        encode = dectris_v1.encode_image if v1 else dectris_v2.encode_image
        sock.send_multipart(encode(series_id, index, like, blob=blob))
        sent += 1
    sock.send_multipart(
        dectris_v1.encode_end(series_id) if v1 else dectris_v2.encode_end(series_id)
    )
    return sent


def run_sender(
    source: FrameSource,
    settings: SendSettings,
    log: TextIO | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    show_progress: bool | None = None,
) -> int:
    """Bind, stream one series (or loop with `settings.loop`), close. Returns frames sent.
    Returns when every message went out (or `settings.linger_s` passed: logged)."""
    log = log or sys.stderr
    if settings.protocol == "merlin":
        return run_merlin_sender(source, settings, log, should_stop)
    frame_nbytes = source.series_info(0).frame_nbytes
    if settings.protocol == "native":  # one message per batch, header included: under the cap
        room = settings.max_message_bytes - HEADER_ROOM_BYTES
        batch = max(1, min(settings.batch, room // max(frame_nbytes, 1)))
        settings = replace(settings, batch=batch)
    message_nbytes = frame_nbytes * (settings.batch if settings.protocol == "native" else 1)
    ctx = zmq.Context()  # this call's own: terminated below, after the queue is sent
    sock = ctx.socket(SOCKET_TYPES[settings.socket_type])
    sock.setsockopt(zmq.SNDHWM, send_hwm(settings.queue_bytes, message_nbytes))
    sock.setsockopt(zmq.LINGER, int(settings.linger_s * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, 4096)  # XPUB receives subscriptions (a few bytes) only
    total = 0
    finished = False
    try:
        bind(sock, settings.bind, "the sender", settings.curve,
             CURVE_HINT if settings.protocol == "native" else DETECTOR_HINT)  # fmt: skip
        if settings.socket_type == "pub":
            if settings.wait_subscriber_s > 0 and sock.poll(int(settings.wait_subscriber_s * 1e3)):
                sock.recv()  # the subscription message; slow joiners still get `start` repeats
                log.write("subscriber connected\n")
            time.sleep(settings.join_wait_s)
        cached: list[tuple[int, np.ndarray]] | None = None
        fits = source.n_frames * frame_nbytes <= settings.cache_bytes
        while True:
            series_id = new_series_id()
            progress = Progress(source.n_frames, f"series {series_id}", enabled=show_progress)
            if settings.loop and fits and cached is None:
                cached = list(source.iter_batches(settings.batch))
            n = stream_series(sock, source, settings, series_id, iter(cached) if cached else None,
                              progress, should_stop)  # fmt: skip
            progress.close(n)
            total += n
            if not settings.loop or should_stop():
                break
        finished = True
    finally:
        close_and_flush(ctx, sock, settings.linger_s if finished else 0.0)
    return total


def send_hwm(queue_bytes: int, message_nbytes: int) -> int:
    """Messages the send queue may hold: `queue_bytes` of them (4 to 10,000). Zero-copy
    frames pin their batch until sent, so this bounds the sender's memory."""
    return int(max(4, min(10_000, queue_bytes // max(message_nbytes, 1))))


def close_and_flush(ctx: zmq.Context, sock: zmq.Socket, linger_s: float) -> None:
    """Close `sock` and terminate `ctx`: returns once the queued messages are sent, or after
    `linger_s` (then they are dropped: logged)."""
    sock.close(linger=int(linger_s * 1000))
    t0 = time.monotonic()
    release_context(ctx)
    if linger_s > 0 and time.monotonic() - t0 >= linger_s - 0.05:
        logger.warning("the receiver did not take the last messages within %g s: they may be "
                     "lost (the series end included)", linger_s)  # fmt: skip


def stream_merlin(conn, source: FrameSource, settings: SendSettings, series_id: int,
                  should_stop: Callable[[], bool] = lambda: False) -> int:  # fmt: skip
    """One acquisition as a Merlin sends it on its data port: HDR, then one MQ1 message per
    frame (big-endian pixels), no end message. Returns frames sent."""
    info = source.series_info(series_id)
    text = getattr(source, "header_text", None)
    if text:  # a recording's own acquisition header (.hdr sidecar)
        conn.sendall(merlin.mpx(b"HDR," + text.encode("latin-1")))
    else:
        conn.sendall(merlin.encode_header(source.n_frames, info.scan_shape))
    t0 = time.perf_counter()
    sent = 0
    raw = getattr(source, "raw_frame", None)
    if raw is not None:  # a .mib recording: its MQ1 frames go out as they are
        for i in range(source.n_frames):
            if should_stop():
                break
            if settings.rate_fps > 0:
                wait = t0 + (sent + 1) / settings.rate_fps - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            conn.sendall(merlin.mpx(raw(i)))
            sent += 1
        return sent
    for first, frames in source.iter_batches(settings.batch):
        if should_stop():
            break
        if settings.rate_fps > 0:
            wait = t0 + (sent + len(frames)) / settings.rate_fps - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        conn.sendall(b"".join(merlin.encode_frame(first + k + 1, f) for k, f in enumerate(frames)))
        sent += len(frames)
    return sent


def run_merlin_sender(source: FrameSource, settings: SendSettings, log: TextIO,
                      should_stop: Callable[[], bool] = lambda: False) -> int:  # fmt: skip
    """Merlin's data port: a TCP server (the detector PC); waits for the receiver to connect,
    then streams (each loop pass is a new acquisition)."""
    import socket

    match = re.fullmatch(r"tcp://([^:]+):(\d{1,5})", settings.bind)
    if match is None:
        raise ValueError(f"merlin needs --bind tcp://HOST:PORT, got {settings.bind!r}")
    server = socket.create_server((match.group(1), int(match.group(2))))
    server.settimeout(0.5)
    warn_if_exposed(settings.bind, "the Merlin sender", False, DETECTOR_HINT)
    total = 0
    try:
        conn = None
        while conn is None and not should_stop():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
        if conn is None:
            return 0
        log.write("receiver connected\n")
        with conn:
            while True:
                total += stream_merlin(conn, source, settings, new_series_id(), should_stop)
                if not settings.loop or should_stop():
                    break
    finally:
        server.close()
    return total
