"""A worker's side of the link: what the coordinator sent, and the delta bytes in flight.

A worker sends its deltas only while fewer than `DELTA_CREDIT_BYTES` of them are unhandled by
the coordinator: each delta and each beat carries the bytes of deltas sent so far ("sent"), and
the coordinator answers every one it has handled with "merged" (that count; the link keeps
order, so everything sent before it has been merged or refused). A lost or late answer is made
good by the next; a worker held back asks ("credit", answered the same way). A series' last
delta and those of a flush do not wait for credit (each at most a row block). So a slow
coordinator cannot let deltas pile up in ZeroMQ's queues (up to a row block each, 64 MiB): the
rows stay in the worker's block, which fills and stops the worker reading the detector
(`Worker.make_room`), bounded and counted.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

import zmq

from tcbf_live.stream.worker_link import DELTA_CREDIT_BYTES, LinkError, pack, unpack

log = logging.getLogger(__name__)

ASK_S = 0.25  # a worker held back asks the coordinator again this often
SILENT_BEATS = 2400  # a coordinator that answered none of this many beats (10 min) is gone


class LinkInbox:
    """The coordinator's messages to one worker, in order, with "merged" taken out."""

    def __init__(self, link: zmq.Socket, index: int, credit_bytes: int = DELTA_CREDIT_BYTES):
        self.link, self.index, self.credit_bytes = link, index, credit_bytes
        self.items: deque[tuple[str, dict, dict, list[Any]]] = deque()
        self.sent = 0  # bytes of deltas sent so far
        self.merged = 0  # of those, handled by the coordinator (its last "merged")
        self.waits = (0, 0.0)  # deltas held back for the coordinator: times, seconds waited
        self._held = False  # the last check found no credit (one hold, however many checks)
        self._asked = 0.0  # when the worker last asked for an answer ("credit")
        self.unanswered = 0  # beats (`gone` calls) since the coordinator last said anything
        self.parent: int | None = None  # a local worker: the coordinator's pid (`gone`)

    def read(self) -> None:
        """Queue what the link holds now; a "merged" answer only updates the credit."""
        while self.link.poll(0):
            self.unanswered = 0
            try:
                kind, head, arrays, raw = unpack(self.link.recv_multipart(copy=False))
            except LinkError as err:
                log.warning("worker %d: bad message from the coordinator: %s", self.index, err)
                continue
            if kind == "merged":  # (never above what this process sent: a rejoined name)
                self.merged = min(self.sent, max(self.merged, int(head.get("bytes", 0))))
            else:
                self.items.append((kind, head, arrays, raw))

    def gone(self) -> bool:
        """Whether the coordinator is gone, so that this worker stops (it would otherwise keep
        its detector socket, taking frames a next run misses, and its memory, for ever); called
        at each beat. A local worker: the process that spawned it has ended (killed: it had no
        time to say "stop"). Another host's: none of SILENT_BEATS beats was answered (counted
        in beats, not seconds, so that a pause of this process is no silence; a coordinator
        busy with a long final solve answers no beat meanwhile, hence the margin)."""
        self.unanswered += 1
        if self.parent is not None:
            if os.getppid() == self.parent:
                return False
            why = "the run that started it has ended"
        elif self.unanswered > SILENT_BEATS:
            why = f"the coordinator answered none of its last {SILENT_BEATS} beats"
        else:
            return False
        log.error("worker %d stops: %s", self.index, why)
        return True

    def in_flight(self) -> int:
        return self.sent - self.merged

    def credit(self, wait_ms: int) -> bool:
        """Whether another delta may be sent, waiting at most `wait_ms` for answers. While it
        waits it asks again every ASK_S ("credit": the coordinator answers what it has
        handled), so a lost answer holds nothing back for long."""
        self.read()
        t0 = time.monotonic()
        until = t0 + wait_ms / 1000
        while self.in_flight() >= self.credit_bytes and (left := until - time.monotonic()) > 0:
            if time.monotonic() - self._asked >= ASK_S and self.link.poll(0, zmq.POLLOUT):
                self.link.send_multipart(pack("credit", {"sent": self.sent}))
                self._asked = time.monotonic()
            self.link.poll(max(1, min(50, int(left * 1000))), zmq.POLLIN)
            self.read()
        ok = self.in_flight() < self.credit_bytes
        if not ok or self._held:  # a hold: counted once, its waiting time in full
            self.waits = (self.waits[0] + (not self._held), self.waits[1] + time.monotonic() - t0)
        self._held = not ok
        return ok

    def room(self, wait_ms: int, credit: bool = True) -> bool:
        """Whether a delta may be sent now: credit (unless `credit` is False: a series' or
        the run's last delta, at most a row block beyond it), then room in the link's queue."""
        t0 = time.monotonic()
        if credit and not self.credit(wait_ms):
            return False
        left_ms = max(0, wait_ms - int((time.monotonic() - t0) * 1000))
        return bool(self.link.poll(left_ms, zmq.POLLOUT))

    def delta_sent(self, nbytes: int) -> int:
        """Count a delta of `nbytes` as sent; the running total its message carries."""
        self.sent += nbytes
        return self.sent
