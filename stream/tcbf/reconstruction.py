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

import math

import numba
import numpy as np
import scipy.fft as sfft
import scipy.ndimage as ndi

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


@numba.njit(nogil=True, cache=True, fastmath=True)
def deposit(
    stack: np.ndarray,  # (n_pos, N_bf) per-BF-pixel values
    exposure: np.ndarray,  # (n_pos,) exposure per position (frames x relative dose; 0: none)
    positions: np.ndarray,  # (M,) flat positions to deposit
    cols: int,
    factor: int,
    offsets: np.ndarray,  # (N_bf, 2) int64 from splat_weights
    weights: np.ndarray,  # (N_bf, 4)
    inv_gain: np.ndarray,  # (N_bf,) 1 / mean value of each BF pixel
    half: np.ndarray,  # (N_bf,) int: which half-set accumulator the pixel feeds (0 or 1)
    num: np.ndarray,  # (rows f, cols f, 2) float64: the halves interleaved (cache locality)
    den: np.ndarray,  # (rows f, cols f, 2) float64
) -> None:
    n_bf = stack.shape[1]
    h_max, w_max = num.shape[0], num.shape[1]
    for j in positions:
        h = exposure[j]
        if h == 0:
            continue
        r = j // cols
        c = j - r * cols
        scale = 1.0 / h
        row = stack[j]
        for i in range(n_bf):
            v = row[i] * inv_gain[i] * scale
            pr = r * factor + offsets[i, 0]
            pc = c * factor + offsets[i, 1]
            hh = half[i]
            if 0 <= pr and pr + 1 < h_max and 0 <= pc and pc + 1 < w_max:
                num[pr, pc, hh] += weights[i, 0] * v
                den[pr, pc, hh] += weights[i, 0]
                num[pr, pc + 1, hh] += weights[i, 1] * v
                den[pr, pc + 1, hh] += weights[i, 1]
                num[pr + 1, pc, hh] += weights[i, 2] * v
                den[pr + 1, pc, hh] += weights[i, 2]
                num[pr + 1, pc + 1, hh] += weights[i, 3] * v
                den[pr + 1, pc + 1, hh] += weights[i, 3]
            else:
                for q in range(4):
                    rr = pr + q // 2
                    cc = pc + q % 2
                    if 0 <= rr < h_max and 0 <= cc < w_max:
                        num[rr, cc, hh] += weights[i, q] * v
                        den[rr, cc, hh] += weights[i, q]


@numba.njit(nogil=True, cache=True)
def _group_sums(stack, exposure, rows, cols, scan_cols, group_of, out):
    """out[p, g] = sum over BF pixels i of group g of stack[p, i] / exposure[p] (frames x
    relative dose), for the positions
    p of the window rows [rows[0], rows[1]) x cols [cols[0], cols[1]) (row-major)."""
    width = cols[1] - cols[0]
    for r in range(rows[0], rows[1]):
        for c in range(cols[0], cols[1]):
            p = r * scan_cols + c
            h = exposure[p]
            if h == 0:
                continue
            scale = 1.0 / h
            dst = out[(r - rows[0]) * width + (c - cols[0])]
            row = stack[p]
            for i in range(row.shape[0]):
                dst[group_of[i]] += row[i] * scale


@numba.njit(nogil=True, cache=True)
def _scatter_groups(groups_t, valid, tile_of_group, move, members, out, count):
    """Add every group image (groups_t[g], row-major over the window) moved by its integer
    shift into its tile; then mean per member, and the tile's mean where nothing landed."""
    n_tiles, n_rows, width = out.shape
    for g in range(groups_t.shape[0]):
        t = tile_of_group[g]
        dr = move[g, 0]
        dc = move[g, 1]
        m = members[g]
        src = groups_t[g]
        for r in range(max(0, -dr), min(n_rows, n_rows - dr)):
            base = r * width
            for c in range(max(0, -dc), min(width, width - dc)):
                if valid[base + c]:
                    out[t, r + dr, c + dc] += src[base + c]
                    count[t, r + dr, c + dc] += m
    for t in range(n_tiles):
        total = 0.0
        covered = 0
        for r in range(n_rows):
            for c in range(width):
                if count[t, r, c] > 0:
                    out[t, r, c] /= count[t, r, c]
                    total += out[t, r, c]
                    covered += 1
        fill = total / covered if covered else 0.0
        for r in range(n_rows):
            for c in range(width):
                if count[t, r, c] == 0:
                    out[t, r, c] = fill


