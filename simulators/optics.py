"""Electron optics: wavelength, interaction constant, aberration function and parallax shifts.

Conventions (see docs/conventions.md and shared/reference/tcbf-physics.md):
- x is the first array axis (rows), y the second (columns), for scan and detector alike;
  the azimuth phi = atan2(alpha_y, alpha_x).
- Probe psi(r) = IFFT[A(k) exp(-i chi(k))], chi = (2 pi / lambda) W(alpha), alpha = lambda k.
- C10 = -defocus. Aberration magnitudes in Angstrom, angles in radians.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ELECTRON_REST_ENERGY_EV = 510_998.95


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in volts."""
    return 12.2643 / np.sqrt(energy_eV * (1.0 + 0.978476e-6 * energy_eV))


def interaction_constant(energy_eV: float) -> float:
    """Relativistic interaction constant sigma in rad / (V Angstrom) (0.000653 at 300 kV)."""
    lam = wavelength_A(energy_eV)
    mc2 = ELECTRON_REST_ENERGY_EV
    return 2.0 * np.pi / (lam * energy_eV) * (mc2 + energy_eV) / (2.0 * mc2 + energy_eV)


@dataclass(frozen=True)
class Aberrations:
    """Axial aberrations in the polar (Krivanek) notation: magnitudes in Angstrom, angles in rad."""

    C10_A: float = 0.0
    C12_A: float = 0.0
    phi12_rad: float = 0.0
    C21_A: float = 0.0
    phi21_rad: float = 0.0
    C23_A: float = 0.0
    phi23_rad: float = 0.0
    C30_A: float = 0.0

    @classmethod
    def from_defocus(cls, defocus_A: float, **others: float) -> Aberrations:
        """Aberrations with C10 = -defocus (the sign convention of the docs)."""
        return cls(C10_A=-float(defocus_A), **others)

    @property
    def defocus_A(self) -> float:
        return -self.C10_A

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    def _cartesian(self, magnitude: float, angle: float, order: int) -> tuple[float, float]:
        return magnitude * np.cos(order * angle), magnitude * np.sin(order * angle)

    def W_A(self, alpha_x: np.ndarray, alpha_y: np.ndarray) -> np.ndarray:
        """Wave aberration W(alpha) in Angstrom for tilt angles in rad."""
        a2 = alpha_x**2 + alpha_y**2
        a = np.sqrt(a2)
        phi = np.arctan2(alpha_y, alpha_x)
        w = self.C10_A * a2 / 2.0
        w = w + self.C12_A * a2 / 2.0 * np.cos(2.0 * (phi - self.phi12_rad))
        w = w + self.C21_A * a2 * a / 3.0 * np.cos(phi - self.phi21_rad)
        w = w + self.C23_A * a2 * a / 3.0 * np.cos(3.0 * (phi - self.phi23_rad))
        w = w + self.C30_A * a2 * a2 / 4.0
        return w

    def chi_rad(self, alpha_x: np.ndarray, alpha_y: np.ndarray, wavelength: float) -> np.ndarray:
        """Aberration phase chi = 2 pi W / lambda (rad)."""
        return (2.0 * np.pi / wavelength) * self.W_A(alpha_x, alpha_y)

    def shift_A(self, alpha_x: np.ndarray, alpha_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Analytic gradient grad_alpha W (Angstrom): the tcBF *correction* shift of a vBF image.

        The raw content of the virtual-BF image at tilt alpha is displaced by minus this.
        """
        ax = np.asarray(alpha_x, dtype=float)
        ay = np.asarray(alpha_y, dtype=float)
        a2 = ax**2 + ay**2
        sx = self.C10_A * ax
        sy = self.C10_A * ay
        c12a, c12b = self._cartesian(self.C12_A, self.phi12_rad, 2)
        sx = sx + c12a * ax + c12b * ay
        sy = sy + c12b * ax - c12a * ay
        c21a, c21b = self._cartesian(self.C21_A, self.phi21_rad, 1)
        dot = c21a * ax + c21b * ay
        sx = sx + 2.0 / 3.0 * dot * ax + a2 / 3.0 * c21a
        sy = sy + 2.0 / 3.0 * dot * ay + a2 / 3.0 * c21b
        c23a, c23b = self._cartesian(self.C23_A, self.phi23_rad, 3)
        sx = sx + c23a * (ax**2 - ay**2) + 2.0 * c23b * ax * ay
        sy = sy - 2.0 * c23a * ax * ay + c23b * (ax**2 - ay**2)
        sx = sx + self.C30_A * a2 * ax
        sy = sy + self.C30_A * a2 * ay
        return sx, sy

    def max_shift_A(self, semiangle_rad: float, samples: int = 64) -> float:
        """Largest |grad W| over the aperture: the geometric half-width of the defocused probe."""
        a = np.linspace(0.0, semiangle_rad, samples)
        phi = np.linspace(0.0, 2.0 * np.pi, samples, endpoint=False)
        aa, pp = np.meshgrid(a, phi)
        sx, sy = self.shift_A(aa * np.cos(pp), aa * np.sin(pp))
        return float(np.max(np.hypot(sx, sy)))


def aperture(alpha: np.ndarray, semiangle_rad: float, rolloff_rad: float) -> np.ndarray:
    """Circular condenser aperture with a linear soft edge `rolloff_rad` wide (0 = hard edge)."""
    if rolloff_rad <= 0:
        return (alpha <= semiangle_rad).astype(np.float64)
    return np.clip((semiangle_rad - alpha) / rolloff_rad + 0.5, 0.0, 1.0)


def rotation_matrix(angle_rad: float) -> np.ndarray:
    """Active rotation in the (x, y) = (row, col) plane."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return np.array([[c, -s], [s, c]])


def detector_to_scan_matrix(rotation_rad: float, transpose: bool) -> np.ndarray:
    """Matrix taking a detector-frame vector (row, col) into the scan frame: R(theta) @ T."""
    t = np.array([[0.0, 1.0], [1.0, 0.0]]) if transpose else np.eye(2)
    return rotation_matrix(rotation_rad) @ t
