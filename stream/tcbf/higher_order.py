"""Higher-order aberrations from measured parallax shifts: C10, C12, C21, C23 and C30.

Pure numerics. The correction shift of a BF pixel at scan-frame tilt alpha is grad_alpha W
(tcbf-physics.md sect. 3.2): linear in alpha for C10 and C12, quadratic for coma C21 and
three-fold astigmatism C23, cubic for spherical aberration C30. The tiles' measured shifts
(detector tilts k, scan-frame shifts) are fitted with

    s_A = M alpha_det + sum_j c_j grad W_j(U alpha_det)

where M (2x2, general) carries C10, C12 and the geometry (M = P U, U = R(theta) T, as in the
linear fit: `aberrations.decompose`) and c = (C21a, C21b, C23a, C23b, C30) the higher orders,
evaluated on the tilts rotated into the scan frame by the current U; U is updated from M and
the fit repeated (it converges in two or three rounds: the higher orders hardly move the
rotation). Weighted least squares, with the linear fit's outlier rule (3x rms).

Uncertainties come from the curvature of the objective: the parameter covariance
(A^T W A)^-1 scaled by the reduced chi^2 of the residuals (so the tiles' own scatter sets
them), propagated to magnitudes and angles. Two limits are stated beside them:
- C30's radial shift |alpha|^2 alpha is nearly collinear with C10's alpha over a disk: their
  correlation coefficient is reported (typically -0.95 or beyond); C10 alone, fitted without
  C30, absorbs about (2/3) C30 alpha_max^2 of it.
- The angular calibration: a relative error e of the angular sampling scales C_n,m by
  (1 + e)^-n (the shift C alpha^n is measured, alpha is assumed), so 1 % of calibration
  error is 1 % on C1x, 2 % on C2x, 3 % on C30 (the floor `calibration_floor`).
A magnitude smaller than three times its uncertainty is withheld ("not determined", with the
bound |C| < value + 2 sigma); its angle is then meaningless and withheld too. C10 and C12 are always
reported (the linear fit determines them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats as stats

from tcbf_live.stream.tcbf.aberrations import AberrationFit
from tcbf_live.stream.tcbf.alignment import AlignmentResult
from tcbf_live.stream.tcbf.shift_model import TRANSPOSE, polar_decomposition

HIGHER = ("C21a", "C21b", "C23a", "C23b", "C30")
RADIAL_ORDER = {"C10": 1, "C12": 1, "C21": 2, "C23": 2, "C30": 3}  # shift ~ C alpha^n
ANGULAR_ORDER = {"C12": 2, "C21": 1, "C23": 3}
MIN_TILES = 12  # 11 parameters (with the offset): fewer tiles leave no check
MIN_LINEAR_TILES = 5  # a tile model this thin is replaced by the global search at the end
MIN_ERROR_TILES = 4  # the linear model and the offset (6 parameters) from 8 numbers: 2 dof
ROUNDS = 4  # rotation updates
# the linear fit's systematic floor on C10 and C12, relative to |C10|: TILE_FLOOR x (tile size /
# disk radius)^2. Coarse tiles average shifts over much of the disk, and the weak-phase case
# (20 mrad, 150 A defocus, disk radius 16 px) aligned only to bin 8 read its defocus 2-3.3 %
# high against a statistical sigma of 0.6-0.8 % (up to 5.5 sigma); 0.15 x (8/16)^2 = 3.8 %.
# Where the fit reached bin 4 the bias was 0.2-0.3 % (floor 0.4-0.9 %). An empirical model
# of two simulated cases, stated as such (docs/tcbf.md).
TILE_FLOOR = 0.15
DETERMINED_SIGMA = 3.0  # a magnitude below this many of its sigmas is withheld (a pair's
# magnitude is Rayleigh-distributed where the term is absent: 2 sigma would pass 13.5 % of
# absent terms, 3 sigma 1.1 %)
FIRM_SIGMA = 5.0  # see `HigherOrderFit.firm_third_order`
Z_95 = 1.959964  # the normal distribution's 97.5 % point
BOUND_SIGMA = 2.0  # a withheld magnitude's bound: value + this many sigmas


def higher_basis(alpha: np.ndarray) -> np.ndarray:
    """(N, 2, 5) grad W per unit coefficient of C21a, C21b, C23a, C23b, C30 (A per A) at
    scan-frame tilts `alpha` (N, 2) in rad (tcbf-physics.md sect. 3.2)."""
    ax, ay = np.asarray(alpha, float).T
    a2 = ax * ax + ay * ay
    out = np.empty((len(ax), 2, 5))
    out[:, 0, 0], out[:, 1, 0] = 2 / 3 * ax * ax + a2 / 3, 2 / 3 * ax * ay  # C21a
    out[:, 0, 1], out[:, 1, 1] = 2 / 3 * ax * ay, 2 / 3 * ay * ay + a2 / 3  # C21b
    out[:, 0, 2], out[:, 1, 2] = ax * ax - ay * ay, -2 * ax * ay  # C23a
    out[:, 0, 3], out[:, 1, 3] = 2 * ax * ay, ax * ax - ay * ay  # C23b
    out[:, 0, 4], out[:, 1, 4] = a2 * ax, a2 * ay  # C30
    return out


def student_scale(dof: int) -> float:
    """The factor that makes +-1.96 of a scatter's sigmas Student's 95 % interval for `dof`
    degrees of freedom (x2.2 at 2, x1.21 at 7, x1.04 at 30)."""
    return float(stats.t.ppf(0.975, max(dof, 1))) / Z_95


@dataclass(frozen=True)
class Coefficient:
    """One aberration of the fit: magnitude and angle with their 1-sigma uncertainties."""

    name: str  # "C21"
    value_A: float  # magnitude (C10, C30: signed)
    error_A: float
    angle_rad: float = float("nan")  # phi (scan frame, x = rows); NaN for round terms
    angle_error_rad: float = float("nan")
    determined: bool = True  # False: |C| < `bound_A` is all the data say

    @property
    def bound_A(self) -> float:
        """What the data exclude: |C| above this (2 sigma)."""
        return abs(self.value_A) + BOUND_SIGMA * self.error_A


@dataclass(frozen=True)
class HigherOrderFit:
    """Aberrations to third order and the geometry, from tile shifts (see module doc)."""

    matrix_A_per_rad: np.ndarray  # M (2, 2), detector-frame tilts -> scan-frame shift
    higher_A: np.ndarray  # (5,) C21a, C21b, C23a, C23b, C30 in A (scan frame)
    covariance: np.ndarray  # (8, 8) of C10, C12a, C12b, C21a, C21b, C23a, C23b, C30
    rotation_rad: float
    transpose: bool
    residual_A: float  # weighted rms misfit of the used tiles
    tiles_used: int
    residuals_A: np.ndarray  # (n_tiles, 2) measured - model (with the offset); NaN: unused
    rotation_error_rad: float = float("nan")
    method: str = "tiles"  # "transfer": refined on the pixels' transfer (`transfer_fit.py`)
    pixel_groups: int = 0  # (transfer) pixel groups fitted

    @property
    def cartesian_A(self) -> np.ndarray:
        """(8,) C10, C12a, C12b, C21a, C21b, C23a, C23b, C30 in A (scan frame)."""
        p = self._p()
        linear = [0.5 * (p[0, 0] + p[1, 1]), 0.5 * (p[0, 0] - p[1, 1]), 0.5 * (p[0, 1] + p[1, 0])]
        return np.concatenate([linear, self.higher_A])

    def _p(self) -> np.ndarray:
        return self.matrix_A_per_rad @ rotation_matrix(self.rotation_rad, self.transpose).T

    def coefficients(self) -> dict[str, Coefficient]:
        """C10, C12, C21, C23, C30 with uncertainties; magnitudes below 3 sigma withheld."""
        c, cov = self.cartesian_A, self.covariance
        out = {"C10": Coefficient("C10", float(c[0]), _sigma(cov, 0))}
        for name, i in (("C12", 1), ("C21", 3), ("C23", 5)):
            out[name] = _polar(name, c[i], c[i + 1], cov[i : i + 2, i : i + 2])
        c30 = Coefficient("C30", float(c[7]), _sigma(cov, 7))
        out["C30"] = _withheld(c30) if abs(c30.value_A) < DETERMINED_SIGMA * c30.error_A else c30
        return out

    def correlation(self, a: int, b: int) -> float:
        """Correlation coefficient of cartesian parameters a and b (0 = C10, 7 = C30)."""
        cov = self.covariance
        return float(cov[a, b] / math.sqrt(cov[a, a] * cov[b, b]))

    @property
    def firm_third_order(self) -> bool:
        """A third-order magnitude at FIRM_SIGMA or more (what the final update spends seconds
        refitting on the pixels' transfer; 3 sigma passes the odd false term: the tutorial's
        C21 read at 3.4 sigma where none exists)."""
        c = self.coefficients()
        return any(c[n].determined and abs(c[n].value_A) >= FIRM_SIGMA * c[n].error_A
                   for n in ("C21", "C23", "C30"))  # fmt: skip

    @property
    def third_order(self) -> bool:
        """A third-order term is determined (the final image then uses the full chi)."""
        c = self.coefficients()
        return any(c[name].determined for name in ("C21", "C23", "C30"))

    def scan_tilts(self, alpha_det_rad: np.ndarray) -> np.ndarray:
        """Detector-frame tilts (N, 2) rotated into the scan frame (the frame of `higher_A`)."""
        u = rotation_matrix(self.rotation_rad, self.transpose)
        return np.asarray(alpha_det_rad, float) @ u.T

    def shifts_A(self, alpha_det_rad: np.ndarray) -> np.ndarray:
        """Model correction shifts (N, 2) in A, scan frame, of detector-frame tilts (N, 2)."""
        a = np.asarray(alpha_det_rad, float)
        u = rotation_matrix(self.rotation_rad, self.transpose)
        return a @ self.matrix_A_per_rad.T + higher_basis(a @ u.T) @ self.higher_A

    def text(self) -> str:
        """'C21 6.8e+05+-3.1e+04 A at -37.8+-2.7 deg, C23 < 4e+04 A (not determined), ...'."""
        parts, coefficients = [], self.coefficients()
        for name in ("C21", "C23", "C30"):
            co = coefficients[name]
            if not co.determined:
                parts.append(f"{name} < {co.bound_A:.2g} A (not determined)")
                continue
            angle = ("" if math.isnan(co.angle_rad) else f" at {math.degrees(co.angle_rad):.1f}"
                     f"+-{math.degrees(co.angle_error_rad):.1f} deg")  # fmt: skip
            parts.append(f"{name} {co.value_A:.3g}+-{co.error_A:.2g} A{angle}")
        how = "" if self.method == "tiles" else ", from the pixels' transfer"
        return ", ".join(parts) + f" (C10-C30 correlation {self.correlation(0, 7):.2f}{how})"

    def file_attributes(self) -> dict[str, object]:
        """The /aberrations attributes of this fit (docs/result-file.md): each higher-order
        magnitude and angle with its `_err` (NaN where withheld, with the `_bound`), the whole
        set as py4DSTEM-style polar dicts (values, errors; A and rad, scan frame)."""
        out: dict[str, object] = {}
        errors: dict[str, float] = {}
        for name, co in self.coefficients().items():
            errors[name] = co.error_A
            if name in ANGULAR_ORDER:
                errors["phi" + name[1:]] = co.angle_error_rad
            if name in ("C10", "C12"):
                continue
            out[f"{name}_A"] = co.value_A if co.determined else float("nan")
            out[f"{name}_A_err"] = co.error_A
            out[f"{name}_A_bound"] = float("nan") if co.determined else co.bound_A
            if name in ANGULAR_ORDER:
                out[f"phi{name[1:]}_rad"] = co.angle_rad
                out[f"phi{name[1:]}_rad_err"] = co.angle_error_rad
        units = {"length_unit": "A", "angle_unit": "rad", "frame": "scan (x = rows)"}
        return out | {
            "polar": self.polar_dict() | units, "polar_err": errors | units,
            "C10_C30_correlation": self.correlation(0, 7), "third_order_tiles": self.tiles_used,
            "third_order_residual_A": self.residual_A, "third_order_method": self.method,
            "third_order_pixel_groups": self.pixel_groups,
        }

    def polar_dict(self) -> dict[str, float]:
        """py4DSTEM's `aberrations_dict_polar` keys (A, rad): C10, C12, phi12, C21, phi21,
        C23, phi23, C30; withheld magnitudes are NaN."""
        out = {}
        for name, co in self.coefficients().items():
            out[name] = co.value_A if co.determined else float("nan")
            if name in ANGULAR_ORDER:
                out["phi" + name[1:]] = co.angle_rad
        return out


def _sigma(cov: np.ndarray, i: int) -> float:
    return float(math.sqrt(max(cov[i, i], 0.0)))


def _withheld(c: Coefficient) -> Coefficient:
    return Coefficient(c.name, c.value_A, c.error_A, float("nan"), float("nan"), False)


def _polar(name: str, a: float, b: float, cov: np.ndarray) -> Coefficient:
    """Magnitude and angle of a Cartesian pair with propagated errors (tcbf-physics sect. 2:
    a = C cos(m phi), b = C sin(m phi))."""
    m = ANGULAR_ORDER[name]
    mag = math.hypot(a, b)
    if mag == 0.0:
        return Coefficient(name, 0.0, math.sqrt(max(np.trace(cov) / 2, 0.0)), determined=False)
    j_mag = np.array([a, b]) / mag
    j_phi = np.array([-b, a]) / (m * mag * mag)
    err = float(math.sqrt(max(j_mag @ cov @ j_mag, 0.0)))
    co = Coefficient(name, mag, err, math.atan2(b, a) / m,
                     float(math.sqrt(max(j_phi @ cov @ j_phi, 0.0))))  # fmt: skip
    if name != "C12" and mag < DETERMINED_SIGMA * co.error_A:
        return _withheld(co)
    return co


def fit_alignment(result: AlignmentResult, linear: AberrationFit | None, step_A: float,
                  sampling_mrad: float, third_order: bool = True,
                  ) -> HigherOrderFit | None:  # fmt: skip
    """`fit_higher_order` on the alignment's last iteration (its finest level): the tiles'
    measured shifts, accepted peaks within the fit radius, from the linear fit's rotation."""
    if linear is None or not result.iterations or not (step_A and sampling_mrad):
        return None
    it = result.iterations[-1]
    if it.measured_weights is None:
        return None
    return fit_higher_order(it.k_px * (sampling_mrad * 1e-3), it.shifts_px * step_A,
                            it.measured_weights, linear.transpose, linear.rotation_rad,
                            third_order)  # fmt: skip


