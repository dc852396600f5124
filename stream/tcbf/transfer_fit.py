"""Third-order aberrations fitted to what the BF pixels' images transfer, not to tile peaks.

Why: where chi is not quadratic a BF pixel's image is not a shifted copy of the object. Its
transfer T_a(q) (`chi_kernels.py`) carries a local defocus that varies across the disk, and a
tile's cross-correlation peak, the average of its pixels' shifts blurred by that transfer,
is not grad W at the tile's centre. Fitted to tile peaks (`higher_order.py`), C21 and C23
came out 15-50 % low at 25 mrad and 100-300 A of defocus (docs/tcbf.md), as py4DSTEM's do.

What: every BF pixel's image (grouped in blocks beyond MAX_GROUPS pixels) is
explained by one object per scan frequency seen through each pixel's modelled transfer,
I_a(q) = conj(T_a(q; chi)) O(q) + noise. Eliminating O(q) leaves the profile likelihood

    F(chi) = sum_q |sum_a w_a T_a I_a|^2 / sum_a w_a |T_a|^2,   w_a = the pixel's mean counts,

maximal at the true chi by Cauchy-Schwarz (the matched filter of each frequency), blind to a
common phase per frequency (the images' registration fixes no origin: no offset term is
needed) and free of binning blur. It is the global alignment's shift-and-add power
(`global_alignment.py`) with the full transfer in place of the pure shift. It is maximised
(L-BFGS, exact gradient in the eight coefficients and the detector rotation) from
the tile fit's values, which lie in the right basin (and side of the 180 degree twin).

Finite field: each image is windowed by a Hann window that follows the object (image a holds
the object moved by -s_a, its window sits at -s_a), so that windowed images stay shifted copies
of one windowed object. A frequency's sidebands are displaced from the pixel's shift by
(local defocus) x lambda q; only frequencies where that stays within SIDEBAND_REACH of the
window's half-width are fitted. What is left is the systematic floor below, measured on
noise-free simulations (docs/tcbf.md).

Uncertainty: jackknife over SUBSETS interleaved subsets of the pixel groups (each refitted
from the full solution), scaled to Student's 95 % for its degrees of freedom, plus the floor
in quadrature. C10-C30 correlation, withheld magnitudes and the file keys as
`HigherOrderFit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft as sfft
import scipy.optimize as optimize

from tcbf_live.stream.tcbf.chi_kernels import transfer_objective
from tcbf_live.stream.tcbf.higher_order import HigherOrderFit, rotation_matrix, student_scale

TRANSFER_FIT = ("determined", "always", "off")  # `PipelineSettings.transfer_fit`
MAX_FIELD_PX = 96  # the central block of complete positions used (a side)
MAX_GROUPS = 1000  # BF pixels grouped in b x b blocks beyond this (transfers averaged)
GAUSS_PHASE_RAD = 0.35  # four sub-tilts per pixel where its transfer turns by more across it
MAX_BIN_PX = 8
MAX_WORK = 1.2e6  # sub-tilts x frequencies per evaluation (~0.1 s on one core): frequencies
# are thinned (every n-th) beyond it
SUBSETS = 8  # jackknife
JACKKNIFE_ITERATIONS = 10  # each subset refitted from the full solution
MIN_FIELD_PX = 16  # a smaller block of complete positions: no fit
MIN_FREQUENCIES = 16  # fewer within the sidebands' reach (a large defocus): no fit
# a frequency q is fitted where its sidebands, displaced from the pixel's own shift by
# (local defocus) x lambda q, stay within this fraction of the window's half-width
SIDEBAND_REACH = 0.15
RAMP_PX = 0.5  # width of the modelled aperture edge, in detector pixels
# systematic floor: the coefficient that moves the disk edge by this many scan px, times
# (FLOOR_FIELD_PX / the field's side) and (the sidebands' reach / SIDEBAND_REACH, 1 where the
# frequency limit acts: the high-angle cases; at least 0.25). Noise-free fits (64 px field,
# -100 and -300 A at 25 mrad; the tutorial's optics) left at most 0.005 px on C21 and C23,
# 0.02 px on C30 (3-4 %), 0.01 deg on the rotation (docs/tcbf.md)
FLOOR_EDGE_PX = {1: 0.02, 2: 0.02, 3: 0.03}  # by radial order (C1x, C2x, C30)
ROTATION_FLOOR_RAD = math.radians(0.1)
FLOOR_FIELD_PX = 64.0
ORDER = (1, 1, 1, 2, 2, 2, 2, 3)  # radial order of each cartesian coefficient
GAUSS_2X2 = ((-1, -1), (-1, 1), (1, -1), (1, 1))  # sub-tilts: centroid +- spread per axis


@dataclass(frozen=True)
class PixelSpectra:
    """The grouped BF pixels' windowed image spectra on the fitted frequencies."""

    q_per_px: np.ndarray  # (N_q, 2) cycles per scan px, scan frame (x = rows)
    spectra: np.ndarray  # (N_g, N_q) complex
    weights: np.ndarray  # (N_g,) mean counts per position
    sub_k_px: np.ndarray  # (N_g, N_s, 2) sub-tilts (detector px) the transfer is averaged over
    sub_w: np.ndarray  # (N_g, N_s) their weights (sum 1), 0 for padding
    field_px: int  # the smaller side of the field used
    # the sidebands' largest displacement at the fitted frequencies over the window's
    # half-width (<= SIDEBAND_REACH): what the window's systematic error grows with
    reach: float = SIDEBAND_REACH

    def subset(self, keep: np.ndarray) -> PixelSpectra:
        return replace(self, spectra=np.ascontiguousarray(self.spectra[keep]),
                       weights=self.weights[keep], sub_k_px=self.sub_k_px[keep],
                       sub_w=self.sub_w[keep])  # fmt: skip


