"""Sub-pixel image registration by cross-correlation with DFT upsampling.

After Guizar-Sicairos, Thurman & Fienup, Opt. Lett. 33, 156 (2008): locate the integer peak of
the cross-correlation with one FFT, then evaluate the inverse DFT of the cross-power spectrum
only on a small grid of spacing 1/upsample around it (two small matrix products).
Pure numpy: images in, shift out.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft as sfft


@functools.lru_cache(maxsize=32)
def _freqs(n: int) -> np.ndarray:
    return 2j * np.pi * sfft.fftfreq(n)


@functools.lru_cache(maxsize=64)
def _offset_factors(n: int, upsample: int, size: int) -> np.ndarray:
    """(size, n) IDFT factors of the grid's offsets from its centre (shared: never written)."""
    offs = (np.arange(size) - size // 2) / upsample
    factors = np.exp(offs[:, None] * _freqs(n)[None, :])
    factors.setflags(write=False)
    return factors


def _upsampled_idft(spec: np.ndarray, centre: np.ndarray, upsample: int, size: int) -> np.ndarray:
    """IDFT of `spec` on a size x size grid of spacing 1/upsample centred at `centre` (px).
    Each factor e^(2 pi i (centre + offset) q) is the cached offsets' times the centre's: n
    complex exponentials per axis instead of size x n."""
    n0, n1 = spec.shape
    ex = _offset_factors(n0, upsample, size) * np.exp(centre[0] * _freqs(n0))[None, :]
    ey = _offset_factors(n1, upsample, size) * np.exp(centre[1] * _freqs(n1))[None, :]
    return ex.astype(spec.dtype) @ spec @ ey.T.astype(spec.dtype)


def _parabola(m: float, c: float, p: float) -> float:
    """Vertex offset (-0.5..0.5) of a parabola through (-1, m), (0, c), (1, p)."""
    den = m - 2.0 * c + p
    return 0.0 if den >= 0 else float(np.clip(0.5 * (m - p) / den, -0.5, 0.5))


def shift_from_cross_power(cross_power: np.ndarray, upsample: int = 8) -> np.ndarray:
    """Location (row, col) of the peak of IFFT(cross_power), wrapped to [-N/2, N/2)."""
    return correlation_peak(cross_power, upsample)[0]


def correlation_peak(
    cross_power: np.ndarray, upsample: int = 8, max_shift_px: int | None = None
) -> tuple[np.ndarray, float]:
    """Peak location (as `shift_from_cross_power`) and its quality: (peak - mean) / std of the
    correlation map. Pure noise gives ~4-5 for maps of 10^4 px; a real match is far above.

    With `max_shift_px` the integer peak is searched only within that distance of zero, by a
    small direct DFT instead of a full inverse FFT (the mean and std of the map come from the
    spectrum by Parseval): much cheaper when the shift is known to be small (warm start)."""
    shape = np.array(cross_power.shape)
    n = float(cross_power.size)
    if max_shift_px is None:
        corr = sfft.ifft2(cross_power).real
        flat_peak = int(np.argmax(corr))
        top, mean, std = float(corr.flat[flat_peak]), float(corr.mean()), float(corr.std())
        peak = np.array(np.unravel_index(flat_peak, corr.shape), dtype=float)
        peak = np.where(peak >= shape / 2, peak - shape, peak)
    else:
        size = 2 * int(max_shift_px) + 1
        local = _upsampled_idft(cross_power, np.zeros(2), 1, size).real / n
        i, j = np.unravel_index(np.argmax(local), local.shape)
        top = float(local[i, j])
        peak = np.array([i, j], dtype=float) - size // 2
        mean = float(cross_power[0, 0].real) / n
        power = float(np.vdot(cross_power, cross_power).real) / n**2
        std = float(np.sqrt(max(power - mean**2, 0.0)))
    quality = (top - mean) / std if std > 0 else 0.0
    if upsample > 1:
        size = int(np.ceil(1.5 * upsample)) | 1  # odd, so the estimate is a grid point
        fine = _upsampled_idft(cross_power, peak, upsample, size).real
        i, j = np.unravel_index(np.argmax(fine), fine.shape)
        di = _parabola(*fine[i - 1 : i + 2, j]) if 0 < i < size - 1 else 0.0
        dj = _parabola(*fine[i, j - 1 : j + 2]) if 0 < j < size - 1 else 0.0
        peak = peak + (np.array([i + di, j + dj]) - size // 2) / upsample
    return peak, quality


def register_shift(reference: np.ndarray, moving: np.ndarray, upsample: int = 8) -> np.ndarray:
    """Displacement s (row, col) of `moving`'s content relative to `reference`.

    moving(r) ~ reference(r - s). Images are mean-subtracted; periodic boundaries are assumed,
    so taper non-periodic images first.
    """
    ref = sfft.fft2(reference - reference.mean())
    mov = sfft.fft2(moving - moving.mean())
    return shift_from_cross_power(mov * np.conj(ref), upsample)