class PixelGroups:
    """BF pixels grouped by (finest tile, integer shift), with their summed images over a scan
    window: one pass over the per-pixel stack serves every bin level (levels nest, so each
    group lies in one tile of every level), and each level then moves a few hundred group
    images instead of thousands of pixel images."""

    def __init__(self, stack, exposure, rows, cols, scan_cols, finest_tile, move, matrix_px=None):
        self.matrix_px = matrix_px  # the model the integer shifts came from
        keys = np.column_stack([finest_tile, move])
        uniq, first, group_of = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        self.first_pixel = first
        self.move = np.ascontiguousarray(uniq[:, 1:], dtype=np.int64)
        self.members = np.bincount(group_of.ravel(), minlength=len(uniq)).astype(np.float32)
        self.shape = (rows[1] - rows[0], cols[1] - cols[0])
        self.sums = np.zeros((self.shape[0] * self.shape[1], len(uniq)), np.float32)
        _group_sums(stack, exposure, np.asarray(rows, np.int64), np.asarray(cols, np.int64),
                    scan_cols, group_of.ravel().astype(np.int64), self.sums)  # fmt: skip
        self.sums_t = np.ascontiguousarray(self.sums.T)  # (groups, positions) for the scatter
        del self.sums
        window = exposure.reshape(-1, scan_cols)[rows[0] : rows[1], cols[0] : cols[1]]
        self.valid = np.ascontiguousarray(window.ravel() > 0)

    def tile_images(self, pixel_tile: np.ndarray, n_tiles: int) -> np.ndarray:
        """(n_tiles, rows, cols): mean per member of each tile, every pixel moved by its shift."""
        out = np.zeros((n_tiles, *self.shape), np.float32)
        count = np.zeros_like(out)
        tile_of_group = pixel_tile[self.first_pixel].astype(np.int64)
        _scatter_groups(self.sums_t, self.valid, tile_of_group, self.move, self.members, out,
                        count)  # fmt: skip
        return out


@numba.njit(nogil=True, cache=True)
def ring_sums(stack, exposure, positions, ring_of, out) -> None:
    """out[r, p] = counts per frame at position p of the BF pixels in ring r (annuli of the
    disk), recomputed for the given positions: virtual-BF images of any radius are cumulative
    sums of these."""
    for p in positions:
        for r in range(out.shape[0]):
            out[r, p] = 0.0
        h = exposure[p]
        if h == 0:
            continue
        row = stack[p]
        scale = 1.0 / h
        for i in range(row.shape[0]):
            out[ring_of[i], p] += row[i] * scale


@numba.njit(nogil=True, cache=True)
def _window_column_sums(stack, exposure, rows, cols, scan_cols, out) -> float:
    """out[i] = sum of stack[p, i] over the window's positions with exposure; returns the
    exposure summed."""
    total = 0.0
    for r in range(rows[0], rows[1]):
        for c in range(cols[0], cols[1]):
            p = r * scan_cols + c
            if exposure[p] == 0:
                continue
            total += exposure[p]
            row = stack[p]
            for i in range(row.shape[0]):
                out[i] += row[i]
    return total


def window_pixel_means(stack: np.ndarray, exposure: np.ndarray, window, scan_cols: int):
    """(mean per unit exposure of each BF pixel over the window (N_bf,), exposure summed)."""
    (r0, r1), (c0, c1) = window
    out = np.zeros(stack.shape[1])
    total = _window_column_sums(stack, np.asarray(exposure, np.float64),
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
        shape = (scan_shape[0] * self.factor, scan_shape[1] * self.factor, 2)
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


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    good = den > 1e-3 * max(float(den.max()), 1e-30)
    out = np.ones_like(num)
    np.divide(num, den, out=out, where=good)
    return out.astype(np.float32)


def quadratic_chi(
    shape: tuple[int, int], sampling_A: float, wavelength_A: float, p_A: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """chi(q) = pi lambda q^T P q on the FFT grid of an image (scan frame, rows/cols); and |q|.

    P (A, symmetric) is the defocus + 2-fold astigmatism matrix of the shift model, scan frame:
    P = [[C10 + C12a, C12b], [C12b, C10 - C12a]]."""
    q0 = sfft.fftfreq(shape[0], sampling_A)[:, None]
    q1 = sfft.fftfreq(shape[1], sampling_A)[None, :]
    quad = p_A[0, 0] * q0**2 + (p_A[0, 1] + p_A[1, 0]) * q0 * q1 + p_A[1, 1] * q1**2
    return math.pi * wavelength_A * quad, np.hypot(q0, q1)


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
