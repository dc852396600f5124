"""A worker's use of the compiled ingest lane (`stream.fast_lane`): when its decoder has learned
the image layout of a series this worker has calibrated, image messages of that series are
received and folded by the compiled loop; the message it stops at goes to the decoder."""

from __future__ import annotations

import math

import numpy as np
import zmq

from tcbf_live.detectors.compression import native_bslz4
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder
from tcbf_live.stream.fast_lane import MAX_FRAME_ID, Lane, LaneTarget, bind_libzmq
from tcbf_live.stream.worker_series import WorkerSeries

MAX_LANE_MESSAGES = 1024  # per call: the worker's loop (link, deltas, beats) stays responsive


def lane_for(sock: zmq.Socket, decoder, shared: bool, enabled: bool) -> WorkerLane | None:
    """The lane for this socket, or None: not asked for, a PUB share (each worker keeps only
    its share of every message), another protocol, no libzmq to bind, or no in-kernel bslz4."""
    if not enabled or shared or not isinstance(decoder, DectrisV1Decoder):
        return None
    if bind_libzmq() is None or not native_bslz4():
        return None
    return WorkerLane(Lane(sock), decoder)


class WorkerLane:
    def __init__(self, lane: Lane, decoder: DectrisV1Decoder):
        self.lane, self.decoder = lane, decoder
        self._scratch: np.ndarray | None = None

    def target(self, series: dict[int, WorkerSeries]) -> tuple[WorkerSeries, LaneTarget] | None:
        """The series the lane may fold into now, with its target."""
        got = self.decoder.lane()
        if got is None:
            return None
        info, layout = got
        s = series.get(info.series_id)
        staging = None if s is None or s.proc is None else s.proc.staging
        if staging is None or s.info.detector_shape != info.detector_shape:
            return None
        dtype = np.dtype(info.dtype)
        if self._scratch is None or self._scratch.dtype != dtype or \
                self._scratch.size != math.prod(info.detector_shape):  # fmt: skip
            self._scratch = np.empty(math.prod(info.detector_shape), dtype)
        limit = MAX_FRAME_ID + 1 if info.frames_expected is None else info.frames_expected
        return s, LaneTarget(layout.dimage, layout.image_d, layout.dconfig, limit,
                             staging.index_offset, dtype.itemsize, self._scratch,
                             staging.acc.kernel_args())  # fmt: skip

    def take(self, series: dict[int, WorkerSeries],
             max_bytes: int) -> tuple[int, list, str | None]:  # fmt: skip
        """Fold what the lane can: (image messages folded, the parts of the message it stopped
        at: empty for none, why that message was released unread: see `Lane.drain`)."""
        found = self.target(series)
        if found is None:
            return 0, [], None
        s, target = found
        n, last_frame, parts, oversized = self.lane.drain(target, MAX_LANE_MESSAGES, max_bytes)
        if n:
            self.decoder.lane_consumed(n, last_frame)
            s.frames += n
        return n, parts, oversized
