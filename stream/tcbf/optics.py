"""Electron optics of the science core: wavelength, aberration phase chi and its gradient.

Written from shared/reference/tcbf-physics.md (sect. 1-3), independently of the simulator,
which is the ground truth the tests hold this module to:
- alpha = lambda k (rad); x is the first array axis (rows), y the second; phi = atan2(a_y, a_x);
- probe psi = IFFT[A exp(-i chi)], chi = (2 pi / lambda) W(alpha), C10 = -defocus;
- polar terms W = sum C_nm alpha^(n+1) / (n+1) cos(m (phi - phi_nm)), keyed like py4DSTEM:
  "C10", "C12", "phi12", "C21", "phi21", ... (A, rad); "defocus" is accepted for -C10;
- grad_alpha W (A) is the tcBF *correction* shift; a vBF image's content moves by minus it.

Unit helpers convert the alignment's detector/scan pixels to rad and A.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import scipy.fft as sfft

# lambda = 12.2643 / sqrt(E (1 + 0.978476e-6 E)) A, E in V (tcbf-physics.md sect. 1): the
# reference's rounded constants, h c / sqrt(2 m c^2) and 1 / (2 m c^2), as the simulator uses
WAVELENGTH_CONSTANT_A_SQRT_V = 12.2643
RELATIVISTIC_CORRECTION_PER_V = 0.978476e-6

_COEFFICIENT = re.compile(r"C(\d)(\d)")


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength (A) for an accelerating voltage in volts."""
    return WAVELENGTH_CONSTANT_A_SQRT_V / math.sqrt(
        energy_eV * (1.0 + RELATIVISTIC_CORRECTION_PER_V * energy_eV)
    )


def polar_terms(aberrations: Mapping[str, float]) -> list[tuple[int, int, float, float]]:
    """(n, m, C_nm in A, phi_nm in rad) of every "Cnm" key ("defocus" counts as -C10)."""
    coefficients = dict(aberrations)
    if "defocus" in coefficients:
        coefficients["C10"] = coefficients.get("C10", 0.0) - coefficients.pop("defocus")
    terms = []
    for key, value in coefficients.items():
        found = _COEFFICIENT.fullmatch(key)
        if found is None:
            if not key.startswith("phi"):
                raise ValueError(f"unknown aberration key {key!r}")
            continue
        n, m = int(found[1]), int(found[2])
        terms.append((n, m, float(value), float(coefficients.get(f"phi{n}{m}", 0.0))))
    return terms


def wave_aberration_A(alpha_x: np.ndarray, alpha_y: np.ndarray,
                      aberrations: Mapping[str, float]) -> np.ndarray:  # fmt: skip
    """W(alpha) in A for tilts in rad (polar expansion, module doc)."""
    ax, ay = np.asarray(alpha_x, float), np.asarray(alpha_y, float)
    alpha, phi = np.hypot(ax, ay), np.arctan2(ay, ax)
    w = np.zeros(np.broadcast(ax, ay).shape)
    for n, m, c, phi_nm in polar_terms(aberrations):
        w = w + c * alpha ** (n + 1) / (n + 1) * np.cos(m * (phi - phi_nm))
    return w


def chi_rad(alpha_x: np.ndarray, alpha_y: np.ndarray, wavelength: float,
            aberrations: Mapping[str, float]) -> np.ndarray:  # fmt: skip
    """Aberration phase chi = (2 pi / lambda) W(alpha) (rad)."""
    return (2.0 * math.pi / wavelength) * wave_aberration_A(alpha_x, alpha_y, aberrations)


def correction_shift_A(
    alpha_x: np.ndarray, alpha_y: np.ndarray, aberrations: Mapping[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """grad_alpha W (A), from the polar form of each term's gradient:
    C alpha^n [cos(m (phi - phi_nm)) e_alpha - m / (n + 1) sin(m (phi - phi_nm)) e_phi]."""
    ax, ay = np.asarray(alpha_x, float), np.asarray(alpha_y, float)
    alpha, phi = np.hypot(ax, ay), np.arctan2(ay, ax)
    radial = np.zeros(np.broadcast(ax, ay).shape)
    azimuthal = np.zeros_like(radial)
    for n, m, c, phi_nm in polar_terms(aberrations):
        scale = c * alpha**n
        radial = radial + scale * np.cos(m * (phi - phi_nm))
        azimuthal = azimuthal - scale * m / (n + 1) * np.sin(m * (phi - phi_nm))
    cos, sin = np.cos(phi), np.sin(phi)
    return radial * cos - azimuthal * sin, radial * sin + azimuthal * cos


def quadratic_chi(
    shape: tuple[int, int], sampling_A: float, wavelength: float, p_A: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """chi(q) = pi lambda q^T P q on the FFT grid of an image (scan frame, rows/cols); and |q|.

    P (A, symmetric) is the defocus + 2-fold astigmatism matrix of the shift model, scan frame:
    P = [[C10 + C12a, C12b], [C12b, C10 - C12a]] (grad W = P alpha, alpha = lambda q)."""
    q0 = sfft.fftfreq(shape[0], sampling_A)[:, None]
    q1 = sfft.fftfreq(shape[1], sampling_A)[None, :]
    quad = p_A[0, 0] * q0**2 + (p_A[0, 1] + p_A[1, 0]) * q0 * q1 + p_A[1, 1] * q1**2
    return math.pi * wavelength * quad, np.hypot(q0, q1)


# ---------------------------------------------------------------------------------- units
def alpha_rad(k_px: np.ndarray, sampling_mrad: float) -> np.ndarray:
    """Tilt (rad) of detector positions `k_px` (px from the disk centre)."""
    return np.asarray(k_px, float) * (sampling_mrad * 1e-3)


def matrix_A_per_rad(matrix_px: np.ndarray, step_A: float, sampling_mrad: float) -> np.ndarray:
    """The shift model in A per rad from scan px per detector px: s_A = M_px k step with
    k = alpha / sampling."""
    return np.asarray(matrix_px) * step_A / (sampling_mrad * 1e-3)


def information_limit_per_A(semiangle_mrad: float | None, wavelength: float | None) -> float | None:
    """2 alpha / lambda (1/A): the highest spatial frequency tcBF transfers; None if unknown."""
    if not (semiangle_mrad and wavelength):
        return None
    return 2e-3 * semiangle_mrad / wavelength
