"""Numba kernels of the weak-phase transfer of a BF pixel for a chi to third order.

For the cartesian coefficients c = (C10, C12a, C12b, C21a, C21b, C23a, C23b, C30) in A (scan
frame, `HigherOrderFit.cartesian_A`), W(a) = sum_j c_j w_j(a) (`chi_basis`; grad W is the
correction shift) and chi = 2 pi W / lambda. A BF pixel at scan-frame tilt a sees the weak
phase through (tcbf-physics.md sect. 3; the derivation of Yu et al., Ultramicroscopy 2024)

    T_a(q) = (i/2) [A(a + l q) exp(-i D+) - A(a - l q) exp(+i D-)],
    D+- = chi(a +- l q) - chi(a),

in the convention of `scipy.fft` for the data that is its complex conjugate (measured: the
simulator's images are conj(T_a) times the phase's spectrum). Its linear part in q is the
pixel's shift; what is left is the pixel's own transfer, sin chi(l q) for a quadratic chi.

- `weak_phase_transfer`: the transfer after a given shift has been applied (`full_chi.py`);
- `transfer_objective`: the profile likelihood of the pixels' spectra for one chi, with its
  gradient in the eight coefficients (`transfer_fit.py`).
Compiled once and cached, releasing the GIL, as `kernels.py`.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def chi_basis(ax, ay, out):
    """out[j] = w_j(ax, ay) in A per A: W of a unit coefficient j at scan-frame tilt (rad)."""
    a2 = ax * ax + ay * ay
    out[0] = 0.5 * a2
    out[1] = 0.5 * (ax * ax - ay * ay)
    out[2] = ax * ay
    out[3] = ax * a2 / 3.0
    out[4] = ay * a2 / 3.0
    out[5] = (ax * ax * ax - 3.0 * ax * ay * ay) / 3.0
    out[6] = (3.0 * ax * ax * ay - ay * ay * ay) / 3.0
    out[7] = 0.25 * a2 * a2


@numba.njit(nogil=True, cache=True)
def chi_polynomial_A(c, ax, ay):
    """W (A) at scan-frame tilt (ax, ay) rad of the cartesian coefficients c (8,)."""
    a2 = ax * ax + ay * ay
    return (0.5 * c[0] * a2 + 0.5 * (c[1] * (ax * ax - ay * ay) + 2.0 * c[2] * ax * ay)
            + (c[3] * ax + c[4] * ay) * a2 / 3.0
            + (c[5] * (ax * ax * ax - 3.0 * ax * ay * ay)
               + c[6] * (3.0 * ax * ax * ay - ay * ay * ay)) / 3.0
            + 0.25 * c[7] * a2 * a2)  # fmt: skip


@numba.njit(nogil=True, cache=True)
def weak_phase_transfer(q0, q1, alpha, shifts_A, c, wavelength_A, amax, out):
    """out[i, j] += sum over the pixels (scan-frame tilts `alpha`, applied shifts `shifts_A`) of
    their weak-phase transfer S_a(q0[i], q1[j]) after the shift (`full_chi.py`), not averaged."""
    k = 2.0 * math.pi / wavelength_A
    for p in range(alpha.shape[0]):
        ax, ay = alpha[p, 0], alpha[p, 1]
        w0 = chi_polynomial_A(c, ax, ay)
        for i in range(q0.size):
            for j in range(q1.size):
                lx, ly = wavelength_A * q0[i], wavelength_A * q1[j]
                lin = 2.0 * math.pi * (q0[i] * shifts_A[p, 0] + q1[j] * shifts_A[p, 1])
                s = 0j
                bx, by = ax + lx, ay + ly
                if bx * bx + by * by <= amax * amax:
                    d = k * (chi_polynomial_A(c, bx, by) - w0) - lin
                    s += complex(math.cos(d), -math.sin(d))
                bx, by = ax - lx, ay - ly
                if bx * bx + by * by <= amax * amax:
                    d = k * (chi_polynomial_A(c, bx, by) - w0) + lin
                    s -= complex(math.cos(d), math.sin(d))
                out[i, j] += 0.5j * s


@numba.njit(nogil=True, cache=True)
def chi_gradient_A(c, ax, ay):
    """grad W (A per rad) at scan-frame tilt (ax, ay): the correction shift of that tilt."""
    a2 = ax * ax + ay * ay
    gx = (c[0] * ax + c[1] * ax + c[2] * ay + c[3] * (a2 + 2.0 * ax * ax) / 3.0
          + c[4] * 2.0 * ax * ay / 3.0 + c[5] * (ax * ax - ay * ay) + c[6] * 2.0 * ax * ay
          + c[7] * a2 * ax)  # fmt: skip
    gy = (c[0] * ay - c[1] * ay + c[2] * ax + c[3] * 2.0 * ax * ay / 3.0
          + c[4] * (a2 + 2.0 * ay * ay) / 3.0 - c[5] * 2.0 * ax * ay + c[6] * (ax * ax - ay * ay)
          + c[7] * a2 * ay)  # fmt: skip
    return gx, gy


@numba.njit(nogil=True, cache=True)
def _side(c, ax, ay, lx, ly, k, w0, g0, b0, b, amax, ramp, weight, sign, dt):
    """One sideband sign * A(b) exp(-sign i D), b = a + sign l q, D = chi(b) - chi(a), of T_a;
    its derivatives in the eight coefficients and the rotation (a moves by J a, J the quarter
    turn: d a / d theta) added to dt. 0 outside the aperture; its edge a linear ramp."""
    bx, by = ax + sign * lx, ay + sign * ly
    r = math.sqrt(bx * bx + by * by)
    amp = 0.5 - (r - amax) / ramp
    if amp <= 0.0:
        return 0j
    d_amp = 0.0 if amp >= 1.0 or r == 0.0 else -(bx * -ay + by * ax) / (r * ramp)
    amp = min(amp, 1.0) * weight
    chi_basis(bx, by, b)
    d = 0.0
    for j in range(8):
        d += c[j] * b[j]
    d = k * (d - w0)
    phase = complex(math.cos(d), -sign * math.sin(d))
    e = amp * phase
    for j in range(8):
        dt[j] += sign * e * complex(0.0, -sign * k * (b[j] - b0[j]))
    gx, gy = chi_gradient_A(c, bx, by)
    d_theta = k * ((gx - g0[0]) * -ay + (gy - g0[1]) * ax)
    dt[8] += sign * (e * complex(0.0, -sign * d_theta) + d_amp * weight * phase)
    return sign * e


@numba.njit(nogil=True, cache=True)
def transfer_objective(c, alpha, sub_w, weights, q, spectra, wavelength_A, amax, ramp, grad):
    """F(c) = sum_q |Z(q)|^2 / P(q), Z = sum_a w_a T_a(q) I_a(q), P = sum_a w_a |T_a(q)|^2: the
    pixels' spectra I_a (N_a, N_q) explained by one object per frequency (the profile
    likelihood, `transfer_fit.py`); its gradient in c and in the rotation of the tilts written
    to grad (9,). A pixel's transfer is the sub_w-weighted mean over its sub-tilts alpha
    (N_a, N_s, 2), scan frame; the aperture's edge is a linear ramp `ramp` rad wide."""
    k = 2.0 * math.pi / wavelength_A
    b0, b, g0 = np.empty(8), np.empty(8), np.empty(2)
    dt, dz, dp = np.empty(9, np.complex128), np.empty(9, np.complex128), np.empty(9)
    grad[:] = 0.0
    f = 0.0
    for iq in range(q.shape[0]):
        lx, ly = wavelength_A * q[iq, 0], wavelength_A * q[iq, 1]
        z, p = 0j, 0.0
        dz[:] = 0j
        dp[:] = 0.0
        for a in range(alpha.shape[0]):
            t = 0j
            dt[:] = 0j
            for s in range(alpha.shape[1]):
                if sub_w[a, s] == 0.0:
                    continue
                ax, ay = alpha[a, s, 0], alpha[a, s, 1]
                chi_basis(ax, ay, b0)
                w0 = 0.0
                for j in range(8):
                    w0 += c[j] * b0[j]
                g0[0], g0[1] = chi_gradient_A(c, ax, ay)
                for sign in (1.0, -1.0):
                    t += _side(c, ax, ay, lx, ly, k, w0, g0, b0, b, amax, ramp, sub_w[a, s],
                               sign, dt)  # fmt: skip
            if t == 0j:
                continue
            t *= 0.5j
            wa, spec = weights[a], spectra[a, iq]
            z += wa * t * spec
            p += wa * (t.real * t.real + t.imag * t.imag)
            for j in range(9):
                d = 0.5j * dt[j]
                dz[j] += wa * d * spec
                dp[j] += 2.0 * wa * (t.real * d.real + t.imag * d.imag)
        if p <= 0.0:
            continue
        zz = z.real * z.real + z.imag * z.imag
        f += zz / p
        for j in range(9):
            grad[j] += 2.0 * (z.real * dz[j].real + z.imag * dz[j].imag) / p - zz * dp[j] / (p * p)
    return f