def linear_uncertainties(result: AlignmentResult, linear: AberrationFit | None, step_A: float,
                         sampling_mrad: float) -> dict[str, float] | None:  # fmt: skip
    """1-sigma errors of the linear fit's C10, C12, phi12 and rotation (keys as the
    AberrationFit fields): the linear model (and the offset) fitted to the same tiles
    (`fit_alignment`), the covariance scaled by their scatter, C10 and C12 with the tile-size
    floor (TILE_FLOOR) in quadrature. None where it cannot be."""
    fit = fit_alignment(result, linear, step_A, sampling_mrad, third_order=False)
    if fit is None:
        return None
    it = result.iterations[-1]
    c10, c12 = fit.coefficients()["C10"], fit.coefficients()["C12"]
    radius_px = float(np.hypot(*it.k_px.T).max()) + it.bin_px / 2
    floor = TILE_FLOOR * (it.bin_px / radius_px) ** 2 * abs(c10.value_A)  # (module doc)
    return {"C10_A": math.hypot(c10.error_A, floor), "C12_A": math.hypot(c12.error_A, floor),
            "phi12_rad": c12.angle_error_rad, "rotation_rad": fit.rotation_error_rad}


def calibration_floor(name: str, relative_calibration_error: float) -> float:
    """Relative error of C<name> from a relative error of the angular sampling (module doc)."""
    return abs((1.0 + relative_calibration_error) ** -RADIAL_ORDER[name] - 1.0)


