"""tcBF image: shift-and-add of the per-BF-pixel virtual-BF images on an upsampled grid.

Pure numerics (tcbf-physics.md sect. 6): the value of BF pixel i measured at scan position r is
deposited at f (r + s_i) on a grid f times finer than the scan (bilinear "kernel density"
splat into a numerator and a weight accumulator), both are smoothed with a Gaussian of 0.125
scan px and divided. Each BF pixel's values are first divided by that pixel's mean, so the image
is ~1 with relative contrast. `phase_flip` then multiplies the image spectrum by
sign(sin chi(q)) so that the transfer no longer changes sign.

Deposition is additive, so `ShiftAndAdd` deposits newly acquired positions as they arrive and
rebuilds from the stored per-pixel stack only when the shifts change by more than a tolerance.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
import scipy.ndimage as ndi

from tcbf_live.stream.tcbf.kernels import deposit, ring_sums, window_column_sums
from tcbf_live.stream.tcbf.optics import quadratic_chi

KDE_SIGMA_SCAN_PX = 0.125  # Gaussian smoothing of the splat, in scan pixels
MAX_UPSAMPLING = 8


def default_upsampling(
    step_A: float | None,
    wavelength_A: float | None,
    semiangle_mrad: float | None,
    detector_px: int | None = None,
    angular_sampling_mrad: float | None = None,
) -> int:
    """f = round(2 alpha dx / lambda) (the BF information limit in scan px), at least 1,
    capped at MAX_UPSAMPLING and at the detector's reach dx N dk; 2 when the optics are unknown."""
    if not (step_A and wavelength_A and semiangle_mrad):
        return 2
    f = 2.0 * semiangle_mrad * 1e-3 * step_A / wavelength_A
    if detector_px and angular_sampling_mrad:
        f = min(f, step_A * detector_px * angular_sampling_mrad * 1e-3 / wavelength_A)
    return int(np.clip(round(f), 1, MAX_UPSAMPLING))


