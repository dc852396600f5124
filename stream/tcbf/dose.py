"""Dose and resolution from the data: pure numerics (tcbf-physics.md sect. 8).

- Dose: electrons = counts / counts-per-electron (masked pixels are never counted), dose per
  position N_e / step^2 (e/A^2), beam current from the dwell time.
- Resolution: Fourier ring correlation (FRC) of two independent half reconstructions (a
  checkerboard of BF pixels), with the 0.143 threshold (Rosenthal & Henderson 2003) and the
  half-bit threshold (van Heel & Schatz 2005), and the spectral SNR of the full data
  2 FRC / (1 - FRC).
- Projection: a power law d = a D^-p fitted to the resolution-versus-dose history predicts the
  dose for a target resolution (an estimate, labelled so wherever it is shown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from tcbf_live.stream.tcbf.optics import quadratic_chi
from tcbf_live.stream.tcbf.tiles import TileSet

FRC_THRESHOLD = 0.143
ELEMENTARY_CHARGE_C = 1.602176634e-19
MIN_RING_PIXELS = 500  # below this a ring's FRC of pure noise exceeds 0.143 too often (> 3 sd)
LOWEST_RINGS = 2  # skipped when looking for the crossing (few pixels, near-DC contrast)
TRANSFER_FLOOR = 0.3  # FRC: frequencies where |sin chi| is below this are left out


def half_bit_threshold(n_pixels: np.ndarray) -> np.ndarray:
    """van Heel & Schatz (2005) half-bit threshold for rings of n pixels."""
    s = np.sqrt(np.maximum(n_pixels, 1.0))
    return (0.2071 + 1.9102 / s) / (1.2071 + 0.9102 / s)


def beam_current_pA(electrons_per_frame: float, dwell_s: float | None) -> float | None:
    """I = N_e e / t_dwell (1 pA x 1 us = 6.24 electrons)."""
    if not dwell_s or dwell_s <= 0:
        return None
    return electrons_per_frame * ELEMENTARY_CHARGE_C / dwell_s * 1e12


@dataclass(frozen=True)
class FRC:
    """Fourier ring correlation curve."""

    q_per_A: np.ndarray  # (rings,) ring centre frequency (1/A; 1/px when sampling unknown)
    frc: np.ndarray  # (rings,)
    n_pixels: np.ndarray  # (rings,) Fourier pixels per ring

    @property
    def ssnr(self) -> np.ndarray:
        """Spectral SNR of the full (two-half) data, 2 FRC / (1 - FRC)."""
        f = np.clip(self.frc, -0.999, 0.999)
        return 2 * f / (1 - f)

    def resolution_range_A(self, threshold: str = "0.143") -> tuple[float, float]:
        """(better, worse): the crossings of the curve one sigma (1/sqrt(ring pixels), the FRC
        of noise) above and one below it, the search starting where the curve itself first
        rises (so both bracket `resolution_A`; NaN: not determined at that end); the spread a
        single curve's noise allows."""
        start = self._search(threshold, 0.0)[0]
        if start is None:
            return (math.nan, math.nan)
        ends = [self._search(threshold, k, start)[1] for k in (+1.0, -1.0)]
        d = [e[0] for e in ends]
        if any(math.isnan(x) for x in d):
            return (d[0], d[1])
        return (min(d), max(d))

    def resolution_A(self, threshold: str = "0.143",
                     sigmas: float = 0.0) -> tuple[float, bool]:  # fmt: skip
        """(d, limited): d = 1/q where the FRC drops below the threshold for good, after it
        has first been above it for two rings (the lowest rings skipped): the first ring below
        it whose next ring is below it too, so a single-ring dip at a zero of the contrast
        transfer (sin chi = 0) does not end the count (linear interpolation between rings).
        Rings without Fourier pixels (all outside `fourier_ring_correlation`'s transfer mask)
        are left out. If it never drops, d is the highest frequency measured and `limited` is
        True (the sampling, not the data, limits). If it is never above, d is NaN: not
        determined."""
        return self._search(threshold, sigmas)[1]

    def _search(self, threshold: str, sigmas: float,
                start: int | None = None) -> tuple[int | None, tuple[float, bool]]:  # fmt: skip
        """(the ring where the search started, (d, limited)) for the curve `sigmas` sigma up;
        `start`: begin there instead of where this curve first rises (indices of the rings
        with pixels)."""
        valid = self.n_pixels > 0
        q, n = self.q_per_A[valid], self.n_pixels[valid]
        t = np.full(len(q), FRC_THRESHOLD) if threshold == "0.143" else half_bit_threshold(n)
        frc = self.frc[valid] + sigmas / np.sqrt(n)
        low = frc < t
        stays = low & np.append(low[1:], True)  # below here and at the next ring
        high = ~low & np.append(~low[1:], False)  # above here and at the next ring
        # the search starts where the curve is first above the threshold for two rings: below
        # that, tcBF transfers little (sin chi ~ 0 near q = 0), and on a large image (a 256x256
        # scan) several rings fall in that gap: "resolution 278 A" was its lower edge
        if start is None:
            rises = np.flatnonzero(high[LOWEST_RINGS:]) + LOWEST_RINGS
            if rises.size == 0:
                return None, (math.nan, False)  # never above the threshold: not determined
            start = int(rises[0])
        below = np.flatnonzero(stays[start:]) + start
        if below.size == 0:
            return start, (1.0 / float(q[-1]), True)
        i = int(below[0])
        if i == 0:
            return start, (math.nan, False)
        f0, f1 = frc[i - 1] - t[i - 1], frc[i] - t[i]
        if f0 <= 0:  # no crossing between ring i - 1 and ring i
            return start, (math.nan, False)
        x = f0 / (f0 - f1)
        return start, (1.0 / float(q[i - 1] + x * (q[i] - q[i - 1])), False)


