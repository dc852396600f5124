"""The engine's book of open series: who is open, what each announced, holds and reserves.

No threads and no sockets: the engine's ingest thread is the only caller. Each open series
has its `SeriesProcessor`, the metadata of its first start (a later start that changes it is
refused), its frames' geometry (frames of another shape or dtype never reach a kernel), when it
last received frames (a quiet one ends while another receives) and the bytes it reserves of the
memory budget (`stream.budget`): a series may grow into what the others *holding frames* leave,
so a stray start with no frames never takes budget from a series that is receiving.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from tcbf_live.detectors.base import FrameBatch, SeriesInfo
from tcbf_live.stream.budget import BudgetExceeded, check_info, series_footprint
from tcbf_live.stream.budget import upsampling_bound as _upsampling
from tcbf_live.stream.result import SeriesResult
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor

REMEMBERED_SERIES = 64  # ids of ended / refused series remembered (to name their stragglers)


@dataclass
class Tallies:
    """What the series of a run ended with, for the caller's exit code (final once the
    engine's `join()` returned True)."""

    finished: int = 0  # every result handed on, empty ones included
    complete: int = 0  # ended normally, nothing missing
    incomplete: int = 0  # frames missing or ended early
    empty: int = 0  # started, no frame
    # ended by the detector's end message or the last frame: what `max_series` counts (a
    # series cut short by a restart, a quiet spell or the stream stopping never does, so a
    # restarted sender's complete series is still received in full; one that the detector
    # itself ended with frames missing does, else the run would wait out its idle timeout)
    ended: int = 0
    refused: Counter = field(default_factory=Counter)  # unusable_series, over_budget, ...

    def count(self, result: SeriesResult) -> None:
        self.finished += 1
        if not result.frames_received:
            self.empty += 1
            return
        if result.complete:  # ended by its end message or last frame (not idle, not replaced)
            self.ended += 1
        if result.complete and not result.frames_missing:
            self.complete += 1
        else:
            self.incomplete += 1