def fit_higher_order(alpha_det_rad: np.ndarray, shifts_A: np.ndarray, weights: np.ndarray,
                     transpose: bool, rotation_rad: float,
                     third_order: bool = True) -> HigherOrderFit | None:  # fmt: skip
    """Fit M and C21, C23, C30 to tile shifts (A, scan frame) at detector-frame tilts (rad),
    starting from the linear fit's rotation (and keeping its side of the 180 degree
    ambiguity); None with fewer weighted tiles than MIN_TILES (MIN_ERROR_TILES for the linear
    model alone) or a singular design (the tilts
    do not span the disk). `third_order=False`: M alone (the linear model's uncertainties;
    the higher orders zero and their covariance zero)."""
    a = np.asarray(alpha_det_rad, float)
    s = np.asarray(shifts_A, float)
    use = np.asarray(weights, float) > 0
    rotation = rotation_rad
    higher_n = 5 if third_order else 0
    for _ in range(ROUNDS):
        fitted = _solve(a, s, weights, use, transpose, rotation, higher_n)
        if fitted is None:
            return None
        m, higher, cov, resid = fitted
        resid2 = np.sum(resid**2, axis=1)
        rms = math.sqrt(np.sum(weights[use] * resid2[use]) / np.sum(weights[use]))
        keep = use & (np.sqrt(resid2) <= 3.0 * rms)
        rotation = _branch(polar_decomposition(m, transpose)[0], rotation_rad)
        if keep.sum() >= (MIN_TILES if third_order else MIN_ERROR_TILES):
            use = keep
    fitted = _solve(a, s, weights, use, transpose, rotation, higher_n)
    if fitted is None:
        return None
    m, higher, cov_p, resid = fitted
    resid2 = np.sum(resid**2, axis=1)
    rotation = _branch(polar_decomposition(m, transpose)[0], rotation_rad)
    u = rotation_matrix(rotation, transpose)
    # C10, C12a, C12b are linear in M for a fixed U (P = M U^T): propagate the covariance
    jac = np.zeros((8, 4 + higher_n))
    for k, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):  # M entries, row-major
        dp = np.zeros((2, 2))
        dp[i, j] = 1.0
        dp = dp @ u.T
        jac[:3, k] = [0.5 * (dp[0, 0] + dp[1, 1]), 0.5 * (dp[0, 0] - dp[1, 1]),
                      0.5 * (dp[0, 1] + dp[1, 0])]  # fmt: skip
    jac[3 : 3 + higher_n, 4:] = np.eye(higher_n)
    rms = math.sqrt(np.sum(weights[use] * resid2[use]) / np.sum(weights[use]))
    grad = np.zeros(4)  # the rotation's gradient in M (numerical: the polar decomposition)
    for k in range(4):
        dm = np.zeros(4)
        dm[k] = 1e-6 * max(np.abs(m).max(), 1e-12)
        up = polar_decomposition(m + dm.reshape(2, 2), transpose)[0]
        grad[k] = math.remainder(up - polar_decomposition(m, transpose)[0], 2 * math.pi) / dm[k]
    rotation_error = math.sqrt(max(grad @ cov_p[:4, :4] @ grad, 0.0))
    return HigherOrderFit(m, higher if third_order else np.zeros(5), jac @ cov_p @ jac.T,
                          float(rotation), bool(transpose), rms, int(use.sum()),
                          np.where(use[:, None], resid, np.nan), rotation_error)  # fmt: skip


