"""The coordinator's calibration of a series its workers receive (`stream.worker_pool`).

Workers offer their first frames ("cal"); the coordinator calibrates on the lowest
`calibration_frames` indices, which is what one process takes from an in-order stream (all of
the first N as soon as they are in; N frames after CAL_WAIT_S; whatever came at a short
series' end), and sends the calibration to every worker. Offers are checked (shape, dtype) and
bounded (series and frames held).
"""

from __future__ import annotations

import time

import numpy as np

from tcbf_live.detectors.base import DecodeError
from tcbf_live.stream.worker_link import pack

CAL_WAIT_S = 1.0  # calibrate on what arrived when the first indices do not all come
MAX_PENDING = 4  # series whose calibration frames are held at once
MAX_CALIBRATION_FRAMES = 4096  # frames one offer may hold


class Calibrating:
    """The calibration part of `WorkerPool` (its `engine`, `opened`, `candidates`,
    `first_candidate` and `tell_all`); offers are kept by (series id, run)."""

    def candidate(self, sid: int, gen: int, first: int, frames: np.ndarray) -> None:
        """Frames a worker offers to calibrate run `gen` of series `sid` on; kept also
        before that run is open here (a worker may offer them first), for at most
        MAX_PENDING runs."""
        proc = self.current(sid, gen)
        if proc is not None and (proc.calibrated or proc.calibration_error is not None):
            return
        key = (sid, gen)
        if key not in self.candidates and len(self.candidates) >= MAX_PENDING:
            self.engine.counters.reject(DecodeError("no_start", f"frames of series {sid} "
                                                    "offered to calibrate on"))  # fmt: skip
            return
        like = None if proc is None else (tuple(proc.info.detector_shape), proc.info.dtype)
        if frames.ndim != 3 or (like and (frames.shape[1:], frames.dtype) != like):
            raise ValueError(f"frames {frames.shape} {frames.dtype} offered for series {sid}")
        held = self.candidates.setdefault(key, {})
        self.first_candidate.setdefault(key, time.monotonic())
        for k, f in enumerate(frames):
            if len(held) >= 4 * MAX_CALIBRATION_FRAMES:
                break
            held.setdefault(first + k, f.copy())
        self.ready(sid)

    def current(self, sid: int, gen: int | None = None):
        """The engine's processor of the open run of `sid` (of run `gen`, if given)."""
        proc = self.engine.table.open.get(sid)
        return proc if gen is None or self.opened.get(sid) == gen else None

    def ready(self, sid: int) -> None:
        """Calibrate once the first `calibration_frames` indices of the open run are in."""
        proc = self.current(sid)
        held = self.candidates.get((sid, self.opened.get(sid)))
        if proc is None or not held or proc.calibrated:
            return
        n = proc.settings.calibration_frames
        if all(proc.index_offset + i in held for i in range(n)):
            self.calibrate(sid)

    def calibrate(self, sid: int, force: bool = False) -> None:
        """Calibrate the open run of `sid` on the lowest indices offered (all of the first N,
        N frames after CAL_WAIT_S, or whatever came at the end) and send the calibration to
        every worker."""
        key = (sid, self.opened.get(sid))
        held = self.candidates.get(key, {})
        proc = self.current(sid)
        n = proc.settings.calibration_frames if proc is not None else 0
        if proc is None or (len(held) < n and not force):
            return
        self.candidates.pop(key, None)
        self.first_candidate.pop(key, None)
        like = (tuple(proc.info.detector_shape), np.dtype(proc.info.dtype))
        usable = [i for i in sorted(held) if (held[i].shape, held[i].dtype) == like]
        if not usable:
            return
        frames = np.stack([held[i] for i in usable[:n]])
        if self.engine.calibrate_series(sid, frames):
            cal = proc.raw_calibration.to_json()
            self.tell_all(pack("cal", {"sid": sid, "gen": key[1], "calibration": cal}))
        else:
            self.tell_all(pack("drop", {"sid": sid, "gen": key[1], "why": "refused"}))