def splat_weights(shifts_up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets (N, 2) and bilinear weights (N, 4) for shifts in upsampled px.

    With an integer factor, f r + s = f r + floor(s) + frac(s): the fractional part (hence the
    four weights) depends on the BF pixel only, so it is computed once per shift model."""
    base = np.floor(shifts_up)
    fr = shifts_up - base
    w = np.stack([(1 - fr[:, 0]) * (1 - fr[:, 1]), (1 - fr[:, 0]) * fr[:, 1],
                  fr[:, 0] * (1 - fr[:, 1]), fr[:, 0] * fr[:, 1]], axis=1)  # fmt: skip
    return base.astype(np.int64), w


def window_pixel_means(stack: np.ndarray, exposure: np.ndarray, window, scan_cols: int):
    """(mean per unit exposure of each BF pixel over the window (N_bf,), exposure summed)."""
    (r0, r1), (c0, c1) = window
    out = np.zeros(stack.shape[1])
    total = window_column_sums(stack, np.asarray(exposure, np.float64),
                                np.array([r0, r1], np.int64), np.array([c0, c1], np.int64),
                                scan_cols, out)  # fmt: skip
    return out / max(total, 1e-12), total


def pixel_gains(stack: np.ndarray, exposure: np.ndarray) -> np.ndarray:
    """Mean value per frame of each BF pixel over the acquired positions (N_bf,), in one pass
    without copying the stack (the whole scan as one window of a single column)."""
    means, frames = window_pixel_means(stack, exposure, ((0, stack.shape[0]), (0, 1)), 1)
    if frames == 0:
        return np.ones(stack.shape[1])
    return np.maximum(means, 1e-12)


EXPOSURE_TOLERANCE = 0.02  # relative change of a position's exposure that re-deposits it


def exposure_changed(new: np.ndarray, old: np.ndarray,
                     tolerance: float = EXPOSURE_TOLERANCE) -> np.ndarray:  # fmt: skip
    """Positions whose exposure (frames x relative dose) appeared, vanished or changed by more
    than EXPOSURE_TOLERANCE: the dose model is refined at every update by tiny amounts, which
    must not force a rebuild each time."""
    return np.abs(new - old) > tolerance * np.maximum(np.abs(old), 1e-12)


class ShiftAndAdd:
    """Upsampled shift-and-add accumulator for one series (num / den, incremental).

    It is kept as two half-set accumulators, `half[i]` saying which one BF pixel i feeds (a
    checkerboard of detector pixels gives two independent halves that both cover the whole
    scan: their Fourier ring correlation measures the resolution); the image is their sum."""

    def __init__(self, scan_shape: tuple[int, int], factor: int, tolerance_px: float = 0.1,
                 half: np.ndarray | None = None):  # fmt: skip
        self.scan_shape = scan_shape
        self.factor = int(factor)
        self.tolerance_px = tolerance_px  # shift change (scan px) x factor that forces a rebuild
        self.half = None if half is None else np.asarray(half, np.int64)
        # one accumulator channel per value of `half` (two halves; more: `channel_image`)
        channels = 2 if self.half is None else max(2, int(self.half.max()) + 1)
        shape = (scan_shape[0] * self.factor, scan_shape[1] * self.factor, channels)
        self.num = np.zeros(shape)
        self.den = np.zeros(shape)
        self.shifts_px: np.ndarray | None = None
        self.deposited = np.zeros(scan_shape[0] * scan_shape[1])  # exposure deposited
        self.rebuilds = 0
        self._inv_gain: np.ndarray | None = None
        self._splat: tuple[np.ndarray, np.ndarray] | None = None
        self.excluded_px: np.ndarray | None = None  # BF pixels left out of the image

    def update(
        self, stack: np.ndarray, exposure: np.ndarray, shifts_px: np.ndarray,
        tolerance_px: float | None = None, exposure_tolerance: float = EXPOSURE_TOLERANCE,
        excluded_px: np.ndarray | None = None,
    ) -> bool:  # fmt: skip
        """Bring the image up to date with `stack`/`exposure`; True if it was rebuilt.

        New positions are deposited with the shifts in use. A rebuild (from the whole stack,
        with fresh per-pixel gains) happens when the shifts moved by more than `tolerance_px`
        (default the instance's) / f scan px, or when already deposited positions received
        more frames (repeat scans) or a changed exposure (more than `exposure_tolerance`
        relative), or when the BF pixels left out (`excluded_px`, bool (N_bf,): e.g. a pixel
        that turned hot) changed."""
        tol = self.tolerance_px if tolerance_px is None else tolerance_px
        exposure = np.asarray(exposure, np.float64).ravel()
        excluded = (np.zeros(stack.shape[1], bool) if excluded_px is None
                    else np.asarray(excluded_px, bool))  # fmt: skip
        changed = exposure_changed(exposure, self.deposited, exposure_tolerance)
        stale = (
            self.shifts_px is None
            or self.shifts_px.shape != shifts_px.shape
            or np.max(np.abs(shifts_px - self.shifts_px)) * self.factor > tol
            or bool(np.any(self.deposited[changed] > 0))
            or not np.array_equal(excluded, self._excluded_or_none(excluded))
        )
        if stale:
            self.num[:] = 0.0
            self.den[:] = 0.0
            self.shifts_px = np.array(shifts_px, float)
            self.excluded_px = excluded
            self._inv_gain = 1.0 / pixel_gains(stack, exposure)
            offsets, weights = splat_weights(self.shifts_px * self.factor)
            self._inv_gain[excluded] = 0.0  # left out: no value and no weight
            weights[excluded] = 0.0
            self._splat = (offsets, weights)
            positions = np.flatnonzero(exposure)
            self.rebuilds += 1
        else:
            positions = np.flatnonzero(changed)
        if positions.size:
            offsets, weights = self._splat
            half = self.half if self.half is not None else np.zeros(stack.shape[1], np.int64)
            deposit(stack, exposure, positions.astype(np.int64), self.scan_shape[1], self.factor,
                    offsets, weights, self._inv_gain, half, self.num, self.den)  # fmt: skip
        self.deposited[positions] = exposure[positions]
        return stale

    def _excluded_or_none(self, like: np.ndarray) -> np.ndarray:
        """The pixels left out so far (none before the first exclusion)."""
        return self.excluded_px if self.excluded_px is not None else np.zeros_like(like)

    def coverage(self) -> np.ndarray:
        """Smooth weight (0..1) of where data landed: 1 inside the acquired area, falling to 0
        over ~2 scan px at its edges (and at missing positions)."""
        den = self.den.sum(axis=2)
        covered = (den > 1e-3 * max(float(den.max()), 1e-30)).astype(np.float32)
        return ndi.gaussian_filter(covered, 1.0 * self.factor, mode="constant")

    def images(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(full, half 0, half 1): num / den after Gaussian smoothing (sigma 0.125 scan px),
        1 where nothing landed. The smoothing is linear, so the full image reuses the halves'."""
        sigma = KDE_SIGMA_SCAN_PX * self.factor
        num = [ndi.gaussian_filter(self.num[..., h], sigma, mode="constant") for h in (0, 1)]
        den = [ndi.gaussian_filter(self.den[..., h], sigma, mode="constant") for h in (0, 1)]
        return (_ratio(num[0] + num[1], den[0] + den[1]), _ratio(num[0], den[0]),
                _ratio(num[1], den[1]))  # fmt: skip

    def channel_image(self, channel: int) -> np.ndarray:
        """The image of one accumulator channel (the pixels whose `half` is `channel`),
        smoothed as `images`; 1 where nothing landed."""
        sigma = KDE_SIGMA_SCAN_PX * self.factor
        return _ratio(ndi.gaussian_filter(self.num[..., channel], sigma, mode="constant"),
                      ndi.gaussian_filter(self.den[..., channel], sigma, mode="constant"))


class RingImages:
    """Virtual-BF images of `n_rings` equal-width annuli of the BF disk, per unit exposure (for
    a live axial-radius control: the vBF of radius r is the sum of the rings inside r),
    recomputed only where a position's exposure changed."""

    def __init__(self, k_px: np.ndarray, radius_px: float, n_rings: int):
        self.edges_px = radius_px * np.arange(1, n_rings + 1) / n_rings  # outer radii
        ring_of = np.minimum(np.searchsorted(self.edges_px, np.hypot(*k_px.T)), n_rings - 1)
        self._ring_of = ring_of.astype(np.int64)
        self._rings: np.ndarray | None = None  # (n_rings, n_pos)
        self._exposure: np.ndarray | None = None  # what each position was computed with

    def update(self, stack: np.ndarray, exposure: np.ndarray, scan_shape: tuple[int, int]):
        """(outer radii (n_rings,), images (n_rings, rows, cols)), a copy."""
        if self._rings is None:
            self._rings = np.zeros((len(self.edges_px), stack.shape[0]), np.float32)
            self._exposure = np.zeros(stack.shape[0])
        changed = np.flatnonzero(exposure_changed(exposure, self._exposure))
        ring_sums(stack, exposure, changed.astype(np.int64), self._ring_of, self._rings)
        self._exposure[changed] = exposure[changed]
        return self.edges_px, self._rings.reshape(len(self.edges_px), *scan_shape).copy()


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    good = den > 1e-3 * max(float(den.max()), 1e-30)
    out = np.ones_like(num)
    np.divide(num, den, out=out, where=good)
    return out.astype(np.float32)


def phase_flip(
    image: np.ndarray,
    sampling_A: float,
    wavelength_A: float,
    p_A: np.ndarray,
    q_max_per_A: float | None = None,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """Multiply the spectrum of (image - mean) by sign(sin chi(q)), zero beyond `q_max_per_A`
    (the information limit 2 alpha / lambda) and at q = 0.

    `weight` (0..1, e.g. `ShiftAndAdd.coverage`) tapers the image to zero where there are no
    data before filtering (sign(sin chi) is a long-range kernel: a hard edge rings), and masks
    the result there.

    With our conventions (psi = IFFT[A exp(-i chi)], C10 = -defocus, images normalised to mean
    1) the tcBF image is 1 + c sin(chi) phase with c > 0, so the result is proportional to +phase
    (bright where the sample adds phase), for either sign of the defocus (tested)."""
    chi, q = quadratic_chi(image.shape, sampling_A, wavelength_A, np.asarray(p_A, float))
    flip = np.sign(np.sin(chi))
    if q_max_per_A is not None:
        flip[q > q_max_per_A] = 0.0
    flip[0, 0] = 0.0
    centred = image - image.mean()
    if weight is not None:
        inside = weight > 0.5
        centred = (image - image[inside].mean() if inside.any() else centred) * weight
    spec = sfft.fft2(centred, workers=1)
    out = sfft.ifft2(spec * flip, workers=1).real.astype(np.float32)
    return out * (weight > 0.5) if weight is not None else out