def _branch(theta: float, start: float) -> float:
    """Of (theta, P) and (theta + 180 deg, -P), which give the same M, the rotation nearer the
    linear fit's (which resolved that ambiguity: `aberrations.decompose`)."""
    if math.cos(theta - start) < 0:
        theta += math.pi
    return math.atan2(math.sin(theta), math.cos(theta))


def rotation_matrix(theta: float, transpose: bool) -> np.ndarray:
    """U = R(theta) T: detector-frame tilts to the scan frame."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]]) @ (TRANSPOSE if transpose else np.eye(2))


def _solve(a, s, weights, use, transpose, rotation, higher_n=5):
    """One weighted least-squares solve for the 9 parameters (M row-major, then the higher
    orders) and a common offset of all shifts (the images' registration fixes no absolute
    origin: coma's shift field has a mean of (2/3) C21 <alpha^2>, which a fit without the
    offset would read as a smaller coma); (M, higher, covariance of the 9, residual (N, 2)
    per tile) or None."""
    if use.sum() < (MIN_TILES if higher_n else MIN_ERROR_TILES):
        return None
    n, p = len(a), 4 + higher_n  # the parameters; then the offset (two more)
    design = np.zeros((n, 2, p + 2))
    design[:, 0, 0], design[:, 0, 1] = a[:, 0], a[:, 1]
    design[:, 1, 2], design[:, 1, 3] = a[:, 0], a[:, 1]
    if higher_n:
        design[:, :, 4:p] = higher_basis(a @ rotation_matrix(rotation, transpose).T)
    design[:, 0, p], design[:, 1, p + 1] = 1.0, 1.0
    w = np.repeat(np.asarray(weights, float)[use], 2)
    x = design[use].reshape(-1, p + 2)
    y = s[use].reshape(-1)
    xtw = x.T * w
    normal = xtw @ x
    scale = np.sqrt(np.diag(normal))
    if not np.all(scale > 0):
        return None
    normal_n = normal / np.outer(scale, scale)
    if not np.linalg.cond(normal_n) < 1e12:
        return None
    inv = np.linalg.inv(normal_n) / np.outer(scale, scale)
    params = inv @ (xtw @ y)
    resid = s - np.einsum("nkp,p->nk", design, params)
    dof = max(2 * int(use.sum()) - p - 2, 1)
    chi2 = float(np.sum(w * (y - x @ params) ** 2)) / dof
    t = student_scale(dof)  # the scatter's own uncertainty (x2.2 for a thin live model's 2)
    cov = inv[:p, :p] * chi2 * t * t  # (the weights' scale cancels)
    return params[:4].reshape(2, 2), params[4:p], cov, resid
