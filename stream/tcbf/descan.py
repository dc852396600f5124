"""Descan: the BF disk's drift over the scan, measured from the per-BF-pixel stack (without
compensation; with it, from each frame's centre of mass: `descan_compensation.py`).

Pure numerics. Centre per position: the first moment of that position's BF-pixel counts over
the calibrated disk, relative to the calibrated centre. Over a fixed support a displaced disk's
moment moves by only a fraction of the displacement (a uniform disk: a half, the centroid of
the lens where the two disks overlap), so the moments are divided by a gain measured on the
calibration's own mean pattern displaced by a known amount (`moment_gain`): it holds for this
aperture's edge profile. The sample's contrast scatters the centres position by position;
the model is fitted over all of them.

Model: the centre as a polynomial of the scan position (row, col) of order 0 (constant), 1
(plane) or 2 (quadratic), fitted by least squares, the order chosen by the Bayesian
information criterion (the data decide; a higher order must pay for its terms). Every
coefficient comes with its standard error from the residual scatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from tcbf_live.stream.tcbf.kernels import stack_moments

GAIN_SHIFT_PX = 0.5  # the known displacement `moment_gain` applies to the mean pattern
ORDERS = (0, 1, 2)
TERMS = ("1", "row", "col", "row^2", "row col", "col^2")  # scan position in steps


@dataclass(frozen=True)
class DescanFit:
    order: int  # 0 constant, 1 plane, 2 quadratic (chosen by BIC)
    coefficients_px: np.ndarray  # (terms, 2) detector px (row, col) per term of TERMS
    errors_px: np.ndarray  # (terms, 2) standard errors
    residual_px: float  # rms scatter of the per-position centres about the model
    centres_px: np.ndarray  # (rows, cols, 2) measured centre per position (NaN: none)
    gain: float  # moment / displacement on the calibration's pattern (1: centres of mass)
    # compensated in accumulation: where each position's BF pixels were read (rows, cols, 2)
    # whole detector px, and how many positions a shift off the detector clipped
    read_shift_px: np.ndarray | None = None
    clipped: int = 0

    @property
    def compensated(self) -> bool:
        return self.read_shift_px is not None

    @property
    def model(self) -> str:
        return ("constant", "plane", "quadratic")[self.order]

    @property
    def per_step_px(self) -> np.ndarray:
        """(2, 2): d centre / d (row, col) at the scan origin (detector px per scan step); zeros
        for a constant model."""
        c = np.zeros((2, 2))
        if self.order >= 1:
            c[:, 0], c[:, 1] = self.coefficients_px[1], self.coefficients_px[2]
        return c

    def model_px(self) -> np.ndarray:
        """(n_pos, 2) the modelled centre at every scan position (raster order)."""
        rows, cols = self.centres_px.shape[:2]
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        return _design(r.ravel(), c.ravel(), self.order) @ self.coefficients_px

    def drift_px(self) -> float:
        """Largest displacement of the modelled centre from its value at the scan origin."""
        model = self.model_px()
        return float(np.hypot(*(model - model[0]).T).max())


def disk_moments(stack: np.ndarray, k_px: np.ndarray, exposure: np.ndarray,
                 rows: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(n, 2) first moment of the BF-pixel counts about the calibrated centre (`k_px`: (N_bf,
    2) pixel positions relative to it) of the positions `rows` of `stack` (None: all; the
    stack is read in place), `exposure` theirs; NaN where nothing was acquired."""
    rows = np.arange(stack.shape[0]) if rows is None else np.asarray(rows, np.int64)
    sums = np.empty((len(rows), 3))
    stack_moments(stack, rows, np.ascontiguousarray(k_px, np.float64), sums)
    good = (np.asarray(exposure) > 0) & (sums[:, 0] > 0)
    out = np.full((len(rows), 2), np.nan)
    out[good] = sums[good, 1:] / sums[good, :1]
    return out


