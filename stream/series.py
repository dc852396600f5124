"""One series from start to result: metadata, calibration, accumulation, read-out.

No sockets and no threads here: the live engine and offline tools feed `SeriesProcessor` the
same `SeriesInfo` and `FrameBatch` events, so both share one code path.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from tcbf_live.detectors.base import CompressedFrame, DecodeError, FrameBatch, SeriesInfo
from tcbf_live.detectors.compression import native_bslz4
from tcbf_live.stream.budget import BudgetExceeded, check_info
from tcbf_live.stream.tcbf.accumulators import Accumulators, TileLevels, default_bins
from tcbf_live.stream.tcbf.calibration import (
    DEFAULT_BF_THRESHOLD,
    Calibration,
    CalibrationError,
    calibrate,
)
from tcbf_live.stream.tcbf.dose import beam_current_pA
from tcbf_live.stream.tcbf.pipeline import AlignmentInputs, TcbfProcessor, TcbfResult, TcbfSettings
from tcbf_live.stream.tcbf.screening import slip_suspected

log = logging.getLogger("tcbf.series")

STAGE_SMALL = 4  # messages with fewer frames than this are gathered ...
STAGE_FRAMES = 32  # ... into one kernel call of up to this many frames (<= 1 MiB, see below).
# Larger frames are not staged: copying one costs more than a kernel call (~3 us). Measured on
# the decoder path of benchmarks/decode_speed.py: 512x512 overhead 128 % -> 106-115 %.
STAGE_MAX_FRAME_BYTES = 32 << 10


class SeriesError(ValueError):
    """A series that cannot be processed (e.g. unknown scan shape)."""


@dataclass(frozen=True)
class ProcessingSettings:
    """How to turn frames into accumulators; `None` means 'from the stream / the data'."""

    scan_shape: tuple[int, int] | None = None
    energy_eV: float | None = None
    step_A: float | None = None
    semiangle_mrad: float | None = None
    angular_sampling_mrad: float | None = None
    counts_per_electron: float | None = None
    calibration_frames: int = 64
    bf_threshold: float = DEFAULT_BF_THRESHOLD
    calibration: Calibration | None = None  # fixed calibration (from a file)
    mask: np.ndarray | None = field(default=None, compare=False)  # extra excluded pixels
    bins: tuple[int, ...] | None = None  # alignment bin levels (detector px)
    axial_radius_px: float | None = None  # None: 25 % of the BF radius
    repeat_scans: str = "accumulate"  # frames beyond one pass: "accumulate" | "new-series"
    tcbf: TcbfSettings = field(default_factory=TcbfSettings)
    # bytes the series may allocate (stream.budget); None: not checked. Checked again with
    # the calibrated BF pixel count before the stack is allocated (BudgetExceeded)
    memory_budget_bytes: int | None = None

    def resolve(self, info: SeriesInfo) -> SeriesInfo:
        """Stream metadata with explicit settings taking precedence."""
        return info.with_overrides(
            scan_shape=self.scan_shape,
            energy_eV=self.energy_eV,
            step_A=self.step_A,
            semiangle_mrad=self.semiangle_mrad,
            angular_sampling_mrad=self.angular_sampling_mrad,
            counts_per_electron=self.counts_per_electron,
        )


@dataclass(frozen=True)
class SeriesResult:
    """A consistent read-out of one series (copies; safe to hand to other threads)."""

    info: SeriesInfo
    calibration: Calibration | None
    bins: tuple[int, ...]
    n_tiles: tuple[int, ...]
    incoherent_bf: np.ndarray  # (rows, cols) BF counts per position
    axial_bf: np.ndarray  # (rows, cols)
    total_counts: np.ndarray  # (rows, cols), masked pixels excluded
    hits: np.ndarray  # (rows, cols) frames accumulated per position (0 = missing)
    frames_received: int
    frames_expected: int
    duplicates: int
    out_of_order: int
    out_of_range: int
    complete: bool
    elapsed_s: float = 0.0  # first to last frame received
    tcbf: TcbfResult | None = None  # latest alignment/reconstruction (final when complete)
    tile_members: tuple[np.ndarray, ...] = ()  # per bin level: tile of each BF pixel
    axial_radius_px: float = 0.0
    # frames screened out (stream.screening): treated as missing, still counted as received
    excluded: np.ndarray | None = None  # (rows, cols) bool
    excluded_reasons: dict[str, int] = field(default_factory=dict)
    # why this result must not be presented as a good one (missed trigger, sheared lines)
    suspect: tuple[str, ...] = ()
    detector_dropped: int | None = None  # images the detector says it dropped (SIMPLON)

    @property
    def pixels_excluded(self) -> int:
        """BF pixels that turned hot or dead during the scan, left out of the alignment and
        the image (persistent ones from the start are the calibration's `hot_pixels` ...)."""
        return self.tcbf.pixels_excluded if self.tcbf is not None else 0

    @property
    def frames_excluded(self) -> int:
        return int(self.excluded.sum()) if self.excluded is not None else 0

    def screening_summary(self) -> str:
        """One line: excluded frames and pixels, and any reason for suspicion."""
        cal = self.calibration
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.excluded_reasons.items()))
        text = (f"screening: {self.frames_excluded} frame(s) excluded{f' ({why})' if why else ''}"
                f"; {cal.hot_pixels if cal else 0} hot and {cal.dead_pixels if cal else 0} dead "
                "pixel(s) masked")  # fmt: skip
        if self.pixels_excluded:
            text += f", {self.pixels_excluded} more left out mid-scan"
        if self.detector_dropped is not None:
            lost = self.frames_missing - self.detector_dropped
            text += (f"; the detector dropped {self.detector_dropped} image(s), "
                     f"{self.frames_missing} missing here"
                     f"{f' ({lost} lost on the way)' if lost > 0 else ''}")  # fmt: skip
        return text + "".join(f"; SUSPECT: {s}" for s in self.suspect)

    @property
    def frames_per_s(self) -> float:
        return self.frames_received / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def frames_missing(self) -> int:
        return max(self.frames_expected - self.frames_received, 0)

    @property
    def dark_field(self) -> np.ndarray:
        return self.total_counts - self.incoherent_bf

    @property
    def electrons(self) -> np.ndarray:
        return self.total_counts / self.info.counts_per_electron

    @property
    def kept(self) -> np.ndarray:
        """(rows, cols) bool: positions acquired and not excluded by screening."""
        kept = self.hits > 0
        return kept & ~self.excluded if self.excluded is not None else kept

    @property
    def frames_kept(self) -> int:
        return int(self.hits[self.kept].sum())

    @property
    def electrons_total(self) -> float:
        """Electrons in the frames kept (an excluded frame's counts are not dose: a blank
        frame had none, a hot pixel's are not electrons)."""
        return float(self.electrons[self.kept].sum())

    @property
    def dose_map(self) -> np.ndarray:
        """e/A^2 per position (NaN without a step)."""
        step = self.info.step_A or float("nan")
        return self.electrons / step**2

    @property
    def dose_e_per_A2(self) -> float:
        """Mean dose over the positions acquired (and kept) so far."""
        kept = int(np.count_nonzero(self.kept))
        step = self.info.step_A or float("nan")
        return self.electrons_total / kept / step**2 if kept else 0.0

    @property
    def electrons_per_frame(self) -> float:
        frames = self.frames_kept
        return self.electrons_total / frames if frames else 0.0

    @property
    def projected_dose_e_per_A2(self) -> float:
        """Mean dose per position when every expected frame has arrived (repeat passes add),
        at the electrons per frame measured so far."""
        if not self.frames_kept:
            return 0.0
        step = self.info.step_A or float("nan")
        n_pos = self.hits.size
        return self.electrons_per_frame * self.frames_expected / n_pos / step**2

    @property
    def beam_current_pA(self) -> float | None:
        """From the mean electrons per frame and the announced dwell time (None if unknown)."""
        if not self.frames_kept:
            return None
        return beam_current_pA(self.electrons_per_frame, self.info.dwell_s)

    @property
    def bf_fraction(self) -> np.ndarray:
        """BF counts / all counts per position (thickness proxy: ln(1/f_BF) ~ t / lambda)."""
        out = np.zeros(self.total_counts.shape)
        np.divide(self.incoherent_bf, self.total_counts, out=out, where=self.total_counts > 0)
        return out

    def dose_summary(self) -> str:
        """The one-line dose report of `run` / `reconstruct`."""
        current = self.beam_current_pA
        text = (f"dose {self.dose_e_per_A2:.4g} e/A^2 per position ({self.electrons_total:.4g} e"
                f"{f', {current:.3g} pA' if current is not None else ''}); projected for the "
                f"full scan {self.projected_dose_e_per_A2:.4g} e/A^2")  # fmt: skip
        t = self.tcbf
        if t is not None and t.resolution_A is not None:
            bound = "better than " if t.resolution_limited else ""
            text += (f"; resolution {bound}{t.resolution_A:.3g} A (FRC 0.143), "
                     f"{t.resolution_half_bit_A:.3g} A (half-bit)")  # fmt: skip
        if t is not None and t.trust:
            trusted = ",".join(str(x.bin_px) for x in t.trust if x.trusted) or "none"
            text += f"; trusted bins {trusted}"
        return text

    def summary(self) -> str:

        return (
            f"series {self.info.series_id}: {self.frames_received}/{self.frames_expected} frames, "
            f"{self.frames_missing} missing, {self.duplicates} duplicate, "
            f"{self.out_of_order} out of order, {self.out_of_range} out of range, "
            f"{self.frames_per_s:.0f} frames/s; "
            f"dose {self.dose_e_per_A2:.4g} e/A^2 ({self.electrons_total:.4g} e)"
        )