def pixel_groups(k_px: np.ndarray, gauss: bool = True) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:  # fmt: skip
    """Group index (N,) of b x b detector blocks, b the smallest giving at most MAX_GROUPS, and
    each group's sub-tilts (N_g, 4, 2) detector px with their weights (N_g, 4): four points at
    the members' centroid plus and minus their rms spread per axis, each pixel's own 1 px
    width included (the two-point Gauss rule: a pixel integrates the transfer over its area,
    and at 2 mrad per px and 300 A of defocus the shift changes by a scan px across it);
    `gauss=False`: single pixels by their centre alone (N, 1, 2), where the transfer hardly
    varies across a pixel."""
    b = 1
    while True:
        _, group, counts = np.unique(np.floor(k_px / b), axis=0, return_inverse=True,
                                     return_counts=True)  # fmt: skip
        group = group.ravel()
        if counts.size <= MAX_GROUPS or b >= MAX_BIN_PX:
            break
        b += 1
    n_g = counts.size
    centre = np.zeros((n_g, 2))
    np.add.at(centre, group, k_px)
    centre /= counts[:, None]
    spread = np.zeros((n_g, 2))
    np.add.at(spread, group, (k_px - centre[group]) ** 2)
    spread = np.sqrt(spread / counts[:, None] + 1.0 / 12.0)  # (a pixel's own width: 1 px)
    if not gauss and b == 1:
        return group, centre[:, None, :], np.ones((n_g, 1))
    sub = np.stack([centre + spread * np.array(corner) for corner in GAUSS_2X2], axis=1)
    return group, sub, np.full((n_g, 4), 0.25)


