"""Descan compensation: read every frame's BF pixels where the BF disk is at that position.

Pure numerics. The scan coils' imperfect descan moves the BF disk over the detector as the beam
scans; a fixed set of BF pixels then sees a tilt that changes across the scan, every BF-pixel
image is distorted, and the alignment, the fit and the image suffer (a drift of half a disk
radius across the tutorial scan: the image's correlation with the true phase falls from 0.55
to 0.0 and the defocus is 5 % off). Compensation (py4DSTEM and pypty correct the same drift
offline) reads the BF pixels of each position at the disk's whole-pixel displacement there, in
the accumulate kernel, so the stack holds fixed tilts:

- *Measured*: the frame's centre of mass over all unmasked pixels (its first moments, folded in
  by the kernel, `kernels.frame_moments`). The whole pattern moves with the disk, so the centre
  of mass moves one for one (unlike moments over a fixed support, `descan.py`, which move by a
  fraction and need a gain); the sample's own deflection (the DPC signal) scatters it position
  by position and averages out in the model.
- *Modelled*: a polynomial of the scan position, constant/plane/quadratic by the data
  (`descan.fit_descan`, gain 1), referred to the centre of mass of the calibration's mean
  pattern (the disk where the calibration saw it). While less than half the scan is acquired
  only a plane is extrapolated to the positions still to come.
- *Live*: the first model comes from the calibration frames themselves (`calibration_drift`,
  which also keeps a drifting disk from smearing the calibration's mean pattern); the model is
  refitted as the scan grows (`DescanCompensation.refit`) and applied to the positions not yet
  acquired. Whole pixels keep counts whole (the shot-noise model holds); the remaining error is
  within half a detector pixel, the detector's own sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from tcbf_live.stream.tcbf.descan import DescanFit, fit_descan

if TYPE_CHECKING:
    from tcbf_live.stream.tcbf.accumulators import Accumulators, AccumulatorState
    from tcbf_live.stream.tcbf.updates import AlignmentInputs

MIN_DRIFT_PX = 1.0  # calibration frames are realigned when the disk moves more than this ...
DRIFT_SIGMAS = 4.0  # ... and the drift is this many standard errors from none


def centres_of_mass(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, 2) centre of mass (detector px, row/col) of each frame (N, Qx, Qy) over the pixels
    `mask` does not exclude; NaN for a frame without counts."""
    f = frames.astype(np.float64, copy=False)
    w = np.where(mask | ~np.isfinite(f), 0.0, f)  # (a non-finite pixel: left out)
    total = w.sum(axis=(1, 2))
    rows = w.sum(axis=2) @ np.arange(frames.shape[1])
    cols = w.sum(axis=1) @ np.arange(frames.shape[2])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total[:, None] > 0, np.column_stack([rows, cols]) / total[:, None], np.nan)


