"""The linear shift model s = M k: its weighted least-squares fit and its polar decomposition.

Defocus and 2-fold astigmatism shift every virtual-BF image linearly in its tilt
(tcbf-physics.md sect. 3.2-3.4): s = M k with no constant term. The alignment fits M to tile
shifts in scan px per detector px; the aberration fit reads it in A per rad (`optics`
converts); the same fit serves both. M = P R(theta) T with P symmetric (defocus + astigmatism,
scan frame), R a rotation and T the identity or the transpose: a left polar decomposition.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

MIN_FIT_POINTS = 3  # with 2 points the 4 unknowns fit exactly: no check of anything
MAX_CONDITION = 100.0  # positions this close to collinear do not determine M
TRANSPOSE = np.array([[0.0, 1.0], [1.0, 0.0]])


def fit_matrix(k: np.ndarray, shifts: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """Weighted least-squares M with shifts = k @ M.T (no constant; any consistent units);
    None if underdetermined (fewer than 3 points, or positions nearly collinear)."""
    use = weights > 0
    if use.sum() < MIN_FIT_POINTS:
        return None
    w = np.sqrt(weights[use])[:, None]
    a = k[use] * w
    if not np.linalg.cond(a) < MAX_CONDITION:
        return None
    mt, *_ = np.linalg.lstsq(a, shifts[use] * w, rcond=None)
    return mt.T


def weighted_rms(resid: np.ndarray, weights: np.ndarray) -> float:
    """sqrt(sum w |r|^2 / sum w) over rows of `resid` (N, 2); NaN without positive weight."""
    if not np.any(weights > 0):
        return float("nan")
    return float(np.sqrt(np.sum(weights * np.sum(resid**2, axis=1)) / np.sum(weights)))


def robust_fit(
    k: np.ndarray,
    shifts: np.ndarray,
    weights: np.ndarray,
    fallback: np.ndarray,
    rounds: int = 3,
    floor: float = 0.25,
) -> tuple[np.ndarray, np.ndarray, float]:
    """`fit_matrix` with outlier rejection: points further than max(3 x rms, `floor`) from the
    model are dropped and the fit repeated. Returns (M, used, rms misfit of the used points);
    M = `fallback` and nothing used when the data cannot determine it."""
    use = weights > 0
    m = fit_matrix(k, shifts, weights)
    if m is None:
        return fallback, np.zeros_like(use), float("nan")
    for _ in range(rounds):
        dist = np.hypot(*(shifts - k @ m.T).T)
        rms = weighted_rms(shifts - k @ m.T, np.where(use, weights, 0.0))
        keep = use & (dist <= max(3.0 * rms, floor))
        refit = fit_matrix(k, shifts, np.where(keep, weights, 0.0))
        if np.array_equal(keep, use) or refit is None:
            break  # converged, or rejecting more would leave too little: keep the last fit
        use, m = keep, refit
    rms = weighted_rms(shifts - k @ m.T, np.where(use, weights, 0.0))
    return m, use, rms


def polar_decomposition(m: np.ndarray, transpose: bool) -> tuple[float, np.ndarray]:
    """(theta, P) with M = P R(theta) T: P symmetric positive semi-definite, theta in
    (-pi, pi]. Folding (theta + pi, -P), which gives the same M, is the caller's choice."""
    t = TRANSPOSE if transpose else np.eye(2)
    u, p = scipy.linalg.polar(np.asarray(m, float) @ t, side="left")  # M T = p @ u
    return math.atan2(u[1, 0], u[0, 0]), p
