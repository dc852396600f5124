"""What one series gives: a consistent read-out (copies) and the figures derived from it.

`SeriesResult` is what the engine hands to consumers (result file, view state, summary lines):
frozen copies, safe to pass between threads. The per-position maps are declared once in
`POSITION_MAPS` (source, file path, shown or not), so the series read-out, the result file and
the view state loop over them instead of re-listing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tcbf_live.detectors.base import SeriesInfo
from tcbf_live.stream.tcbf.calibration import Calibration
from tcbf_live.stream.tcbf.dose import beam_current_pA
from tcbf_live.stream.tcbf.pipeline import PipelineResult
from tcbf_live.stream.tcbf.slips import slip_suspected


@dataclass(frozen=True)
class PositionMap:
    """One per-position map of a result: where it comes from and where it goes."""

    state: str | None  # the AccumulatorState sum it is read from (None: derived from others)
    path: str | None  # its dataset in the result file (None: not written)
    view: bool  # drawn by the viewer (float32 in the view state)
    meaning: str


# every per-position map of a result, by SeriesResult attribute: the series read-out, the
# result file and the view state loop over this table
POSITION_MAPS = {
    "incoherent_bf": PositionMap("bf_sum", "bf/incoherent", True, "BF counts per position"),
    "axial_bf": PositionMap("axial_sum", "bf/axial", True, "axial virtual BF"),
    "total_counts": PositionMap("totals", None, False, "counts of all unmasked pixels"),
    "dark_field": PositionMap(None, "bf/dark_field", False, "counts outside the BF disk"),
    "hits": PositionMap("hits", "bf/hits", False, "frames accumulated per position (0: none)"),
    "dose_map": PositionMap(None, "dose/map", True, "e/A^2 per position"),
}


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
    tcbf: PipelineResult | None = None  # latest alignment/reconstruction (final when complete)
    tile_members: tuple[np.ndarray, ...] = ()  # per bin level: tile of each BF pixel
    axial_radius_px: float = 0.0
    # frames screened out (stream.screening): treated as missing, still counted as received
    excluded: np.ndarray | None = None  # (rows, cols) bool
    excluded_reasons: dict[str, int] = field(default_factory=dict)
    # why this result must not be presented as a good one (missed trigger, sheared lines)
    suspect: tuple[str, ...] = ()
    detector_dropped: int | None = None  # images the detector says it dropped (SIMPLON)
    # why the alignment is what it is where the tiles could not give it (the global search's
    # outcome, `tcbf.global_alignment`; with or without a model); "" when the tiles gave it
    alignment_note: str = ""

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
            text += f"; {t.resolution_text()}"
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


def suspicions(seen: np.ndarray, frame_limit: int, out_of_range: int,
               last: PipelineResult | None, complete: bool) -> tuple[str, ...]:  # fmt: skip
    """Reasons not to trust the image: frames missing from the end of a series that ended
    normally with no other gap (the detector took fewer frames than triggers: every frame
    after a missed trigger sits one position early), and a slip of the frames by one
    position seen in the parallax of the tile images (`slips.slip_lines`)."""
    out = []
    if complete:
        short = slip_suspected(seen, frame_limit)
        if short:
            out.append(
                f"missed trigger suspected: the series ended {short} frame(s) short with "
                "no gap before (missed triggers, or a scan stopped early); after a missed "
                "trigger every later frame sits one position early"
            )
        if out_of_range:
            out.append(
                f"{out_of_range} frame(s) beyond the expected count: extra "
                "triggers? earlier frames may sit one position late"
            )
    for line, step in last.slips if last is not None else ():
        kind = "missed trigger" if step < 0 else "extra frame"
        out.append(f"frames land one position off from scan line {line} on ({kind}?): "
                   "the image is sheared there")  # fmt: skip
    return tuple(out)
