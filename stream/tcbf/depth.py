"""Depth sections: tcBF images refocused to other planes from the aligned stack, and how sharp
each one is, so a user reads the height of the sample's features (issue 15).

Pure numerics. The fitted shift model is M = P U (`aberrations.decompose`: P symmetric with C10
on its diagonal, U = R(theta) T the scan/detector geometry). Refocusing by `offset_A` (a change
of defocus; C10 = -defocus, tcbf-physics.md sect. 3) gives P - offset I, so every BF pixel's
correction shift changes by -offset U alpha (alpha its tilt in rad); the section is the
shift-and-add with those shifts, phase-flipped with the refocused C10. A feature is sharpest in
the section of its own height.

Sharpness: the signal power of a section at q_max/4 < q < q_max (q_max = 2 alpha / lambda, the
information limit), measured as the cross-power of its two independent halves (the two
checkerboard sets of BF pixels, as for the FRC), so shot noise, which does not depend on the
focus, does not count. Refocusing away from a feature spreads it over the parallax of the BF
pixels, which removes its high frequencies. The depth of field, lambda / alpha^2, is the
spacing below which sections are not independent (stated beside them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from tcbf_live.stream.tcbf.aberrations import AberrationFit
from tcbf_live.stream.tcbf.reconstruction import ShiftAndAdd, phase_flip
from tcbf_live.stream.tcbf.shift_model import TRANSPOSE

MAX_SECTIONS = 64


@dataclass(frozen=True)
class DepthSections:
    offsets_A: np.ndarray  # (K,) change of defocus from the fitted one (A; + = more defocus)
    images: np.ndarray  # (K, rows f, cols f) float32, phase-flipped like the tcBF image
    sharpness: np.ndarray  # (K,) high-band fraction of each section's power (module doc)
    depth_of_field_A: float  # lambda / alpha^2
    phase_flipped: bool

    @property
    def sharpest_offset_A(self) -> float:
        """The offset of the sharpest section: where the sample's features are, relative to
        the fitted focus (good to about the depth of field and the offsets' spacing)."""
        return float(self.offsets_A[int(np.argmax(self.sharpness))])


def parse_offsets(text: str) -> tuple[float, ...]:
    """'START:STOP:STEP' (A, STOP included when on the grid) or 'A,B,C' -> offsets; ValueError
    with the reason for anything else (a wrong flag is one line and exit code 2)."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            n = math.floor((stop - start) / step + 1e-9) + 1  # checked before it is built
            values = tuple(start + k * step for k in range(n)) if n <= MAX_SECTIONS else ()
        else:
            values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: give START:STOP:STEP (A, STEP > 0) or a list A,B,C") from None
    if not values or len(values) > MAX_SECTIONS or not all(map(math.isfinite, values)):
        raise ValueError(f"{text!r}: 1 to {MAX_SECTIONS} finite offsets")
    return values


def geometry_matrix(fit: AberrationFit) -> np.ndarray:
    """U = R(theta) T of the fit (M = P U)."""
    c, s = math.cos(fit.rotation_rad), math.sin(fit.rotation_rad)
    r = np.array([[c, -s], [s, c]])
    return r @ TRANSPOSE if fit.transpose else r


def section_shifts_px(shifts_px: np.ndarray, alpha_rad: np.ndarray, fit: AberrationFit,
                      offset_A: float, step_A: float) -> np.ndarray:  # fmt: skip
    """Correction shifts (N, 2, scan px) of the BF pixels at tilts `alpha_rad` (N, 2) for the
    plane `offset_A` away from the fitted focus."""
    return np.asarray(shifts_px, float) - offset_A * (alpha_rad @ geometry_matrix(fit).T) / step_A


def sharpness(half0: np.ndarray, half1: np.ndarray, sampling_A: float, q_max_per_A: float,
              weight: np.ndarray | None = None) -> float:  # fmt: skip
    """Cross-power per pixel of two independent half images, (h - mean) x weight each, at
    q_max/4 < q < q_max: the power of what they share (the signal)."""
    w = np.ones(half0.shape) if weight is None else np.asarray(weight, float)
    inside = w > 0.5
    spectra = [sfft.fft2((h - (h[inside].mean() if inside.any() else h.mean())) * w, workers=1)
               for h in (half0, half1)]  # fmt: skip
    q = np.hypot(sfft.fftfreq(w.shape[0], sampling_A)[:, None],
                 sfft.fftfreq(w.shape[1], sampling_A)[None, :])  # fmt: skip
    band = (q > 0.25 * q_max_per_A) & (q < q_max_per_A)
    cross = (spectra[0] * np.conj(spectra[1])).real[band].sum()
    return float(cross) / w.size**2


def depth_sections(
    stack: np.ndarray,
    exposure: np.ndarray,
    scan_shape: tuple[int, int],
    factor: int,
    shifts_px: np.ndarray,
    alpha_rad: np.ndarray,
    fit: AberrationFit,
    step_A: float,
    wavelength_A: float,
    semiangle_mrad: float,
    offsets_A: tuple[float, ...],
    half: np.ndarray,
    excluded_px: np.ndarray | None = None,
    phase_flip_sections: bool = True,
) -> DepthSections:
    """The sections at `offsets_A` from the per-BF-pixel `stack` (n_pos, N_bf) with its
    `exposure` (n_pos,), the fitted model `shifts_px` (N_bf, 2) and tilts `alpha_rad`; `half`
    (N_bf,) 0/1 splits the BF pixels into the two independent halves."""
    sampling = step_A / factor
    q_max = 2e-3 * semiangle_mrad / wavelength_A
    images, sharp = [], []
    for offset in offsets_A:
        saa = ShiftAndAdd(scan_shape, factor, half=half)
        saa.update(stack, exposure, section_shifts_px(shifts_px, alpha_rad, fit, offset, step_A),
                   excluded_px=excluded_px)  # fmt: skip
        (image, half0, half1), coverage = saa.images(), saa.coverage()
        if phase_flip_sections:
            p = fit.p_matrix_A() - offset * np.eye(2)  # C10 - offset on the diagonal
            image = phase_flip(image, sampling, wavelength_A, p, q_max, coverage)
        else:
            image = (image - 1.0).astype(np.float32)
        images.append(image)
        sharp.append(sharpness(half0, half1, sampling, q_max, coverage))
    alpha = semiangle_mrad * 1e-3
    return DepthSections(np.asarray(offsets_A, float), np.stack(images), np.asarray(sharp),
                         wavelength_A / alpha**2, phase_flip_sections)  # fmt: skip