def _finite(a: np.ndarray) -> np.ndarray:
    """Non-finite values (a float stream's NaN/inf frames, excluded by screening) read as 0."""
    return np.where(np.isfinite(a), a, 0.0) if a.dtype.kind == "f" else a


class SeriesProcessor:
    """Calibrates on the first frames, then accumulates every frame of one series."""

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
        self.calibration: Calibration | None = settings.calibration
        self.acc: Accumulators | None = None
        self.calibration_error: str | None = None
        self.decode_failures = 0  # frames skipped because their pixels did not decode

        self.tcbf: TcbfProcessor | None = None
        self._pending: list[tuple[int, np.ndarray]] = []
        self._stage: np.ndarray | None = None  # staging buffer for small messages
        self._stage_index = np.empty(0, np.int64)
        self._t_first: float | None = None
        self._t_last = 0.0
        self._pending_frames = 0
        if self.calibration is not None:
            cal, flagged = self.calibration, self.info.pixel_mask
            if flagged is not None and flagged.shape == cal.detector_shape:
                cal = cal.excluding(flagged)  # the detector's mask applies to a given one too
            self._build(cal)

    # ------------------------------------------------------------------ ingest
    def add(self, batch: FrameBatch | CompressedFrame) -> None:
        """Fold one batch in (indices relative to the series start)."""
        if isinstance(batch, CompressedFrame):
            if self.acc is not None:
                self._flush_compressed([batch])
                return
            try:  # calibration needs the pixels
                batch = batch.decoded()
            except DecodeError as err:
                self._failed(1, str(err))
                return
        first = batch.first - self.index_offset
        self._touch()
        if self.acc is not None:
            self.acc.add(first, batch.frames)
            return
        if self.calibration_error is not None:  # unusable series: count, do not keep
            self._pending_frames += len(batch.frames)
            return
        # not calibrated yet: keep the frames (bounded by calibration_frames + one batch)
        self._pending.append((first, batch.frames))
        self._pending_frames += len(batch.frames)
        if self._pending_frames >= self.settings.calibration_frames:
            self.calibrate_now()

    def add_many(self, batches: list[FrameBatch | CompressedFrame]) -> None:
        """Fold several batches in order. Runs of small ones (< STAGE_SMALL frames) are copied
        into a reusable staging buffer and share one kernel call: for 1-frame messages the
        per-call overhead would otherwise dominate. Runs of compressed frames share one kernel
        call that decompresses each frame in cache (no staging copy)."""
        if self.acc is None:
            for b in batches:
                self.add(b)
            return
        frame_bytes = math.prod(self.info.detector_shape) * np.dtype(self.info.dtype).itemsize
        staged = frame_bytes <= STAGE_MAX_FRAME_BYTES
        small: list[FrameBatch] = []
        packed: list[CompressedFrame] = []
        count = 0
        for b in batches:
            if isinstance(b, CompressedFrame):
                self._flush_stage(small, count)
                small, count = [], 0
                packed.append(b)
                if len(packed) >= STAGE_FRAMES:
                    self._flush_compressed(packed)
                    packed = []
                continue
            self._flush_compressed(packed)
            packed = []
            m = len(b.frames)
            if m >= STAGE_SMALL or not staged:
                self._flush_stage(small, count)
                small, count = [], 0
                self.add(b)
                continue
            small.append(b)
            count += m
            if count >= STAGE_FRAMES:
                self._flush_stage(small, count)
                small, count = [], 0
        self._flush_stage(small, count)
        self._flush_compressed(packed)

    def _flush_stage(self, small: list[FrameBatch], count: int) -> None:
        """Copy a run of small batches into the staging buffer with one concatenate (no Python
        per frame) and accumulate them in one kernel call."""
        if not small:
            return
        if self._stage is None:
            self._stage = np.empty((STAGE_FRAMES + STAGE_SMALL, *self.info.detector_shape),
                                   self.info.dtype)  # fmt: skip
            self._stage_index = np.empty(self._stage.shape[0], np.int64)
        self._touch()
        frames = self._stage[:count]
        index = self._stage_index[:count]
        np.concatenate([b.frames for b in small], axis=0, out=frames)
        if count == len(small):  # one frame per message (DECTRIS, Merlin)
            index[:] = np.fromiter((b.first for b in small), np.int64, count)
        else:
            index[:] = np.concatenate([np.arange(b.first, b.first + len(b.frames))
                                       for b in small])  # fmt: skip
        index -= self.index_offset
        self.acc.add_indexed(index, frames)

    def _flush_compressed(self, packed: list[CompressedFrame]) -> None:
        """One kernel call for a run of bslz4 frames, decompressed inside it (or, where the
        library offers no in-kernel entry point, decoded here first)."""
        if not packed:
            return
        if not native_bslz4():
            for c in packed:
                try:
                    b = c.decoded()
                except DecodeError as err:
                    self._failed(1, str(err))
                    continue
                self.acc.add(b.first - self.index_offset, b.frames)
            return
        self._touch()
        index = np.fromiter((c.first for c in packed), np.int64, len(packed))
        index -= self.index_offset
        size = np.dtype(self.info.dtype).itemsize
        failed = self.acc.add_compressed([c.blob for c in packed], index, size, self.info.dtype)
        if failed:
            self._failed(failed, "bslz4 blob does not decompress to one frame")

    def _failed(self, count: int, why: str) -> None:
        """Frames whose pixels could not be decoded: counted (`decode_failures`) and logged;
        the receiver reports them with its other rejections."""
        self.decode_failures += count
        if self.decode_failures <= 10:
            log.warning("series %d: %d frame(s) skipped: %s", self.info.series_id, count, why)

    def _touch(self) -> None:
        now = time.perf_counter()
        self._t_first = self._t_first or now
        self._t_last = now

    def calibrate_now(self) -> None:
        """Calibrate from the frames held so far and fold them in. If the frames show no
        usable BF disk (e.g. beam blanked), the series is marked unusable (`calibration_error`)
        and its frames are only counted from then on: nothing is retried or kept."""
        if self.acc is not None or not self._pending:
            return
        # exactly the first N frames that arrived, however they were batched
        frames = np.concatenate([f for _, f in self._pending])[: self.settings.calibration_frames]
        supplied, flagged = self.settings.mask, self.info.pixel_mask  # the user's, the detector's
        if flagged is not None:
            if supplied is None:
                supplied = flagged
            elif np.shape(supplied) == flagged.shape:
                supplied = np.asarray(supplied, bool) | flagged
            # else: calibrate refuses the user's mask, naming its shape

        try:
            cal = calibrate(
                frames,
                mask_value=self.info.mask_value,
                supplied_mask=supplied,
                threshold=self.settings.bf_threshold,
                semiangle_mrad=self.info.semiangle_mrad,
                angular_sampling_mrad=self.info.angular_sampling_mrad,
                counts_per_electron=self.info.counts_per_electron,
            )
        except CalibrationError as err:
            self.calibration_error = str(err)
            self._pending = []
            log.error("series %d: cannot calibrate on the first %d frames: %s",
                      self.info.series_id, len(frames), err)  # fmt: skip
            return
        log.info(
            "calibrated on %d frames: disk centre (%.2f, %.2f) px, radius %.2f px, %d BF px, "
            "%d masked px",
            len(frames), *cal.center_px, cal.radius_px, cal.n_bf, int(cal.mask.sum()),
        )  # fmt: skip
        self._build(cal)
        pending, self._pending = self._pending, []
        for first, f in pending:
            self.acc.add(first, f)

    def _build(self, cal: Calibration) -> None:
        s = self.settings
        if cal.detector_shape != tuple(self.info.detector_shape):
            raise SeriesError(f"calibration for {cal.detector_shape}, frames are "
                              f"{self.info.detector_shape}")  # fmt: skip
        bins = s.bins or default_bins(cal.radius_px)
        anchor = (round(cal.center_px[0]), round(cal.center_px[1]))
        layout = TileLevels.build(cal.bf_pixels, anchor, bins)
        # BF pixels in tile-contiguous order from here on (stack columns, result file); the
        # angular sampling: the stream's / the flags', else the calibration's, else the
        # semi-angle over the measured disk radius (one value for aberrations and the file)
        sampling = self.info.angular_sampling_mrad or cal.angular_sampling_mrad
        if not sampling and self.info.semiangle_mrad:
            sampling = self.info.semiangle_mrad / cal.radius_px
        if s.memory_budget_bytes is not None:  # the stack and tile sums are sized now
            why = check_info(self.info, s.memory_budget_bytes, n_bf=cal.n_bf,
                             n_tiles=layout.total_tiles, frame_limit=self.frame_limit,
                             upsample=s.tcbf.upsample, angular_sampling_mrad=sampling,
                             calibration_frames=s.calibration_frames)  # fmt: skip
            if why is not None:
                raise BudgetExceeded(f"series {self.info.series_id}, calibrated: {why}")
        cal = replace(cal, bf_pixels=cal.bf_pixels[layout.order], angular_sampling_mrad=sampling)
        self.calibration = cal
        axial = s.axial_radius_px if s.axial_radius_px is not None else 0.25 * cal.radius_px
        self.acc = Accumulators(
            self.scan_shape,
            cal,
            layout,
            axial_radius_px=axial,
            serpentine=self.info.scan_order == "serpentine",
            frame_limit=self.frame_limit,
            integer_stack=np.dtype(self.info.dtype).kind == "u",  # signed: float32 stack
        )
        self.tcbf = TcbfProcessor(self.info, cal, layout, s.tcbf)

    # ------------------------------------------------------------------ read-out
    @property
    def frames_received(self) -> int:
        return self.acc.frames_accepted if self.acc is not None else self._pending_frames

    @property
    def done(self) -> bool:
        """All frames of the series have been accumulated."""
        return self.acc is not None and self.acc.frames_accepted >= self.frame_limit

    def alignment_inputs(self) -> AlignmentInputs | None:
        """Copies for one alignment update (hold the ingest lock while calling, if live)."""
        acc = self.acc
        if acc is None or self.tcbf is None:
            return None
        hits = acc.hits.copy()
        window = self.tcbf.window(hits.reshape(self.scan_shape) > 0)
        (r0, r1), (c0, c1) = window
        tiles = acc.tiles.reshape(*self.scan_shape, -1)[r0:r1, c0:c1].copy()  # the window only
        totals = acc.totals.copy()
        electrons = float(totals[np.isfinite(totals)].sum()) / self.info.counts_per_electron
        return AlignmentInputs(hits, electrons, window, tiles, acc.stack, acc.frames_accepted,
                               totals, acc.bf_sum.copy())  # fmt: skip

    def update_tcbf(self, final: bool = False) -> TcbfResult | None:
        """One alignment + reconstruction update on everything accumulated (single-threaded
        use: offline, or after ingest has ended)."""
        if final:
            self.calibrate_now()
        inputs = self.alignment_inputs()
        if inputs is None or self.tcbf is None:
            return None
        return self.tcbf.update(inputs, final=final)

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
        lay = acc.tiles_layout
        last = self.tcbf.last if self.tcbf is not None else None
        screen = last.screen if last is not None else None
        if final and screen is None and self.tcbf is not None:  # no model: still say why
            screen = self.tcbf.screen(self.alignment_inputs())
        excluded = screen.excluded.reshape(self.scan_shape).copy() if screen else None
        return SeriesResult(
            info=self.info,
            calibration=self.calibration,
            bins=lay.bins,
            n_tiles=lay.n_tiles,
            incoherent_bf=_finite(acc.as_image(acc.bf_sum)),
            axial_bf=_finite(acc.as_image(acc.axial_sum)),
            total_counts=_finite(acc.as_image(acc.totals)),
            hits=acc.as_image(acc.hits),
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
            suspect=self.suspicions(last, complete),
        )

    def suspicions(self, last: TcbfResult | None, complete: bool) -> tuple[str, ...]:
        """Reasons not to trust the image: frames missing from the end of a series that ended
        normally with no other gap (the detector took fewer frames than triggers: every frame
        after a missed trigger sits one position early), and a slip of the frames by one
        position seen in the parallax of the tile images (`screening.slip_lines`)."""
        out = []
        if complete and self.acc is not None:
            short = slip_suspected(self.acc.seen, self.frame_limit)
            if short:
                out.append(
                    f"missed trigger suspected: the series ended {short} frame(s) short with "
                    "no gap before (missed triggers, or a scan stopped early); after a missed "
                    "trigger every later frame sits one position early"
                )
            if self.acc.out_of_range:
                out.append(
                    f"{self.acc.out_of_range} frame(s) beyond the expected count: extra "
                    "triggers? earlier frames may sit one position late"
                )
        for line, step in last.slips if last is not None else ():
            kind = "missed trigger" if step < 0 else "extra frame"
            out.append(f"frames land one position off from scan line {line} on ({kind}?): "
                       "the image is sheared there")  # fmt: skip
        return tuple(out)
