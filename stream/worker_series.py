"""What a worker keeps of one series, and the sizes of what it holds (`stream.worker`); and what
the coordinator keeps of its workers' messages (`Peer`, `PendingEnd`, `Ends`, `Copies`)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zmq

from tcbf_live.detectors.base import (
    CompressedFrame,
    DecodeError,
    FrameBatch,
    SeriesEnd,
    SeriesInfo,
)
from tcbf_live.stream import memory_reserve
from tcbf_live.stream.pages import peak_rss_mb
from tcbf_live.stream.receiver import StreamCounters
from tcbf_live.stream.series import SeriesProcessor
from tcbf_live.stream.tcbf.accumulators import AccumulatorState, StateDelta
from tcbf_live.stream.tcbf.deltas import DeltaTaker
from tcbf_live.stream.worker_link import pack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergedMark:
    """Done once the coordinator has merged every delta byte sent up to `sent` (the
    worker's `LinkInbox`, kept current by its reads): a shared delta's buffers are free."""

    inbox: Any
    sent: int

    @property
    def done(self) -> bool:
        return self.inbox.merged >= self.sent


@dataclass(frozen=True)
class AllDone:
    """Done when every mark (a `zmq.MessageTracker`, a `MergedMark` or None) is."""

    marks: tuple

    @property
    def done(self) -> bool:
        return all(m is None or m.done for m in self.marks)


class WorkerSeries:
    """One series at this worker: frames held until calibrated, then its processor."""

    def __init__(self, info: SeriesInfo, gen: int):
        self.info = info
        self.gen = gen  # which run of this series id (a sender may reuse ids)
        self.proc: SeriesProcessor | None = None
        self.taker: DeltaTaker | None = None
        self.held: list[FrameBatch | CompressedFrame] = []
        self.held_bytes = 0
        self.offered = 0  # frames sent to the coordinator to calibrate on
        self.frames = 0  # frames received
        self.ending = False  # ended before its calibration came
        self.lost_reported = 0  # frames its row block found no row for, reported so far
        self.delta_out: dict | None = None  # buffers its deltas are taken into, two halves
        self.delta_busy: list = [None, None]  # each half's last delta: sent / merged yet?
        self.delta_halves: tuple[int, ...] = ()  # the halves the last delta is in (): new arrays
        self.delta_segment: int | None = None  # `delta_out`'s shared segment (a local worker)

    def offers(self, batches: list, n: int, counters: StreamCounters) -> list[list]:
        """The link messages offering frames the coordinator may calibrate on: the series'
        first `n` indices, and this worker's first `n` frames whatever their index."""
        out = []
        for b in batches:
            if self.offered >= n and b.first >= n:
                continue
            try:
                d = b if isinstance(b, FrameBatch) else b.decoded()
            except DecodeError as err:
                counters.reject(err)
                continue
            self.offered += len(d.frames)
            out.append(pack("cal", {"sid": self.info.series_id, "gen": self.gen,
                                    "first": d.first}, {"frames": d.frames}))  # fmt: skip
        return out

    def take_delta(self) -> StateDelta:
        """Its growth since the last delta (`DeltaTaker.take`) into its reused buffers: into
        a half that its last delta has left (sent by ZeroMQ, or merged by the coordinator from
        shared memory: `send_delta`), so that one delta can be taken while the last is still
        read; into both when it needs more rows and both are free; else into new arrays."""
        if self.delta_out is None:
            layout = self.taker.buffers_layout()
            kept = memory_reserve.take_kept(AccumulatorState.block_bytes(layout))
            self.delta_out = self.taker.buffers(kept)
            where = None if kept is None else memory_reserve.locate(kept)
            self.delta_segment = None if where is None else where[0]
        half = len(self.delta_out["totals"]) // 2
        free = [k for k, mark in enumerate(self.delta_busy) if mark is None or mark.done]
        if self.proc.acc.rows.used <= half and free:
            self.delta_halves = (free[0],)
        else:
            self.delta_halves = (0, 1) if len(free) == 2 else ()
        if not self.delta_halves:
            return self.taker.take(None)
        start = self.delta_halves[0] * half
        return self.taker.take({name: a[start:] for name, a in self.delta_out.items()})

    def locate(self, a: np.ndarray) -> tuple[int, int] | None:
        """Where `a` lies in the shared segment of the delta buffers (`worker_link.pack`);
        None elsewhere (a delta's other arrays are sent: the row block's memory, shared too,
        is written again before the coordinator reads)."""
        where = memory_reserve.locate(a) if self.delta_segment is not None else None
        return where if where is not None and where[0] == self.delta_segment else None

    def send_delta(self, link: zmq.Socket, parts: list, merged: MergedMark | None) -> None:
        """Send the delta just taken, without copying it; the halves it is in stay busy while
        zmq holds any of its parts, or, in shared memory (its message names them: `locate`),
        until the coordinator has merged it (`merged`)."""
        if not self.delta_halves:
            link.send_multipart(parts, copy=False)
            return
        if self.delta_segment is not None:
            frames, mark = parts, merged  # (the header and the small arrays are sent)
        else:
            frames = [zmq.Frame(p, copy=False, track=True) for p in parts]
            mark = zmq.MessageTracker(*frames)
        for k in self.delta_halves:  # (before the send: a send may fail midway)
            self.delta_busy[k] = mark
        link.send_multipart(frames, copy=self.delta_segment is not None)

    def release(self) -> None:
        """The series is dropped: its memory kept for the next (`memory_reserve.give_back`),
        the delta buffers once ZeroMQ has sent from them and the coordinator merged them."""
        if self.proc is not None and self.proc.acc is not None:
            memory_reserve.give_back(self.proc.acc.state.totals)
        if self.delta_out is not None:
            memory_reserve.give_back(self.delta_out["totals"],
                                     busy=AllDone(tuple(self.delta_busy)))  # fmt: skip
        self.proc = self.taker = self.delta_out = None

    def free_rows(self) -> int:
        """Rows free in its row block (`RowBlock`; calibrated series only)."""
        return self.proc.acc.rows.free

    def newly_lost(self) -> int:
        """Frames the kernels found no row for since the last call (`RowBlock.lost`)."""
        n = self.proc.acc.rows.lost - self.lost_reported
        self.lost_reported += n
        return n

    def short_of(self, rows: int) -> bool:
        """Fewer than `rows` rows free in its row block (a block of fewer than 2 x `rows`
        rows: fewer than half of them, at least one)?"""
        block = self.proc.acc.rows if self.proc is not None else None
        return block is not None and block.free < max(1, min(rows, block.slot_pos.size // 2))

    def keep(self, batches: list, limit_bytes: int, counters: StreamCounters) -> None:
        """Hold frames until the calibration comes, within `limit_bytes` (else rejected)."""
        for b in batches:
            size = batch_bytes(b)
            if self.held_bytes + size > limit_bytes:
                counters.reject(DecodeError("backlog_full", "frames before calibration"))
                continue
            self.held.append(b)
            self.held_bytes += size


@dataclass
class PendingEnd:
    """A series end the coordinator has relayed and waits on (`WorkerPool.end_due`)."""

    event: SeriesEnd
    waiting: set  # workers whose last delta is still to come
    deadline: float
    gen: int  # the run of the series id it ends
    offered: set = field(default_factory=set)  # workers that offered all their frames

    def answered(self, ident: bytes, kind: str) -> None:
        """A worker's "ending" (all its frames offered, not calibrated) or "ended"."""
        self.offered.add(ident)
        if kind == "ended":
            self.waiting.discard(ident)


class Copies:
    """PUB: each worker sends the coordinator every control message it reads (a start also as
    "first"); each occurrence in the stream is taken once. A copy is another worker's copy of
    the occurrence taken last, and dropped, when it comes within WINDOW_S of it from a worker
    that has not sent that occurrence yet (of that kind); anything else is a new occurrence:
    a message the sender sends again byte for byte (a restarted native sender's start; a
    window alone had dropped it) comes again from a worker that sent it already. Bounded: the
    last KEPT contents."""

    KEPT, WINDOW_S = 256, 2.0

    def __init__(self):
        self.last: dict[bytes, tuple[float, set]] = {}  # content -> (taken at, its senders)

    def take(self, raw: list, kind: str, ident: bytes, now: float) -> bool:
        key = hashlib.blake2b(b"".join(bytes(memoryview(p)) for p in raw)).digest()
        taken = self.last.get(key)
        if taken is not None and now - taken[0] < self.WINDOW_S and (ident, kind) not in taken[1]:
            taken[1].add((ident, kind))
            return False
        self.last.pop(key, None)
        self.last[key] = (now, {(ident, kind)})
        while len(self.last) > self.KEPT:
            self.last.pop(next(iter(self.last)))
        return True


class Ends:
    """The coordinator's pending ends by (series id, run). A worker's answer that comes before
    its end is pending is kept for it: on a PUB stream each worker decodes its own copy of the
    end and answers at once, while the coordinator opens the end only when its control window
    settles; dropped, the answer left the end waiting its whole `end_wait_s`, and the worker
    named as having lost frames. At most EARLY_KEPT ends' early answers are kept."""

    EARLY_KEPT = 64

    def __init__(self):
        self.pending: dict[tuple[int, int], PendingEnd] = {}
        self.early: dict[tuple[int, int], list[tuple[bytes, str]]] = {}

    def open(self, end: PendingEnd) -> None:
        key = (end.event.series_id, end.gen)
        self.pending[key] = end
        for ident, kind in self.early.pop(key, ()):
            end.answered(ident, kind)

    def answer(self, key: tuple[int, int], ident: bytes, kind: str) -> None:
        if (end := self.pending.get(key)) is not None:
            end.answered(ident, kind)
            return
        self.early.setdefault(key, []).append((ident, kind))
        while len(self.early) > self.EARLY_KEPT:
            self.early.pop(next(iter(self.early)))


@dataclass
class Peer:
    """A worker as the coordinator knows it: its last beat, its state."""

    index: int
    name: str
    last_seen: float
    messages: int = 0
    rejected: dict = field(default_factory=dict)
    frames: int = 0
    lane: int = 0  # image messages its compiled lane read
    held: int = 0  # bytes of frame messages it holds for a series not known or calibrated
    gone: str | None = None  # "died" / "stalled"
    cpu_s: dict = field(default_factory=dict)  # its CPU seconds by stage, last reported
    peak_rss_mb: float = 0.0
    row_waits: tuple[int, float] = (0, 0.0)  # deltas its full row block forced: times, s
    merge_waits: tuple[int, float] = (0, 0.0)  # deltas held back for the coordinator: times, s
    flushed: bool = False

    def read_beat(self, head: dict, counters: StreamCounters) -> bool:
        """Add what the worker's counters grew by since its last beat to `counters`; True when
        it received messages since then."""
        messages = int(head.get("messages", 0))
        grew = messages > self.messages
        counters.messages += messages - self.messages
        rejected = {str(k): int(v) for k, v in dict(head.get("rejected", {})).items()}
        before = self.rejected
        counters.rejected.update(Counter({k: v - before.get(k, 0) for k, v in rejected.items()
                                          if v > before.get(k, 0)}))  # fmt: skip
        self.messages, self.rejected = messages, rejected
        self.frames = int(head.get("frames", self.frames))
        self.lane = int(head.get("lane", self.lane))
        self.held = int(head.get("held", 0))
        self.cpu_s = {str(k): float(v) for k, v in dict(head.get("cpu_s", {})).items()}
        self.peak_rss_mb = float(head.get("peak_rss_mb", 0.0))
        w = head.get("waits", ())
        if isinstance(w, list) and len(w) == 4:
            self.row_waits, self.merge_waits = (int(w[0]), float(w[1])), (int(w[2]), float(w[3]))
        return grew


class Backlog:
    """Frame messages of series not known yet, oldest first, bounded in bytes; after `max_age_s`
    they are rejected (`no_start`)."""

    def __init__(self, max_bytes: int, max_age_s: float):
        self.items: deque[tuple[float, list]] = deque()  # (when held, the message's parts)
        self.bytes = 0
        self.max_bytes, self.max_age_s = max_bytes, max_age_s

    def hold(self, parts: list, counters: StreamCounters) -> None:
        size = message_bytes(parts)
        if self.bytes + size > self.max_bytes:
            counters.reject(DecodeError("backlog_full", "frames before their series' start: "
                                        "backlog full"))  # fmt: skip
            return
        self.items.append((time.monotonic(), parts))
        self.bytes += size

    def take(self) -> deque[tuple[float, list]]:
        """Everything held, emptying the backlog."""
        items, self.items, self.bytes = self.items, deque(), 0
        return items

    def expire(self, now: float, counters: StreamCounters) -> None:
        while self.items and now - self.items[0][0] > self.max_age_s:
            _, parts = self.items.popleft()
            self.bytes -= message_bytes(parts)
            counters.reject(DecodeError("no_start", "frame message whose series never started"))


def batch_bytes(b: FrameBatch | CompressedFrame) -> int:
    return b.frames.nbytes if isinstance(b, FrameBatch) else memoryview(b.blob).nbytes


def buffer(part):
    return part.buffer if isinstance(part, zmq.Frame) else part


def message_bytes(parts: list) -> int:
    return sum(memoryview(buffer(p)).nbytes for p in parts)


def frame_count(b: FrameBatch | CompressedFrame) -> int:
    return len(b.frames) if isinstance(b, FrameBatch) else 1


def by_series(frames: list, share: tuple[int, int] | None) -> dict[int, list]:
    """Frame events grouped by series, in order; with a PUB `share` (k, n), only the
    batches of share k of n."""
    if share is not None:
        k, n = share
        frames = [b for b in frames if (b.first // frame_count(b)) % n == k]
    groups: dict[int, list] = {}
    for b in frames:
        groups.setdefault(b.series_id, []).append(b)
    return groups


def lost(n: int, sid: int, worker: int, counters: StreamCounters) -> None:
    """Frames that found no row in the series' row block (the coordinator took no delta for
    too long, or the kernel found the block full: `RowBlock.lost`): rejected, logged."""
    if n <= 0:
        return
    log.error("worker %d: %d frame(s) of series %d lost: no free rows in its row block",
              worker, n, sid)  # fmt: skip
    for _ in range(n):
        counters.reject(DecodeError("no_room", f"frames of series {sid}"))


def fitting(batches: list, free: int) -> tuple[list, list]:
    """`batches` split into a head of at most `free` frames (a FrameBatch cut where it must)
    and the rest."""
    head, n = [], 0
    for k, b in enumerate(batches):
        m = frame_count(b)
        if n + m <= free:
            head.append(b)
            n += m
            continue
        if isinstance(b, FrameBatch) and free > n:
            cut = free - n
            rest = replace(b, first=b.first + cut, frames=b.frames[cut:])
            return [*head, replace(b, frames=b.frames[:cut])], [rest, *batches[k + 1 :]]
        return head, batches[k:]
    return head, []


def beat(c: StreamCounters, cpu_s: dict, unsent: int, held_bytes: int,
         waits: tuple = (0, 0.0, 0, 0.0), sent: int = 0) -> list:  # fmt: skip
    """A worker's "beat": its counters, CPU seconds by stage, messages it could not send,
    bytes held, peak memory, its waits (times, seconds) for free rows and for the
    coordinator to merge (`worker_inbox`), and its delta bytes sent (the coordinator adds the
    growth, reports the rest and answers "merged")."""
    return pack("beat", {"messages": c.messages, "rejected": dict(c.rejected),
                         "frames": c.frames, "lane": c.lane, "unsent": unsent,
                         "peak_rss_mb": peak_rss_mb(), "cpu_s": cpu_s, "held": held_bytes,
                         "waits": list(waits), "sent": sent,
                         "unshared": memory_reserve.unshared()})  # fmt: skip