def pixel_spectra(stack: np.ndarray, exposure: np.ndarray, scan_shape: tuple[int, int],
                  window: tuple[tuple[int, int], tuple[int, int]], k_px: np.ndarray,
                  shifts_px: np.ndarray, local_defocus_A: float,
                  optics: Optics) -> PixelSpectra | None:  # fmt: skip
    """Contrast images of the pixel groups on the central block (<= MAX_FIELD_PX) of the
    complete rows `window`, each windowed in the object frame by its mean model shift
    `shifts_px` (N, 2, scan px), and their spectra (DC left out); frequencies thinned to keep
    the work under MAX_WORK (evenly in |q|). None when the block is smaller than MIN_FIELD_PX
    or fewer than MIN_FREQUENCIES frequencies lie within the sidebands' reach."""
    (r0, r1), (c0, c1) = window
    n0, n1 = min(r1 - r0, MAX_FIELD_PX), min(c1 - c0, MAX_FIELD_PX)
    r0, c0 = r0 + (r1 - r0 - n0) // 2, c0 + (c1 - c0 - n1) // 2
    if min(n0, n1) < MIN_FIELD_PX:
        return None
    half = np.array([n0, n1]) / 2.0
    # frequencies whose sidebands, displaced from the pixel's shift by (local defocus) x
    # lambda q, stay within SIDEBAND_REACH of the window's half-width (module doc)
    sideband_px = local_defocus_A * optics.wavelength_A / optics.step_A**2  # px per cycle/px
    reach = min(SIDEBAND_REACH * min(n0, n1) / 2 / max(sideband_px, 1e-30), 0.75)
    # the transfer's phase change across one pixel at that frequency: its shift change
    # (local defocus x the pixel's rms width) x 2 pi q; the Gauss rule where it matters
    across = 2 * np.pi * reach * local_defocus_A * optics.sampling_rad / math.sqrt(12)
    group, sub_k, sub_w = pixel_groups(k_px, across / optics.step_A > GAUSS_PHASE_RAD)
    counts = np.bincount(group)
    n_g = counts.size
    rows = (np.arange(r0, r0 + n0)[:, None] * scan_shape[1] + np.arange(c0, c0 + n1)).ravel()
    e = exposure[rows]
    sums = np.zeros((rows.size, n_g))
    np.add.at(sums.T, group, stack[rows].T.astype(np.float64))  # (group x position sums)
    sums /= np.where(e > 0, e, 1.0)[:, None]
    mean = sums[e > 0].mean(axis=0)
    ok = mean > 0
    if counts.max() == 1:  # single pixels (a group's centroid already follows its members)
        sub_k = _illuminated(sub_k, mean)
    contrast = np.where(e[:, None] > 0, sums / np.where(ok, mean, 1.0) - 1.0, 0.0)
    shift_g = np.zeros((n_g, 2))
    np.add.at(shift_g, group, shifts_px)
    shift_g /= counts[:, None]
    x0 = np.arange(n0) - (n0 - 1) / 2
    x1 = np.arange(n1) - (n1 - 1) / 2
    # image a holds the object moved by -s_a (I_a(x) = O(x + s_a)): its window sits at -s_a
    w0 = _hann((x0[None, :] + shift_g[:, :1]) / half[0])  # (n_g, n0)
    w1 = _hann((x1[None, :] + shift_g[:, 1:]) / half[1])
    images = contrast.T.reshape(n_g, n0, n1) * w0[:, :, None] * w1[:, None, :]
    spectra = sfft.rfft2(images, workers=1).reshape(n_g, -1)[:, 1:]  # DC left out
    q0, q1 = np.broadcast_arrays(sfft.fftfreq(n0)[:, None], sfft.rfftfreq(n1)[None, :])
    q = np.stack([q0.ravel(), q1.ravel()], axis=1)[1:]  # cycles per scan px
    # each frequency once (rfft keeps q and -q on its first column, and on its last where
    # the columns are even), within the sidebands' reach
    edge_col = (q[:, 1] == 0) | ((n1 % 2 == 0) & (q[:, 1] == q1.max()))
    near = (np.hypot(*q.T) <= reach) & ~(edge_col & (q[:, 0] < 0))
    q, spectra = q[near], spectra[:, near]
    if q.shape[0] < MIN_FREQUENCIES:
        return None
    work = int(np.count_nonzero(sub_w[ok])) * q.shape[0]
    thin = max(1, math.ceil(work / MAX_WORK))
    order = np.argsort(np.hypot(*q.T), kind="stable")[::thin]  # thinned evenly in |q|
    q, spectra = q[order], spectra[:, order]
    used = float(np.hypot(*q.T).max()) * sideband_px / (min(n0, n1) / 2)
    return PixelSpectra(q, np.ascontiguousarray(spectra[ok]), mean[ok],
                        sub_k[ok], sub_w[ok], int(min(n0, n1)),
                        min(used, SIDEBAND_REACH))  # fmt: skip