def fourier_ring_correlation(
    a: np.ndarray,
    b: np.ndarray,
    sampling_A: float | None = None,
    weight: np.ndarray | None = None,
    ring_px: float = 2.0,
    transfer: np.ndarray | None = None,
) -> FRC:
    """FRC(q) = Re sum F1 F2* / sqrt(sum |F1|^2 sum |F2|^2) over rings of width `ring_px`
    frequency steps of the image's shorter side, up to its Nyquist frequency.

    Both images get the same treatment: minus their (weighted) mean, times `weight` (a taper
    that is 0 where there are no data). `transfer` (the FFT grid, bool): the frequencies that
    count; tcBF passes where |sin chi| >= TRANSFER_FLOOR, so that a zero of the contrast
    transfer, where no dose brings signal, does not read as the resolution limit."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if weight is None:
        weight = np.ones_like(a)
    inside = weight > 0.5
    if not inside.any():  # nothing covered yet (a partial scan's first rows): no signal
        inside = np.ones_like(inside)
    fa = sfft.fft2((a - a[inside].mean()) * weight, workers=1)
    fb = sfft.fft2((b - b[inside].mean()) * weight, workers=1)
    rows, cols = a.shape
    step = sampling_A or 1.0
    q0 = sfft.fftfreq(rows, step)[:, None]
    q1 = sfft.fftfreq(cols, step)[None, :]
    q = np.hypot(q0, q1)
    dq = 1.0 / (min(rows, cols) * step)
    nyquist = 0.5 / step
    n_rings = max(1, int(nyquist / (ring_px * dq)))
    ring = np.floor(q / (ring_px * dq)).astype(np.int64)
    keep = (ring < n_rings) & (q > 0) & (True if transfer is None else transfer)
    idx = ring[keep]
    cross = np.bincount(idx, (fa * np.conj(fb)).real[keep], n_rings)
    pa = np.bincount(idx, (np.abs(fa) ** 2)[keep], n_rings)
    pb = np.bincount(idx, (np.abs(fb) ** 2)[keep], n_rings)
    n = np.bincount(idx, minlength=n_rings).astype(np.float64)
    frc = np.where(pa * pb > 0, cross / np.sqrt(np.maximum(pa * pb, 1e-300)), 0.0)
    centres = (np.arange(n_rings) + 0.5) * ring_px * dq
    return FRC(centres, frc, n)


def transfer_mask(shape: tuple[int, int], sampling_A: float | None, wavelength_A: float | None,
                  p_A: np.ndarray | None) -> np.ndarray | None:  # fmt: skip
    """Frequencies of an image (FFT grid) where the tcBF contrast transfer |sin chi| is at
    least TRANSFER_FLOOR (chi of the fitted defocus and astigmatism): what the FRC counts.
    None (every frequency) without the aberrations, the sampling or the wavelength."""
    if p_A is None or not sampling_A or not wavelength_A:
        return None
    chi, _ = quadratic_chi(shape, sampling_A, wavelength_A, np.asarray(p_A, float))
    return np.abs(np.sin(chi)) >= TRANSFER_FLOOR


def dose_for_resolution(target_A: float, history: np.ndarray) -> float | None:
    """Dose (e/A^2) at which a power law fitted to `history` (rows: dose, resolution in A, and
    optionally its range: better, worse; resolution-limited points excluded by the caller)
    reaches `target_A`. With a range each point weighs by its inverse spread in log
    resolution (an FRC crossing that one noisy ring moves counts little), else equally. None
    when the history does not show the resolution improving with dose. An estimate."""
    h = np.asarray(history, float)
    h = h.reshape(-1, h.shape[-1] if h.ndim > 1 else 2)
    if h.shape[1] >= 4:  # the range, where both ends are known; else a factor 1.5 each way
        spread = np.log(h[:, 3] / h[:, 2]) / 2
        spread = np.where(np.isfinite(spread) & (spread > 0), spread, math.log(1.5))
        h = np.column_stack([h[:, :2], np.maximum(spread, 0.02)])
    else:
        h = np.column_stack([h[:, :2], np.ones(len(h))])
    h = h[np.isfinite(h).all(axis=1) & (h[:, 0] > 0) & (h[:, 1] > 0)]
    if len(h) < 2 or np.ptp(np.log(h[:, 0])) < 0.1:
        return None
    slope, intercept = np.polyfit(np.log(h[:, 0]), np.log(h[:, 1]), 1, w=1.0 / h[:, 2])
    if not slope < -0.05:
        return None
    dose = math.exp((math.log(target_A) - intercept) / slope)
    return dose if math.isfinite(dose) else None


@dataclass(frozen=True)
class LevelTrust:
    """How far one bin level is from being trusted by the alignment schedule."""

    bin_px: int
    n_tiles: int
    min_electrons: float  # smallest electron count among the level's full tiles
    median_electrons: float
    threshold: float
    trusted: bool
    dose_needed_e_per_A2: float | None  # scan-average dose at which it will be (estimate)


def level_trust(levels: dict[int, TileSet], threshold: float, dose: float) -> tuple:
    """Electrons per tile of every bin level against the schedule's threshold (full tiles:
    those holding at least half as many pixels as the largest, as `TileSet.is_trusted`), and
    the dose at which each level will reach it (tile electrons grow with the dose)."""
    out = []
    for b in sorted(levels, reverse=True):
        t = levels[b]
        full = t.electrons[t.n_pixels >= 0.5 * t.n_pixels.max()]
        lowest = float(full.min()) if full.size else 0.0
        needed = dose * threshold / lowest if lowest > 0 and math.isfinite(dose) else None
        out.append(LevelTrust(b, len(t.electrons), lowest, float(np.median(full)) if full.size
                              else 0.0, threshold, t.is_trusted(threshold), needed))  # fmt: skip
    return tuple(out)