def pattern_centre(pattern: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(2,) centre of mass of one pattern (the calibration's mean) over its unmasked pixels."""
    return centres_of_mass(pattern[None], mask)[0]


@dataclass(frozen=True)
class Drift:
    """The disk's drift over the calibration frames: displacement (detector px, row/col) =
    per_step_px @ (scan position - reference_pos), a plane in the scan position."""

    per_step_px: np.ndarray  # (2, 2): d centre (row, col) / d scan (row, col)
    reference_pos: tuple[float, float]  # scan (row, col) the calibration's disk is at
    errors_px: np.ndarray  # (2, 2) standard errors of per_step_px

    def displacement_px(self, positions: np.ndarray) -> np.ndarray:
        """(n, 2) displacement at scan positions (n, 2) (row, col)."""
        return (np.asarray(positions, np.float64) - self.reference_pos) @ self.per_step_px.T


def calibration_drift(frames: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> Drift | None:
    """The plane drift of the disk over calibration frames at scan `positions` ((N, 2) row,
    col), from their centres of mass; None when it is not significant (under MIN_DRIFT_PX over
    these frames, or within DRIFT_SIGMAS of none) or cannot be measured (fewer than 8 frames)."""
    com = centres_of_mass(frames, mask)
    good = np.all(np.isfinite(com), axis=1)
    pos = np.asarray(positions, np.float64)[good]
    if pos.shape[0] < 8:
        return None
    ref = pos.mean(axis=0)
    varies = [k for k in (0, 1) if np.ptp(pos[:, k]) > 0]  # one row: no row term
    if not varies:
        return None
    a = np.column_stack([np.ones(len(pos)), *(pos[:, k] - ref[k] for k in varies)])
    coef, *_ = np.linalg.lstsq(a, com[good], rcond=None)
    resid = com[good] - a @ coef
    dof = max(len(pos) - a.shape[1], 1)
    cov = np.linalg.pinv(a.T @ a)
    err = np.sqrt(np.outer(np.diag(cov), (resid**2).sum(axis=0) / dof))[1:]  # (terms, 2)
    per_step, errors = np.zeros((2, 2)), np.zeros((2, 2))
    for i, k in enumerate(varies):
        per_step[:, k], errors[:, k] = coef[1 + i], err[i]
    drift = Drift(per_step, (float(ref[0]), float(ref[1])), errors)
    moved = drift.displacement_px(pos)
    spread = float(np.hypot(*np.ptp(moved, axis=0)))
    significant = np.any(np.abs(per_step) > DRIFT_SIGMAS * np.maximum(errors, 1e-12))
    return drift if spread >= MIN_DRIFT_PX and significant else None


def realigned(frames: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Frames (N, Qx, Qy) moved by minus their whole-pixel `shifts_px` ((N, 2)), zero-filled:
    the disks of a drifting calibration stacked on one another."""
    out = np.zeros_like(frames)
    h, w = frames.shape[1:]
    for n, (dr, dc) in enumerate(np.rint(shifts_px).astype(int)):
        src_r, dst_r = slice(max(dr, 0), h + min(dr, 0)), slice(max(-dr, 0), h + min(-dr, 0))
        src_c, dst_c = slice(max(dc, 0), w + min(dc, 0)), slice(max(-dc, 0), w + min(-dc, 0))
        out[n, dst_r, dst_c] = frames[n, src_r, src_c]
    return out


def steady(frames: np.ndarray, mask: np.ndarray,
           positions: np.ndarray) -> tuple[np.ndarray, Drift] | None:  # fmt: skip
    """Calibration frames realigned onto one disk and their drift (None: no significant
    drift, use them as they are)."""
    drift = calibration_drift(frames, mask, positions)
    return None if drift is None else (realigned(frames, drift.displacement_px(positions)), drift)


class DescanCompensation:
    """The live descan model of one series and where each position's BF pixels are read.

    `start` applies the calibration's drift to every position; as frames accumulate, `due`
    says when to refit (the acquired positions grew by half, or by a scan row, since the last
    fit) and `refit` applies the model of the centres so far to the positions still to come
    (a position keeps the shift it was read at). `inputs` hands an update the centres and the
    read shifts."""

    GROWTH = 1.5

    def __init__(self, scan_shape: tuple[int, int], reference_px: np.ndarray):
        self.scan_shape = scan_shape
        self.reference_px = np.asarray(reference_px, np.float64)
        self.next_frames = 0
        self.refits = 0

    @classmethod
    def start(cls, acc: Accumulators) -> DescanCompensation:
        """Compensation for `acc`'s series, its read shifts set from the calibration's drift.
        The reference is the centre of mass of the calibration's mean pattern (the disk where
        the calibration saw it; a calibration from a file without one: its disk centre)."""
        cal = acc.calibration
        ref = pattern_centre(cal.mean_pattern, cal.mask)
        comp = cls(acc.scan_shape, ref if np.all(np.isfinite(ref)) else cal.center_px)
        if cal.drift is not None:
            grid = np.argwhere(np.ones(acc.scan_shape, bool))
            acc.set_read_shift(cal.drift.displacement_px(grid), np.ones(len(grid), bool))
        return comp

    def centres(self, state: AccumulatorState) -> np.ndarray:
        """(n_pos, 2) disk displacement per position (centre of mass minus the calibration's),
        NaN where nothing was acquired."""
        totals = state.totals
        good = (state.hits > 0) & (totals > 0) & np.isfinite(totals)
        out = np.full((len(totals), 2), np.nan)
        out[good] = state.moments[good] / totals[good, None] - self.reference_px
        return out

    def due(self, frames: int) -> bool:
        return frames >= self.next_frames

    def refit(self, acc: Accumulators) -> DescanFit | None:
        """Fit the centres so far and read the positions not yet acquired at the model (None,
        nothing changed: too few positions yet). Until half the scan is in, a plane at most
        is extrapolated."""
        hits = acc.state.hits
        acquired = int(np.count_nonzero(hits))
        self.next_frames = max(int(acquired * self.GROWTH), acquired + self.scan_shape[1])
        n_pos = self.scan_shape[0] * self.scan_shape[1]
        fit = fit_descan(self.centres(acc.state), self.scan_shape, 1.0,
                         max_order=2 if 2 * acquired >= n_pos else 1)  # fmt: skip
        if fit is not None:
            acc.set_read_shift(fit.model_px(), hits == 0)
            self.refits += 1
        return fit

    def inputs(self, inputs: AlignmentInputs, acc: Accumulators) -> AlignmentInputs:
        """`inputs` with the centres and the read shifts (copies; under the ingest lock)."""
        return replace(inputs, descan_centres=self.centres(acc.state),
                       read_shift_px=acc.read_shift_px.copy(),
                       read_clipped=int(acc.clipped.sum()))  # fmt: skip
