"""The compiled ingest lane (`stream.fast_lane`) put to use by a receiving loop (a worker, or
the engine in one process): when the decoder has learned the image layout of a series that the
receiver has calibrated, image messages of that series are received and folded by the compiled
loop; the message it stops at goes to the decoder, as any other message."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zmq

from tcbf_live.detectors.base import DecodeError, SeriesInfo
from tcbf_live.detectors.compression import native_bslz4
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder
from tcbf_live.detectors.dectris_v2 import DectrisV2Decoder
from tcbf_live.stream.fast_lane import MAX_FRAME_ID, Lane, LaneTarget, bind_libzmq

if TYPE_CHECKING:
    from tcbf_live.stream.receiver import StreamCounters
    from tcbf_live.stream.series import SeriesProcessor

MAX_LANE_MESSAGES = 1024  # per call: the receiving loop stays responsive (control, deltas)
TAP_BYTES = 8 << 20  # the blobs one call copies out for `run --record` (a fuller call stops),
TAP_FRAMES = 64  # ... or room for this many whole frames, if more


@dataclass(frozen=True)
class TappedFrames:
    """The bslz4 blobs one lane call folded, copied for the recorder (`run --record`): blob k
    is `data[offsets[k]:offsets[k + 1]]`, its frame id `frames[k]` (as a decoder's `first`)."""

    series_id: int
    data: np.ndarray
    offsets: np.ndarray
    frames: np.ndarray


@dataclass(frozen=True)
class LaneFolded:
    """An event of the receiving loop: the lane folded `frames` image messages of a series."""

    series_id: int
    frames: int
    tapped: TappedFrames | None = None


@dataclass(frozen=True)
class LaneTake:
    """What one call of `LaneReader.take` did."""

    series_id: int | None  # the series the lane folded into (None: it had none to fold into)
    folded: int  # image messages folded
    parts: list  # the message the lane stopped at, for the decoder (empty: none)
    tapped: TappedFrames | None = None  # the blobs it folded (a tapping reader only)


def lane_for(sock: zmq.Socket, decoder, shared: bool, enabled: bool,
             tap: bool = False) -> LaneReader | None:  # fmt: skip
    """The lane reader for this socket (`tap`: it copies the blobs it folds out for the
    recorder), or None: not asked for, a PUB share (each worker keeps only its share of every
    message), another protocol, no libzmq to bind, or no in-kernel bslz4."""
    if not enabled or shared or not isinstance(decoder, DectrisV1Decoder | DectrisV2Decoder):
        return None
    if bind_libzmq() is None or not native_bslz4():
        return None
    return LaneReader(Lane(sock), decoder, tap)


class LaneReader:
    def __init__(self, lane: Lane, decoder: DectrisV1Decoder | DectrisV2Decoder,
                 tap: bool = False):  # fmt: skip
        self.lane, self.decoder = lane, decoder
        self._scratch: np.ndarray | None = None
        self._tapping = tap
        self._tap = (np.empty(0, np.uint8), np.zeros(MAX_LANE_MESSAGES + 1, np.int64),
                     np.zeros(MAX_LANE_MESSAGES, np.int64))  # fmt: skip

    def target(self, proc: SeriesProcessor, info: SeriesInfo, templates: tuple) -> LaneTarget:
        dtype, pixels = np.dtype(info.dtype), math.prod(info.detector_shape)
        if self._scratch is None or self._scratch.dtype != dtype or self._scratch.size != pixels:
            self._scratch = np.empty(pixels, dtype)
        limit = MAX_FRAME_ID + 1 if info.frames_expected is None else info.frames_expected
        staging = proc.staging
        frame_bytes = pixels * dtype.itemsize
        room = max(TAP_BYTES, TAP_FRAMES * (frame_bytes + frame_bytes // 128 + 1024))  # (LZ4)
        if self._tapping and self._tap[0].size < room:
            self._tap = (np.empty(room, np.uint8), *self._tap[1:])
        return LaneTarget(templates, limit, staging.index_offset, dtype.itemsize,
                          self._scratch, staging.acc.kernel_args(), self._tap)  # fmt: skip

    def take(self, lookup: Callable[[SeriesInfo], SeriesProcessor | None], max_bytes: int,
             counters: StreamCounters) -> LaneTake:  # fmt: skip
        """Fold what the lane can into the processor `lookup` gives for the decoder's lane
        series (a calibrated one of the same geometry, or None: nothing is read). The messages
        folded and one released unread are counted in `counters`; the caller counts the one
        handed back (`parts`) as it counts what it receives."""
        info, templates = self.decoder.lane() or (None, None)
        proc = None if info is None else lookup(info)
        if proc is None or proc.staging is None or proc.info.detector_shape != \
                info.detector_shape or proc.info.dtype != info.dtype:  # fmt: skip
            return LaneTake(None, 0, [])
        rows = proc.staging.acc.rows  # a worker's row block: one call fills at most the rest
        limit = MAX_LANE_MESSAGES if rows is None else min(MAX_LANE_MESSAGES, rows.free)
        if limit == 0:  # nothing is read until a delta frees rows
            return LaneTake(info.series_id, 0, [])
        n, last_frame, parts, oversized = self.lane.drain(self.target(proc, info, templates),
                                                          limit, max_bytes)  # fmt: skip
        tapped = None
        if n and self._tap[0].size:
            data, offsets, frames = self._tap
            tapped = TappedFrames(info.series_id, data[: offsets[n]].copy(),
                                  offsets[: n + 1].copy(), frames[:n].copy())  # fmt: skip
        if n:
            self.decoder.lane_consumed(n, last_frame)
            proc.touch()
            counters.messages += n
            counters.lane += n
        if oversized:
            counters.messages += 1
            counters.reject(DecodeError("oversized", oversized))
        return LaneTake(info.series_id, n, parts, tapped)
