"""One series from start to result: the engine's one object per series.

No sockets and no threads here: the live engine and offline tools feed `SeriesProcessor` the
same `SeriesInfo` and `FrameBatch` events, so both share one code path. Its phases, as
LiberTEM's UDFs split them (docs/architecture.md):

- *accumulate* (`add`, `add_many`): calibrate on the first frames, then fold every batch into
  the partition-local `AccumulatorState` (numba, no Python per frame);
- *merge* (`merge`): fold another receiver's partial state of the same series in (assign for
  disjoint scan positions, add for repeat passes);
- *solve* (`inputs`, then `solve`): alignment, aberrations, image and resolution from the merged
  state. `inputs` copies what one update needs (live: under the ingest lock), `solve` works on
  the copy (live: on the alignment thread, without the lock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from tcbf_live.detectors import base as detector
from tcbf_live.detectors.base import CompressedFrame, DecodeError, FrameBatch, SeriesInfo
from tcbf_live.stream import memory_reserve
from tcbf_live.stream.budget import BudgetExceeded, check_info
from tcbf_live.stream.result import POSITION_MAPS, SeriesResult, suspicions
from tcbf_live.stream.staging import Staging
from tcbf_live.stream.tcbf import calibration as calib
from tcbf_live.stream.tcbf import pipeline as pl
from tcbf_live.stream.tcbf.accumulators import Accumulators, AccumulatorState, StateDelta, prepare
from tcbf_live.stream.tcbf.descan_compensation import DescanCompensation

log = logging.getLogger(__name__)

# the stream metadata a flag may override (`ProcessingSettings.metadata`)
METADATA_OVERRIDES = ("scan_shape", "energy_eV", "step_A", "semiangle_mrad",
                      "angular_sampling_mrad", "counts_per_electron", "dose_e_per_A2")  # fmt: skip


class SeriesError(ValueError):
    """A series that cannot be processed (e.g. unknown scan shape)."""


@dataclass(frozen=True)
class ProcessingSettings:
    """How to turn frames into accumulators; `None` means 'from the stream / the data'."""

    # stream metadata given explicitly (flags), taking precedence: keys of METADATA_OVERRIDES
    metadata: Mapping[str, Any] = field(default_factory=dict)
    calibration_frames: int = 64
    bf_threshold: float = calib.DEFAULT_BF_THRESHOLD
    calibration: calib.Calibration | None = None  # fixed calibration (from a file)
    mask: np.ndarray | None = field(default=None, compare=False)  # extra excluded pixels
    bins: tuple[int, ...] | None = None  # alignment bin levels (detector px)
    axial_radius_px: float | None = None  # None: 25 % of the BF radius
    repeat_scans: str = "accumulate"  # frames beyond one pass: "accumulate" | "new-series"
    pipeline: pl.PipelineSettings = field(default_factory=pl.PipelineSettings)
    # bytes the series may allocate (stream.budget); None: not checked. Checked again with
    # the calibrated BF pixel count before the stack is allocated (BudgetExceeded)
    memory_budget_bytes: int | None = None
    compensate_descan: bool = False  # read each position's BF pixels at the drifting disk
    row_block_rows: int | None = None  # a worker: a `RowBlock` of this many rows (0: by bytes)

    def __post_init__(self):
        unknown = set(self.metadata) - set(METADATA_OVERRIDES)
        if unknown:
            raise ValueError(f"unknown metadata override(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in self.metadata.items() if v is not None}
        object.__setattr__(self, "metadata", MappingProxyType(given))

    def resolve(self, info: SeriesInfo) -> SeriesInfo:
        """Stream metadata with explicit settings taking precedence."""
        return info.with_overrides(**self.metadata)


def _finite(a: np.ndarray) -> np.ndarray:
    """Non-finite values (a float stream's NaN/inf frames, excluded by screening) read as 0."""
    return np.where(np.isfinite(a), a, 0.0) if a.dtype.kind == "f" else a


class SeriesProcessor:
    """Calibrates on the first frames, then accumulates, merges and solves one series."""

    def __init__(self, info: SeriesInfo, settings: ProcessingSettings, pass_index: int = 0):
        self.info = settings.resolve(info)
        self.settings = settings
        if self.info.scan_shape is None:
            raise SeriesError(
                f"series {info.series_id}: the stream does not give the scan shape; "
                "pass --scan ROWSxCOLS"
            )
        mask, detector = settings.mask, tuple(self.info.detector_shape)
        if mask is not None and np.shape(mask) != detector:  # refused now, not at calibration
            raise SeriesError(f"series {info.series_id}: --mask is {np.shape(mask)[0]}x"
                              f"{np.shape(mask)[1]} but the detector is {detector[0]}x"
                              f"{detector[1]} px")  # fmt: skip
        self.scan_shape = self.info.scan_shape
        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        if self.info.frames_expected is None or settings.repeat_scans == "new-series":
            self.frame_limit = self.n_positions
        else:
            self.frame_limit = int(self.info.frames_expected)
        self.index_offset = pass_index * self.n_positions
        self.calibration: calib.Calibration | None = settings.calibration
        self.raw_calibration: calib.Calibration | None = None
        self.acc: Accumulators | None = None
        self.calibration_error: str | None = None
        self.decode_failures = 0  # frames skipped because their pixels did not decode
        self._pipeline: pl.Pipeline | None = None
        self.descan: DescanCompensation | None = None
        self.staging: Staging | None = None
        self._pending: list[tuple[int, np.ndarray]] = []
        self._t_first: float | None = None
        self._t_last = 0.0
        self._pending_frames = 0
        if self.calibration is not None:
            cal, flagged = self.calibration, self.info.pixel_mask
            if flagged is not None and flagged.shape == cal.detector_shape:
                cal = cal.excluding(flagged)  # the detector's mask applies to a given one too
            self._build(cal)

    # ------------------------------------------------------------------ accumulate
    def add(self, batch: FrameBatch | CompressedFrame) -> None:
        """Fold one batch in (indices relative to the series start)."""
        self.add_many([batch])

    def add_many(self, batches: list[FrameBatch | CompressedFrame]) -> None:
        """Fold several batches in order; before calibration, hold them (bounded by
        `calibration_frames` plus one batch) and calibrate once enough have arrived."""
        self.touch()
        if self.staging is not None:
            self._count_failures(self.staging.fold(batches))
            return
        for k, b in enumerate(batches):
            if self.staging is not None:  # calibrated within this call: the rest in one go
                self._count_failures(self.staging.fold(batches[k:]))
                return
            if isinstance(b, CompressedFrame):
                try:  # calibration needs the pixels
                    b = b.decoded()
                except DecodeError as err:
                    self._count_failures({str(err): 1})
                    continue
            if self.calibration_error is not None:  # unusable series: count, do not keep
                self._pending_frames += len(b.frames)
            else:
                self._pending.append((b.first - self.index_offset, b.frames))
                self._pending_frames += len(b.frames)
                if self._pending_frames >= self.settings.calibration_frames:
                    self.calibrate_now()

    def _count_failures(self, failed: Mapping[str, int]) -> None:
        """Frames whose pixels could not be decoded: counted (`decode_failures`) and logged;
        the receiver reports them with its other rejections."""
        for why, count in failed.items():
            self.decode_failures += count
            if self.decode_failures <= 10:
                log.warning("series %d: %d frame(s) skipped: %s", self.info.series_id, count,
                            why)  # fmt: skip

    def touch(self) -> None:
        """Note activity (called as frames are folded); refit the descan when it is due."""
        now = time.perf_counter()
        self._t_first = self._t_first or now
        self._t_last = now
        if self.descan is not None and self.descan.due(self.acc.frames_accepted):
            self.descan.refit(self.acc)

    def calibrate_now(self) -> None:
        """Calibrate from the frames held so far and fold them in. If the frames show no
        usable BF disk (e.g. beam blanked), the series is marked unusable (`calibration_error`)
        and its frames are only counted from then on: nothing is retried or kept."""
        if self.acc is not None or not self._pending:
            return
        # exactly the first N frames that arrived, however they were batched
        n, pending, self._pending = self.settings.calibration_frames, self._pending, []
        frames = np.concatenate([f for _, f in pending])[:n]
        indices = np.concatenate([np.arange(i, i + len(f)) for i, f in pending])[:n]
        at = detector.scan_position(indices % self.n_positions, self.scan_shape,
                                    self.info.scan_order)  # fmt: skip
        if self.calibrate_on(frames, np.column_stack(at)):
            for first, f in pending:
                self.acc.add(first, f)

    def calibrate_on(self, frames: np.ndarray, positions: np.ndarray | None = None) -> bool:
        """Calibrate on `frames` (N, Qx, Qy) (at scan `positions`, when known: a drifting disk
        is realigned) and size the accumulators, folding nothing (a
        coordinator calibrates on frames its workers fold). False, with `calibration_error`
        set and logged, when they show no usable BF disk."""
        self.touch()  # a coordinator's series starts here (its frames come as deltas)
        supplied, flagged = self.settings.mask, self.info.pixel_mask  # the user's, the detector's
        if flagged is not None:
            if supplied is None:
                supplied = flagged
            elif np.shape(supplied) == flagged.shape:
                supplied = np.asarray(supplied, bool) | flagged
            # else: calibrate refuses the user's mask, naming its shape
        try:
            cal = calib.calibrate(
                frames,
                mask_value=self.info.mask_value,
                supplied_mask=supplied,
                threshold=self.settings.bf_threshold,
                semiangle_mrad=self.info.semiangle_mrad,
                angular_sampling_mrad=self.info.angular_sampling_mrad,
                counts_per_electron=self.info.counts_per_electron,
                positions=positions,
            )
        except calib.CalibrationError as err:
            self.calibration_error = str(err)
            log.error("series %d: cannot calibrate on the first %d frames: %s",
                      self.info.series_id, len(frames), err)  # fmt: skip
            return False
        log.info("calibrated on %d frames: disk centre (%.2f, %.2f) px, radius %.2f px, %d BF "
                 "px, %d masked px", len(frames), *cal.center_px, cal.radius_px, cal.n_bf,
                 int(cal.mask.sum()))  # fmt: skip
        self._build(cal)
        return True

    def _build(self, cal: calib.Calibration) -> None:
        """Size the accumulators for a calibration (checked against the memory budget)."""
        s = self.settings
        self.raw_calibration = cal  # before `prepare`: what a worker builds the same layout from
        if cal.detector_shape != (det := tuple(self.info.detector_shape)):
            raise SeriesError(f"calibration for {cal.detector_shape}, frames are {det}")
        cal, layout = prepare(cal, s.bins, self.info.semiangle_mrad,
                              self.info.angular_sampling_mrad)  # fmt: skip
        integer = np.dtype(self.info.dtype).kind == "u"  # signed: a float32 stack
        n_pos, rows = int(np.prod(self.scan_shape)), s.row_block_rows
        state = AccumulatorState.layout(n_pos, cal.n_bf, layout.total_tiles,
                                        self.frame_limit or n_pos, integer)  # fmt: skip
        block = None if rows is None else Accumulators.block_rows(state, rows)  # a worker's
        if s.memory_budget_bytes is not None:  # the stack and tile sums are sized now
            why = check_info(self.info, s.memory_budget_bytes, n_bf=cal.n_bf,
                             n_tiles=layout.total_tiles, frame_limit=self.frame_limit,
                             upsample=s.pipeline.upsample,
                             angular_sampling_mrad=cal.angular_sampling_mrad,
                             calibration_frames=s.calibration_frames, block_rows=block)
            if why is not None:
                raise BudgetExceeded(f"series {self.info.series_id}, calibrated: {why}")
        self.calibration = cal
        axial = s.axial_radius_px if s.axial_radius_px is not None else 0.25 * cal.radius_px
        with memory_reserve.lent_for_build(memory_reserve.for_state(state, block)) as memory:
            acc = Accumulators(
                self.scan_shape, cal, layout, axial_radius_px=axial,
                serpentine=self.info.scan_order == "serpentine", frame_limit=self.frame_limit,
                integer_stack=integer, moments=s.compensate_descan, block=block,
                memory=memory,  # touched at start
            )  # fmt: skip
            descan = DescanCompensation.start(acc) if s.compensate_descan else None
            staging = Staging(acc, self.index_offset)
        self.acc, self.descan, self.staging = acc, descan, staging  # (all built, or none)
        if rows is None:  # (a worker solves nothing: no images, no alignment state)
            counts = cal.whole_counts or "counts_per_electron" in s.metadata  # (float values)
            self._pipeline = pl.Pipeline(pl.Acquisition.of(self.info, counts), cal, layout,
                                         s.pipeline)  # fmt: skip

    # ------------------------------------------------------------------ merge
    def partition(self) -> AccumulatorState:
        """An empty partition-local state of this series (what another receiver fills)."""
        if self.acc is None:
            raise SeriesError(f"series {self.info.series_id} is not calibrated yet")
        return self.acc.empty_state()

    def accumulate_into(self, state: AccumulatorState, batches: list) -> None:
        """The accumulate phase of another receiver: fold `batches` into its `state`."""
        if self.staging is None:
            raise SeriesError(f"series {self.info.series_id} is not calibrated yet")
        self._count_failures(self.staging.fold(batches, into=state))

    def merge(self, state: AccumulatorState, *, stack: bool = True) -> None:
        """Fold another receiver's partial state of this series in."""
        if self.acc is None:
            raise SeriesError(f"series {self.info.series_id} is not calibrated yet")
        self.touch()
        twice = self.acc.merge(state, stack=stack)
        if twice:
            log.warning("series %d: %d frame(s) reached two receivers (counted as duplicates)",
                        self.info.series_id, twice)  # fmt: skip

    def apply(self, delta: StateDelta) -> None:
        """Add a worker's `StateDelta` (checked first: SeriesError if it does not fit)."""
        if self.acc is None:
            raise SeriesError(f"series {self.info.series_id} is not calibrated yet")
        why = delta.check(self.acc.state)
        if why is not None:
            raise SeriesError(f"series {self.info.series_id}: a worker's delta: {why}")
        self.touch()
        if self.acc.state.apply(delta):
            log.warning("series %d: frame(s) reached two workers (counted as duplicates)",
                        self.info.series_id)  # fmt: skip

    # ------------------------------------------------------------------ solve
    @property
    def frames_received(self) -> int:
        return self.acc.frames_accepted if self.acc is not None else self._pending_frames

    @property
    def done(self) -> bool:
        """All frames of the series have been accumulated."""
        return self.acc is not None and self.acc.frames_accepted >= self.frame_limit

    @property
    def calibrated(self) -> bool:
        """Calibrated and sized: the accumulators exist."""
        return self.acc is not None

    def sizes(self) -> tuple[int, int] | None:
        """(BF pixels, tile sums) per position once calibrated (the budget counts), else None."""
        if self.acc is None:
            return None
        return self.acc.calibration.n_bf, self.acc.tiles_layout.total_tiles

    @property
    def solvable(self) -> bool:
        return self._pipeline is not None

    @property
    def pipeline(self) -> pl.Pipeline | None:
        """The series' tcBF pipeline (for inspection; `solve` is the way to run it)."""
        return self._pipeline

    def progress(self) -> tuple[int, int]:
        """(series id, complete scan rows so far): what the alignment cadence keys on."""
        rows = self.acc.frames_accepted // self.scan_shape[1] if self.acc is not None else 0
        return self.info.series_id, rows

    def inputs(self) -> pl.AlignmentInputs | None:
        """Copies for one solve (hold the ingest lock while calling, if live)."""
        if self.acc is None or self._pipeline is None:
            return None
        inputs = self._pipeline.inputs(self.acc.state, self.acc.frames_accepted)
        return inputs if self.descan is None else self.descan.inputs(inputs, self.acc)

    def solve(self, inputs: pl.AlignmentInputs | None = None,
              final: bool = False) -> pl.PipelineResult | None:  # fmt: skip
        """One alignment + reconstruction update: on `inputs` (taken under the ingest lock by
        a live caller) or, single-threaded (offline, or after ingest has ended), on everything
        accumulated; `final` calibrates on whatever arrived first and starts cold."""
        if inputs is None:
            if final:
                self.calibrate_now()
            inputs = self.inputs()
        if inputs is None or self._pipeline is None:
            return None
        return self._pipeline.update(inputs, final=final)

    # ------------------------------------------------------------------ read-out
    def result(self, final: bool = False, complete: bool = False) -> SeriesResult:
        """Copy out the current state (the caller holds the ingest lock if live).

        `final`: the series is over, so calibrate on whatever arrived if not done yet;
        `complete`: it ended normally (end message or all frames)."""
        if final:
            self.calibrate_now()
        acc = self.acc
        zeros = np.zeros(self.scan_shape)
        if acc is None:
            return SeriesResult(
                self.info, None, (), (), zeros, zeros, zeros, zeros.astype(np.uint32),
                self.frames_received, self.frame_limit, 0, 0, 0, complete,
            )  # fmt: skip
        lay, s = acc.tiles_layout, acc.state
        last = self._pipeline.last if self._pipeline is not None else None
        screen = last.screen if last is not None else None
        if final and screen is None and self._pipeline is not None:  # no model: still say why
            screen = self._pipeline.screen(self.inputs())
        excluded = screen.excluded.reshape(self.scan_shape).copy() if screen else None
        gain = self._pipeline.acquisition.counts_per_electron if self._pipeline else None
        return SeriesResult(  # (the gain a stated dose gave float intensities: `--dose`)
            info=replace(self.info, counts_per_electron=gain) if gain else self.info,
            calibration=self.calibration,
            bins=lay.bins,
            n_tiles=lay.n_tiles,
            **{
                name: _finite(acc.as_image(getattr(s, m.state)))
                for name, m in POSITION_MAPS.items()
                if m.state
            },  # fmt: skip
            frames_received=acc.frames_accepted,
            frames_expected=self.frame_limit,
            duplicates=acc.duplicates,
            out_of_order=acc.out_of_order,
            out_of_range=acc.out_of_range,
            complete=complete,
            elapsed_s=self._t_last - (self._t_first or self._t_last),
            tcbf=last,
            tile_members=lay.member_tile,
            axial_radius_px=acc.axial_radius_px,
            excluded=excluded,
            excluded_reasons=dict(screen.reasons) if screen else {},
            suspect=suspicions(acc.state.seen, self.frame_limit, acc.out_of_range, last, complete),
            alignment_note=self._pipeline.fallback.note() if self._pipeline else "",
        )