def _illuminated(sub_k: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Sub-tilts of pixels the disk's edge cuts moved to the centroid of their lit part: a
    pixel lit to a fraction f (its counts against the disk's median) is lit on its inner
    side, whose centroid lies (1 - f) / 2 px inward of the pixel's centre."""
    lit = np.clip(mean / max(float(np.median(mean)), 1e-30), 0.0, 1.0)
    r = np.hypot(sub_k[..., 0], sub_k[..., 1])
    inward = np.where(r > 0, (1.0 - lit[:, None]) / 2 / np.maximum(r, 1e-9), 0.0)
    return sub_k * (1.0 - inward[..., None])


def _shift_spread_A_per_rad(model: HigherOrderFit, alpha_rad: np.ndarray) -> float:
    """The largest rate (A per rad of tilt) at which the model's shift changes over the disk:
    the spectral norm of grad grad W, the local defocus, by central differences."""
    h = 1e-3 * max(float(np.abs(alpha_rad).max()), 1e-6)
    jac = np.stack([(model.shifts_A(alpha_rad + d) - model.shifts_A(alpha_rad - d)) / (2 * h)
                    for d in ((h, 0.0), (0.0, h))], axis=-1)  # fmt: skip
    return float(np.linalg.norm(jac, ord=2, axis=(1, 2)).max())


def _hann(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1.0, np.cos(0.5 * np.pi * x) ** 2, 0.0)


@dataclass(frozen=True)
class Optics:
    """What turns detector pixels and scan frequencies into tilts and chi."""

    step_A: float
    sampling_rad: float  # per detector pixel
    wavelength_A: float
    semiangle_rad: float
    transpose: bool

    def tilts(self, sub_k_px: np.ndarray, rotation_rad: float) -> np.ndarray:
        """Scan-frame tilts (rad) of detector positions (..., 2)."""
        u = rotation_matrix(rotation_rad, self.transpose)
        return np.ascontiguousarray((sub_k_px * self.sampling_rad) @ u.T)


def refine(start: np.ndarray, data: PixelSpectra, optics: Optics,
           max_iterations: int = 60) -> np.ndarray:  # fmt: skip
    """Maximise F from `start` = (8 cartesian coefficients in A, rotation in rad); the 9."""
    q = data.q_per_px / optics.step_A
    alpha_max = float(np.hypot(*data.sub_k_px.reshape(-1, 2).T).max()) * optics.sampling_rad
    # parameter scales: the coefficient that moves the disk edge by one scan px
    scale = np.array([optics.step_A / alpha_max**n for n in ORDER] + [0.01])  # (rad)
    ramp = RAMP_PX * optics.sampling_rad
    grad = np.empty(9)

    def negative(x: np.ndarray) -> tuple[float, np.ndarray]:
        p = start + x * scale
        f = transfer_objective(p[:8], optics.tilts(data.sub_k_px, p[8]), data.sub_w,
                               data.weights, q, data.spectra, optics.wavelength_A,
                               optics.semiangle_rad, ramp, grad)  # fmt: skip
        return -f, -grad * scale

    found = optimize.minimize(negative, np.zeros(9), jac=True, method="L-BFGS-B",
                              options={"maxiter": max_iterations})  # fmt: skip
    return start + found.x * scale


def fit_transfer(shift_fit: HigherOrderFit, stack: np.ndarray, exposure: np.ndarray,
                 scan_shape: tuple[int, int], window: tuple[tuple[int, int], tuple[int, int]],
                 k_px: np.ndarray, excluded: np.ndarray, optics: Optics,
                 ) -> HigherOrderFit | None:  # fmt: skip
    """The transfer-fitted aberrations (module doc), starting from the tile fit `shift_fit`;
    None where the field is too small or the fit leaves the tile fit's side of the twin."""
    use = ~np.asarray(excluded, bool)
    k = np.asarray(k_px, float)[use]
    start = np.concatenate([shift_fit.cartesian_A, [shift_fit.rotation_rad]])
    p, data = start, None
    for _ in range(2):  # the windows follow the refined shifts once
        model = _model(p, optics)
        shifts_px = model.shifts_A(k * optics.sampling_rad) / optics.step_A
        spread = _shift_spread_A_per_rad(model, k * optics.sampling_rad)
        data = pixel_spectra(stack[:, use], exposure, scan_shape, window, k, shifts_px, spread,
                             optics)  # fmt: skip
        if data is None or data.weights.size < 2 * SUBSETS:
            return None
        p = refine(p, data, optics)
    if (start[0] and np.sign(p[0]) != np.sign(start[0])) or not np.all(np.isfinite(p)):
        return None
    index = np.arange(data.weights.size)
    jack = np.array([refine(p, data.subset(index % SUBSETS != j), optics, JACKKNIFE_ITERATIONS)
                     for j in range(SUBSETS)])  # fmt: skip
    if not np.all(np.isfinite(jack)):
        return None
    d = jack - jack.mean(axis=0)
    t = student_scale(SUBSETS - 1)
    cov = (SUBSETS - 1) / SUBSETS * (d.T @ d) * t * t
    alpha_max = float(np.hypot(*k.T).max()) * optics.sampling_rad
    scale = FLOOR_FIELD_PX / data.field_px * max(data.reach / SIDEBAND_REACH, 0.25)
    floor = [FLOOR_EDGE_PX[n] * scale * optics.step_A / alpha_max**n for n in ORDER]
    cov[:8, :8] += np.diag(np.square(floor))
    cov[8, 8] += ROTATION_FLOOR_RAD**2
    fit = _model(p, optics)
    return replace(fit, covariance=cov[:8, :8], residual_A=shift_fit.residual_A,
                   tiles_used=shift_fit.tiles_used, residuals_A=shift_fit.residuals_A,
                   rotation_error_rad=math.sqrt(max(cov[8, 8], 0.0)), method="transfer",
                   pixel_groups=int(data.weights.size))  # fmt: skip


def refit(tiles_fit: HigherOrderFit | None, linear_matrix_A_per_rad: np.ndarray,
          rotation_rad: float, how: str, stack: np.ndarray, exposure: np.ndarray,
          scan_shape: tuple[int, int], window: tuple[tuple[int, int], tuple[int, int]],
          k_px: np.ndarray, excluded: np.ndarray,
          optics: Optics) -> HigherOrderFit | None:  # fmt: skip
    """The final update's third order: the tiles' fit `tiles_fit`, refitted (`fit_transfer`)
    where `how` (TRANSFER_FIT) asks: "determined" where the tiles find a term at FIRM_SIGMA
    (the refit costs seconds; 3 sigma passes the odd false term), "always" (from the linear
    model M, `rotation_rad`, where the tiles give no third order), "off" never."""
    if how == "off" or (how == "determined" and not (tiles_fit and tiles_fit.firm_third_order)):
        return tiles_fit
    start = tiles_fit
    if not (tiles_fit and tiles_fit.third_order):  # "always": from the linear model
        start = _bare(linear_matrix_A_per_rad, np.zeros(5), rotation_rad, optics.transpose)
    fitted = fit_transfer(start, stack, exposure, scan_shape, window, k_px, excluded, optics)
    return fitted or tiles_fit


def _model(p: np.ndarray, optics: Optics) -> HigherOrderFit:
    """A HigherOrderFit of (8 cartesian coefficients, rotation) without uncertainties."""
    c = p[:8]
    sym = np.array([[c[0] + c[1], c[2]], [c[2], c[0] - c[1]]])
    m = sym @ rotation_matrix(p[8], optics.transpose)
    return _bare(m, np.array(c[3:]), float(p[8]), optics.transpose)


def _bare(m: np.ndarray, higher_A: np.ndarray, rotation_rad: float,
          transpose: bool) -> HigherOrderFit:  # fmt: skip
    """M, the higher orders and the geometry, without uncertainties or tiles."""
    return HigherOrderFit(m, higher_A, np.zeros((8, 8)), rotation_rad, transpose, float("nan"),
                          0, np.zeros((0, 2)))  # fmt: skip
