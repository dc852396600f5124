"""Aberrations from parallax shifts: defocus, astigmatism and geometry of the shift model.

Pure numerics. Conventions (docs/simulator.md, shared/reference/tcbf-physics.md sect. 3-5):
- `alpha_mrad` (N, 2): detector-frame tilt of each BF pixel, (row, col) relative to the disk
  centre, times the angular sampling;
- `shifts_px` (N, 2): tcBF *correction* shifts in scan pixels, scan frame (row, col): the
  negative of the raw displacement of each virtual-BF image;
- defocus and 2-fold astigmatism give s_A = P R(theta) T alpha with P symmetric (scan frame),
  so the fitted M = P U, U = R(theta) T orthogonal: a left polar decomposition.

R(theta + pi) = -R(theta): (theta, P) and (theta + 180 deg, -P) give the same shifts. The data
cannot tell them apart; `defocus_sign` (+1: defocus > 0, i.e. C10 < 0; -1: the opposite) picks
one. Without it the rotation is folded into (-90, 90] deg, as py4DSTEM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tcbf_live.stream.tcbf.shift_model import fit_matrix, polar_decomposition


@dataclass(frozen=True)
class AberrationFit:
    """Defocus, 2-fold astigmatism and scan/detector geometry from a fitted shift matrix."""

    C10_A: float
    C12_A: float
    phi12_rad: float  # scan frame, x = rows
    rotation_rad: float
    transpose: bool
    matrix_A_per_rad: np.ndarray  # M in s_A = M alpha_rad
    residual_px: float  # rms misfit of the linear model
    # 1-sigma statistical errors by field name (C10_A, C12_A, phi12_rad, rotation_rad), from
    # the tiles' scatter (`higher_order.linear_uncertainties`); None: not known
    errors: dict | None = field(default=None, compare=False)

    def errors_text(self) -> str:
        """' (1 sigma: defocus 25 A, C12 25 A, 12 deg, rotation 0.09 deg)', or that they are
        unknown (a model from too few tiles where the global search found none)."""
        e = self.errors
        if not e:
            return " (1 sigma: unknown, too few tiles)"
        return (f" (1 sigma: defocus {e['C10_A']:.2g} A, C12 {e['C12_A']:.2g} A, "
                f"{math.degrees(e['phi12_rad']):.2g} deg, rotation "
                f"{math.degrees(e['rotation_rad']):.2g} deg)")  # fmt: skip

    @property
    def defocus_A(self) -> float:
        return -self.C10_A

    def p_matrix_A(self) -> np.ndarray:
        """Symmetric defocus + astigmatism matrix (scan frame): grad W = P alpha."""
        a = self.C12_A * math.cos(2 * self.phi12_rad)
        b = self.C12_A * math.sin(2 * self.phi12_rad)
        return np.array([[self.C10_A + a, b], [b, self.C10_A - a]])

    def shifts_px(self, alpha_mrad: np.ndarray, step_A: float) -> np.ndarray:
        """Model correction shifts (N, 2) in scan px."""
        return (np.asarray(alpha_mrad) * 1e-3) @ self.matrix_A_per_rad.T / step_A


def fit_shift_matrix(alpha_mrad: np.ndarray, shifts_px: np.ndarray, step_A: float,
                     weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:  # fmt: skip
    """Least-squares M (A per rad) with shifts_A = M alpha (`shift_model.fit_matrix`); returns
    (M, rms residual in px)."""
    a = np.asarray(alpha_mrad, float) * 1e-3
    s = np.asarray(shifts_px, float) * step_A
    if a.shape[0] < 3 or a.shape != s.shape or a.shape[1] != 2:
        raise ValueError("need at least 3 (alpha, shift) pairs of shape (N, 2)")
    m = fit_matrix(a, s, np.ones(len(a)) if weights is None else np.asarray(weights, float))
    if m is None:
        raise ValueError("the tilts are too nearly collinear to determine the shift model")
    resid = (s - a @ m.T) / step_A
    return m, float(np.sqrt(np.mean(np.sum(resid**2, axis=1))))


def decompose(
    m: np.ndarray,
    defocus_sign: int | None = None,
    residual_px: float = 0.0,
    transpose: bool | None = None,
) -> AberrationFit:
    """Split M = P R(theta) T into C10, C12, phi12, theta and the transpose flag.

    The transpose is taken as given (the detector's wiring, when the stream announces it), else
    from det M < 0: det P = C10^2 - C12^2, so that inference fails when |C12| > |C10|."""
    m = np.asarray(m, float)
    if transpose is None:
        transpose = bool(np.linalg.det(m) < 0)
    theta, p = polar_decomposition(m, transpose)
    c10 = 0.5 * float(np.trace(p))
    flip = False
    if defocus_sign is None:
        flip = not (-math.pi / 2 < theta <= math.pi / 2)
    elif defocus_sign not in (1, -1):
        raise ValueError("defocus_sign must be +1, -1 or None")
    else:
        flip = (c10 > 0) == (defocus_sign > 0)  # defocus > 0 means C10 < 0
    if flip:
        p = -p
        theta = theta + math.pi
        c10 = -c10
    theta = math.atan2(math.sin(theta), math.cos(theta))  # wrap to (-pi, pi]
    c12a = 0.5 * (p[0, 0] - p[1, 1])
    c12b = 0.5 * (p[0, 1] + p[1, 0])
    return AberrationFit(
        C10_A=c10,
        C12_A=float(math.hypot(c12a, c12b)),
        phi12_rad=0.5 * math.atan2(c12b, c12a),
        rotation_rad=theta,
        transpose=transpose,
        matrix_A_per_rad=m,
        residual_px=residual_px,
    )


def fit_aberrations(
    alpha_mrad: np.ndarray,
    shifts_px: np.ndarray,
    step_A: float,
    defocus_sign: int | None = None,
    weights: np.ndarray | None = None,
) -> AberrationFit:
    """Fit the linear shift model to per-pixel (or per-tile) shifts and decompose it."""
    m, resid = fit_shift_matrix(alpha_mrad, shifts_px, step_A, weights)
    return decompose(m, defocus_sign, resid)
