"""What a worker keeps of one series, and the sizes of what it holds (`stream.worker`)."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import zmq

from tcbf_live.detectors.base import CompressedFrame, DecodeError, FrameBatch, SeriesInfo
from tcbf_live.stream.pages import peak_rss_mb
from tcbf_live.stream.receiver import StreamCounters
from tcbf_live.stream.series import SeriesProcessor
from tcbf_live.stream.tcbf.accumulators import DeltaTaker
from tcbf_live.stream.worker_link import pack


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


def beat(c: StreamCounters, cpu_s: dict, unsent: int, held_bytes: int) -> list:
    """A worker's "beat": its counters, CPU seconds by stage, messages it could not send,
    bytes held and peak memory (the coordinator adds the growth and reports the rest)."""
    return pack("beat", {"messages": c.messages, "rejected": dict(c.rejected),
                         "frames": c.frames, "lane": c.lane, "unsent": unsent,
                         "peak_rss_mb": peak_rss_mb(), "cpu_s": cpu_s,
                         "held": held_bytes})  # fmt: skip