class SeriesTable:
    """Open series by id, with the books the engine keeps on each."""

    def __init__(self, processing: ProcessingSettings, budget_bytes: int):
        self.processing = processing
        self.budget_bytes = budget_bytes
        self.open: dict[int, SeriesProcessor] = {}  # series being accumulated, by id
        self.announced: dict[int, SeriesInfo] = {}  # their SeriesInfo as first announced
        self.geometry: dict[int, tuple] = {}  # their frames' (shape, numpy dtype)
        self.active: dict[int, float] = {}  # when each last received frames (or started)
        self.reserved: dict[int, int] = {}  # bytes each holds or will hold (budget)
        self.ended: dict[int, str] = {}  # recently ended or refused ids -> why (bounded)

    def __len__(self) -> int:
        return len(self.open)

    def __contains__(self, sid: int) -> bool:
        return sid in self.open

    def create(self, info: SeriesInfo, pass_index: int = 0) -> SeriesProcessor:
        """A processor for the series, once what it will allocate before calibration (and
        after, when the calibration is given) fits what the open series leave of the budget
        (BudgetExceeded otherwise; nothing allocated). SeriesError for unusable metadata."""
        processing = self.processing
        resolved = processing.resolve(info)
        if resolved.scan_shape is None:
            return SeriesProcessor(info, processing, pass_index)  # SeriesError: says why
        limit = resolved.frames_expected
        if limit is None or processing.repeat_scans == "new-series":
            limit = resolved.scan_shape[0] * resolved.scan_shape[1]
        cal = processing.calibration
        left = self.budget_bytes - self.held()
        reason = check_info(resolved, left, n_bf=cal.n_bf if cal is not None else None,
                            frame_limit=limit, upsample=processing.pipeline.upsample,
                            calibration_frames=processing.calibration_frames)  # fmt: skip
        if reason is not None:
            raise BudgetExceeded(f"series {info.series_id}: {reason}")
        # the calibrated size is checked again when the stack is allocated (SeriesProcessor)
        proc = SeriesProcessor(info, replace(processing, memory_budget_bytes=left), pass_index)
        self.reserved[info.series_id] = footprint(proc)
        return proc

    def add(self, info: SeriesInfo, proc: SeriesProcessor) -> None:
        """Open `proc` as series `info.series_id` (announced with `info`)."""
        sid = info.series_id
        self.ended.pop(sid, None)
        self.open[sid] = proc
        self.announced[sid] = info
        self.geometry[sid] = (tuple(proc.info.detector_shape), np.dtype(proc.info.dtype))
        self.active[sid] = time.monotonic()
        self.rebudget()

    def forget(self, sid: int, why: str) -> SeriesProcessor | None:
        """Take the series out of the open set, remembering why ('ended', 'refused')."""
        proc = self.open.pop(sid, None)
        for book in (self.announced, self.geometry, self.active, self.reserved):
            book.pop(sid, None)
        self.ended[sid] = why
        while len(self.ended) > REMEMBERED_SERIES:
            self.ended.pop(next(iter(self.ended)))
        self.rebudget()
        return proc

    def latest(self) -> SeriesProcessor | None:
        """The open series that received frames last (what snapshots show)."""
        sid = max(self.active, key=self.active.__getitem__, default=None)
        return self.open.get(sid) if sid is not None else None

    def quietest(self) -> int:
        """The series to end when too many are open: one without frames first, else the one
        that has been quiet the longest."""
        return min(self.open, key=lambda k: (self.open[k].frames_received > 0, self.active[k]))

    def stale(self, stale_s: float) -> list[int]:
        """Open series that received nothing for `stale_s` while another one did."""
        if len(self.open) < 2:
            return []
        now = time.monotonic()
        latest = max(self.active.values())
        return [k for k, t in self.active.items() if now - t > stale_s and latest > t]

    def route(self, batches: list) -> list[tuple[int, list]]:
        """Frame batches grouped by series id, in order of first appearance."""
        if not batches:
            return []
        sid = batches[0].series_id
        if all(b.series_id == sid for b in batches):  # the usual case: one series
            return [(sid, batches)]
        groups: dict[int, list] = {}
        for b in batches:
            groups.setdefault(b.series_id, []).append(b)
        return list(groups.items())

    def stranger(self, sid: int) -> tuple[str, str]:
        """Why frames of series `sid`, which is not open, are rejected: (reason, detail)."""
        if self.ended.get(sid) == "refused":
            return "series_refused", f"frames of refused series {sid}"
        if not self.open:
            return "no_series", f"frames of series {sid}"
        return "wrong_series", f"frames of series {sid}, which is not open"

    def touched(self, sid: int) -> None:
        self.active[sid] = time.monotonic()

    def matching(self, sid: int, batches: list) -> tuple[list, list[str]]:
        """The batches whose frames have the series' shape and dtype, and a description of
        each other one (they never reach a kernel, which trusts the shape it was built for)."""
        shape, kind = self.geometry[sid]
        ok = [b.frames.shape[1:] == shape and b.frames.dtype == kind
              if type(b) is FrameBatch else tuple(b.shape) == shape and np.dtype(b.dtype) == kind
              for b in batches]  # fmt: skip
        if all(ok):
            return batches, []
        bad = [f"frames {b.frames.shape[1:] if type(b) is FrameBatch else b.shape} for series "
               f"{sid} of {shape} {kind.str}"
               for b, good in zip(batches, ok, strict=True) if not good]  # fmt: skip
        return [b for b, good in zip(batches, ok, strict=True) if good], bad

    def reserve(self, sid: int) -> None:
        """The series was just calibrated (sized): reserve what it now holds."""
        self.reserved[sid] = footprint(self.open[sid])

    def held(self, but: int | None = None) -> int:
        """Bytes reserved by the open series that hold frames (but `but`)."""
        return sum(n for k, n in self.reserved.items()
                   if k != but and k in self.open and self.open[k].frames_received)  # fmt: skip

    def rebudget(self) -> None:
        """Each open series may grow into what the others (with frames) leave of the budget."""
        for sid, proc in self.open.items():
            left = self.budget_bytes - self.held(but=sid)
            proc.settings = replace(proc.settings, memory_budget_bytes=left)


def footprint(proc: SeriesProcessor) -> int:
    """Bytes the series holds: exact once calibrated, else what it will at least hold."""
    info, s = proc.info, proc.settings
    n_bf, n_tiles = proc.sizes() or (None, None)
    kind = np.dtype(info.dtype)
    return series_footprint(
        info.scan_shape, info.detector_shape, kind.itemsize, n_bf,
        _upsampling(info, s.pipeline.upsample,
                    proc.calibration.angular_sampling_mrad if proc.calibration else None),
        frames_expected=proc.frame_limit, n_tiles=n_tiles,
        calibration_frames=s.calibration_frames, integer_stack=kind.kind == "u",
    ).total  # fmt: skip
