"""Numba kernels over spectra: the alignment's pass over the tile spectra
(`alignment.align_iteration`) and the missed-trigger check's line correlations
(`slips.slip_lines`).

In the alignment, each tile's spectrum is moved by a Fourier ramp that is separable
(e0[row] x e1[col]), so the ramp is never formed as an array, and each step of the
centre-outwards pass reads and writes a spectrum once: before, the ramps, the conjugate, the
product and the running mean's terms were each a pass over (tiles x) 192 x 192 complex values
(memory-bound).
"""

from __future__ import annotations

import numba
import numpy as np


def ramp_factors(shape: tuple[int, int], shifts_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, P0) and (n, P1) complex64 factors that move content by +shift: the Fourier ramp
    e^{-2 pi i q . s} of each shift is their outer product (F{f(r - s)} = F e^{-2 pi i q s})."""
    s = np.asarray(shifts_px, np.float32).reshape(-1, 2)
    q0 = np.fft.fftfreq(shape[0]).astype(np.float32)
    q1 = np.fft.fftfreq(shape[1]).astype(np.float32)
    e0 = np.exp(-2j * np.pi * s[:, :1] * q0[None, :]).astype(np.complex64)
    e1 = np.exp(-2j * np.pi * s[:, 1:] * q1[None, :]).astype(np.complex64)
    return e0, e1


@numba.njit(nogil=True, cache=True)
def shift_spectra(spectra, e0, e1, share, out, reference) -> None:
    """out[t] = spectra[t] moved by the ramp e0[t] x e1[t]; reference = sum_t share[t] out[t]
    (the weighted mean of the moved tiles when the shares sum to 1)."""
    n, p0, p1 = spectra.shape
    reference[:] = 0
    for t in range(n):
        w = share[t]
        for i in range(p0):
            a = e0[t, i]
            for j in range(p1):
                v = spectra[t, i, j] * (a * e1[t, j])
                out[t, i, j] = v
                reference[i, j] += w * v


@numba.njit(nogil=True, cache=True)
def cross_power(spectrum, reference, out) -> None:
    """out = spectrum x conj(reference): the cross-power spectrum whose peak is the shift."""
    p0, p1 = spectrum.shape
    for i in range(p0):
        for j in range(p1):
            out[i, j] = spectrum[i, j] * np.conj(reference[i, j])


@numba.njit(nogil=True, cache=True)
def blend_moved(reference, spectrum, e0, e1, keep, add) -> None:
    """reference = keep x reference + add x (spectrum moved by the ramp e0 x e1): one step of a
    running weighted mean (keep 0, add 1: replaced)."""
    p0, p1 = spectrum.shape
    for i in range(p0):
        a = e0[i]
        for j in range(p1):
            reference[i, j] = keep * reference[i, j] + add * spectrum[i, j] * (a * e1[j])


@numba.njit(nogil=True, cache=True, fastmath=True)
def slip_votes(
    spectra: np.ndarray,  # (tiles, rows, cols // 2 + 1) rfft of every tile's lines
    ends: np.ndarray,  # (tiles, rows, 2) each line's first and last sample
    cols: int,
    t: np.ndarray,  # (pairs,) tile compared ...
    u: np.ndarray,  # (pairs,) ... with this one
    d: np.ndarray,  # (pairs, 2) their correction-shift difference (rows, cols)
) -> np.ndarray:
    """`slip_lines`' vote sums, (5, rows + 2): per hypothesis "slip at line L", the sums and
    squares of both votes and their count, as differences (a cumulative sum gives them).

    In Fourier space, with no line transformed back: line r of tile t against tile u's line
    r + dr (interpolated between the two nearest) moved by dc along the line (a phase ramp).
    The circular correlation at lag k is sum_q w_q Re(conj(A_q) B_q e^(2 pi i q k / cols)) /
    cols over the half spectrum (w_q = 2, or 1 at q = 0 and at Nyquist, where sin vanishes: the
    imaginary part the ramp gives that coefficient drops out). The one product that wraps round
    at lag +-1 (a's last sample times b's first, or a's first times b's last, b's read from the
    spectrum) is taken off, so each lag averages the cols - |k| products that overlap."""
    rows, nq = spectra.shape[1], spectra.shape[2]
    even = cols % 2 == 0
    weight = np.empty(nq)
    cos = np.empty(nq)
    sin = np.empty(nq)
    for q in range(nq):
        weight[q] = (1.0 if q == 0 or (even and q == nq - 1) else 2.0) / cols
        cos[q] = np.cos(2 * np.pi * q / cols) * weight[q]
        sin[q] = np.sin(2 * np.pi * q / cols) * weight[q]
    ramp_re = np.empty(nq)
    ramp_im = np.empty(nq)
    acc = np.zeros((5, rows + 2))
    for p in range(t.size):
        a, b, dr, dc = t[p], u[p], d[p, 0], d[p, 1]
        n0 = int(np.floor(dr))
        w = dr - n0
        for q in range(nq):
            ramp_re[q] = np.cos(2 * np.pi * q * dc / cols)
            ramp_im[q] = np.sin(2 * np.pi * q * dc / cols)
        for r in range(rows - n0 - 1):
            same = across = along = first = last = 0.0
            for q in range(nq):
                # B = ((1 - w) S_u[r + n0] + w S_u[r + n0 + 1]) * ramp; P = conj(A) B
                near, far, own = spectra[b, r + n0, q], spectra[b, r + n0 + 1, q], spectra[a, r, q]
                s_re = (1 - w) * near.real + w * far.real
                s_im = (1 - w) * near.imag + w * far.imag
                b_re = s_re * ramp_re[q] - s_im * ramp_im[q]
                b_im = s_re * ramp_im[q] + s_im * ramp_re[q]
                p_re = own.real * b_re + own.imag * b_im
                p_im = own.real * b_im - own.imag * b_re
                same += weight[q] * p_re
                across += cos[q] * p_re  # lag +-1: across -+ along
                along += sin[q] * p_im
                first += weight[q] * b_re  # b at column 0 ...
                last += cos[q] * b_re + sin[q] * b_im  # ... and at column cols - 1
            same /= cols
            left = (across + along - ends[a, r, 0] * last) / (cols - 1)  # lag -1
            right = (across - along - ends[a, r, 1] * first) / (cols - 1)  # lag +1
            # a missed trigger moves later content one column left (lag -1); an extra frame
            # right. Line r straddles the hypotheses L = r + 1 ... floor(r + dr)
            lo = r + 1
            hi = min(int(np.floor(r + dr)), rows - 1) + 1
            for row, val in enumerate((left - same, (left - same) ** 2, right - same,
                                       (right - same) ** 2, 1.0)):  # fmt: skip
                acc[row, lo] += val
                acc[row, hi] -= val
    return acc
