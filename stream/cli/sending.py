"""The sending side of `simulate` and `demo`: open the link a protocol needs, run the
simulator's sender (`simulators.sender`) on it.

ZeroMQ protocols bind a PUB (XPUB) or PUSH socket through `stream.transport.open_sender` (send
queue bounded from the message size, linger, CURVE server keys, a warning when bound beyond
loopback); raw-TCP protocols (Merlin) open a server on the data port and wait for the receiver
to connect. Each ZeroMQ link owns its context and terminates it at the end, so every queued
message (zero-copy frames included) is sent, or dropped after `linger_s` (logged), before
`serve` returns.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TextIO

import zmq

from tcbf_live.detectors import registry
from tcbf_live.simulators.sender import (
    ByteStream,
    FrameSource,
    MessageSink,
    SendSettings,
    run_sender,
)
from tcbf_live.stream.transport import (
    CURVE_HINT,
    DETECTOR_HINT,
    CurveKeys,
    open_sender,
    release_context,
    tcp_host_port,
    warn_if_exposed,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkSettings:
    """Where and how the sender's messages leave."""

    bind: str = "tcp://127.0.0.1:5555"
    socket_type: str | None = None  # "pub" | "push"; None: the protocol's default
    join_wait_s: float = 0.5  # PUB: give subscribers time to connect before the first message
    wait_subscriber_s: float = 0.0  # PUB: wait up to this long for a first subscription
    queue_bytes: int = 256 << 20  # send queue bound (SNDHWM from the message size)
    linger_s: float = 30.0  # at the end: how long queued messages may take to go out
    curve: CurveKeys | None = None  # CURVE server keys; None: plain text


def serve(
    source: FrameSource,
    send: SendSettings,
    link: LinkSettings,
    log: TextIO | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    show_progress: bool | None = None,
) -> int:
    """Stream `source` (once, or looping with `send.loop`) over the link its protocol needs.
    Returns frames sent, once they went out."""
    proto = registry.protocol(send.protocol)
    log = log or sys.stderr
    if proto.transport == "tcp":
        open_link = partial(tcp_link, link.bind, log, should_stop)
    else:
        open_link = partial(zmq_link, link, proto, log)
    return run_sender(source, send, open_link, should_stop, show_progress)


@contextmanager
def zmq_link(link: LinkSettings, proto: registry.WireProtocol, log: TextIO,
             message_nbytes: int) -> Iterator[MessageSink]:  # fmt: skip
    """A bound sending socket for messages of up to `message_nbytes`; at a clean exit the
    queue is flushed (up to `link.linger_s`), after an error it is dropped."""
    ctx = zmq.Context()  # this link's own: terminated below, after the queue is sent
    socket_type = link.socket_type or proto.sender_sockets[0]
    sock = None
    finished = False
    try:
        sock = open_sender(ctx, link.bind, socket_type, "the sender",
                           send_hwm(link.queue_bytes, message_nbytes), link.linger_s, link.curve,
                           DETECTOR_HINT if proto.detector else CURVE_HINT)  # fmt: skip
        if socket_type == "pub":
            if link.wait_subscriber_s > 0 and sock.poll(int(link.wait_subscriber_s * 1e3)):
                sock.recv()  # the subscription message; slow joiners still get `start` repeats
                log.write("subscriber connected\n")
            time.sleep(link.join_wait_s)
        yield sock
        finished = True
    finally:
        close_and_flush(ctx, sock, link.linger_s if finished else 0.0)


@contextmanager
def tcp_link(endpoint: str, log: TextIO, should_stop: Callable[[], bool],
             message_nbytes: int) -> Iterator[MessageSink | None]:  # fmt: skip
    """A detector's data port (raw TCP server, as the Merlin PC): waits for the receiver to
    connect; None when stopped first."""
    host, port = tcp_host_port(endpoint)
    server = socket.create_server((host, port))
    server.settimeout(0.5)
    warn_if_exposed(endpoint, "the Merlin sender", False, DETECTOR_HINT)
    try:
        conn = None
        while conn is None and not should_stop():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
        if conn is None:
            yield None
            return
        log.write("receiver connected\n")
        with conn:
            yield ByteStream(conn)
    finally:
        server.close()


def send_hwm(queue_bytes: int, message_nbytes: int) -> int:
    """Messages the send queue may hold: `queue_bytes` of them (4 to 10,000). Zero-copy
    frames pin their batch until sent, so this bounds the sender's memory."""
    return int(max(4, min(10_000, queue_bytes // max(message_nbytes, 1))))


def close_and_flush(ctx: zmq.Context, sock: zmq.Socket | None, linger_s: float) -> None:
    """Close `sock` and terminate `ctx`: returns once the queued messages are sent, or after
    `linger_s` (then they are dropped: logged)."""
    if sock is not None:
        sock.close(linger=int(linger_s * 1000))
    t0 = time.monotonic()
    release_context(ctx)
    if linger_s > 0 and time.monotonic() - t0 >= linger_s - 0.05:
        logger.warning("the receiver did not take the last messages within %g s: they may be "
                       "lost (the series end included)", linger_s)  # fmt: skip