class DiskMoments:
    """`disk_moments` of every position, kept between updates and recomputed only where a
    position's frames changed or it was excluded or readmitted (a live update costs the new
    positions). A moment is a ratio of sums of the counts: the exposure's value, which every
    refit of the dose model moves a little, does not enter it (recomputing every position for
    it took 40 ms per update at 128x128 positions, 2,091 BF px)."""

    def __init__(self, n_pos: int, k_px: np.ndarray):
        self.k_px = k_px
        self.moments = np.full((n_pos, 2), np.nan)
        self._of = (np.zeros(n_pos, np.int64), np.zeros(n_pos, bool))  # (hits, exposed) taken at
        self.recomputed = 0  # positions the last update recomputed

    def update(self, stack: np.ndarray, hits: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        seen, exposed = self._of, exposure > 0
        changed = np.flatnonzero((hits != seen[0]) | (exposed != seen[1]))
        if changed.size:
            self.moments[changed] = disk_moments(stack, self.k_px, exposure[changed], changed)
            seen[0][changed], seen[1][changed] = hits[changed], exposed[changed]
        self.recomputed = changed.size
        return self.moments


def moment_gain(mean_pattern: np.ndarray, bf_pixels: np.ndarray, center_px) -> float:
    """Moment displacement per px of disk displacement over the fixed BF support, from the mean
    pattern displaced by +-GAIN_SHIFT_PX along each axis (the aperture's own edge profile)."""
    pattern = np.asarray(mean_pattern, np.float64)
    rows, cols = np.asarray(bf_pixels).T
    k = np.asarray(bf_pixels, np.float64) - np.asarray(center_px, np.float64)
    gains = []
    for axis in (0, 1):
        moved = []
        for sign in (1, -1):
            delta = [0.0, 0.0]
            delta[axis] = sign * GAIN_SHIFT_PX
            values = ndi.shift(pattern, delta, order=1, mode="nearest")[rows, cols]
            if not values.sum() > 0:  # no pattern (a worker's calibration): no gain
                return float("nan")
            moved.append(values @ k[:, axis] / values.sum())
        gains.append((moved[0] - moved[1]) / (2 * GAIN_SHIFT_PX))
    return float(np.mean(gains))


def _design(r: np.ndarray, c: np.ndarray, order: int) -> np.ndarray:
    terms = [np.ones_like(r, float), r, c, r * r, r * c, c * c]
    return np.column_stack(terms[: (1, 3, 6)[order]]).astype(np.float64)


def fit_descan(moments: np.ndarray, scan_shape: tuple[int, int], gain: float,
               max_order: int = 2) -> DescanFit | None:  # fmt: skip
    """The descan model of the per-position `moments` (n_pos, 2, from `disk_moments`) divided by
    `gain` (1 for centres of mass, `descan_compensation`), of order `max_order` at most; None
    with fewer than 12 measured positions or a gain that cannot be trusted."""
    if not gain > 0.05:
        return None
    centres = moments / gain
    rows, cols = np.divmod(np.arange(len(centres)), scan_shape[1])
    good = np.all(np.isfinite(centres), axis=1)
    n = int(good.sum())
    if n < 12:
        return None
    best = None
    for order in ORDERS[: max_order + 1]:
        a = _design(rows[good], cols[good], order)
        if n <= 2 * a.shape[1]:
            break
        coef, *_ = np.linalg.lstsq(a, centres[good], rcond=None)
        resid = centres[good] - a @ coef
        rss = float((resid**2).sum())
        bic = n * 2 * math.log(max(rss / (2 * n), 1e-30)) + 2 * a.shape[1] * math.log(2 * n)
        if best is None or bic < best[0]:
            best = (bic, order, coef, resid, a)
    _, order, coef, resid, a = best
    dof = max(len(resid) - a.shape[1], 1)
    sigma2 = (resid**2).sum(axis=0) / dof  # per axis
    cov = np.linalg.pinv(a.T @ a)
    errors = np.sqrt(np.outer(np.diag(cov), sigma2))
    return DescanFit(order, coef, errors, float(np.sqrt((resid**2).sum(axis=1).mean())),
                     centres.reshape(*scan_shape, 2), gain)  # fmt: skip
