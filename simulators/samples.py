"""Sample presets: projected phase maps phi(r) = sigma * V_proj(r) on a fine real-space grid.

Every generator takes the grid shape, its pixel size in Angstrom, the beam energy (for the
interaction constant) and a numpy Generator, and returns float32 phase in radians. The caller
band-limits the result (`band_limit`) so that the exit-wave spectrum stays on its grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.fft as sfft

from tcbf_live.simulators.optics import interaction_constant

SAMPLES: dict[str, Callable[..., np.ndarray]] = {}


def _register(name: str):
    def deco(fn):
        SAMPLES[name] = fn
        return fn

    return deco


def _freq2(shape: tuple[int, int], pixel_A: float) -> np.ndarray:
    qx = sfft.fftfreq(shape[0], pixel_A)[:, None]
    qy = sfft.rfftfreq(shape[1], pixel_A)[None, :]
    return qx**2 + qy**2


def gaussian_random_field(
    shape: tuple[int, int], pixel_A: float, length_A: float, rng: np.random.Generator
) -> np.ndarray:
    """Zero-mean, unit-rms white noise smoothed with a Gaussian of std `length_A`."""
    noise = rng.standard_normal(shape).astype(np.float32)
    spec = sfft.rfft2(noise, workers=1)
    spec *= np.exp(-2.0 * np.pi**2 * length_A**2 * _freq2(shape, pixel_A)).astype(np.float32)
    field = sfft.irfft2(spec, s=shape, workers=1)
    field -= field.mean()
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def band_limit(phase: np.ndarray, pixel_A: float, q_max_per_A: float) -> np.ndarray:
    """Remove spatial frequencies above `q_max_per_A` (1/Angstrom)."""
    q2 = _freq2(phase.shape, pixel_A)
    spec = sfft.rfft2(phase, workers=1)
    spec[q2 > q_max_per_A**2] = 0
    return sfft.irfft2(spec, s=phase.shape, workers=1).astype(np.float32)


def _random_centres(
    shape: tuple[int, int], pixel_A: float, radius_A: np.ndarray, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Non-overlapping discs (Angstrom units) by random sequential adsorption."""
    extent = np.array(shape) * pixel_A
    placed: list[tuple[float, float, float]] = []
    for r in radius_A:
        for _ in range(60):
            c = rng.uniform(0, 1, 2) * extent
            if all((c[0] - x) ** 2 + (c[1] - y) ** 2 > (r + rr + 4.0) ** 2 for x, y, rr in placed):
                placed.append((float(c[0]), float(c[1]), float(r)))
                break
    return placed


def _add_spheres(
    out: np.ndarray,
    pixel_A: float,
    discs: list[tuple[float, float, float]],
    inner_fraction: float = 0.0,
    weight: np.ndarray | None = None,
) -> None:
    """Add projected thickness (Angstrom) of solid spheres or shells (inner radius fraction)."""
    for cx, cy, r in discs:
        i0, i1 = int((cx - r) / pixel_A) - 1, int((cx + r) / pixel_A) + 2
        j0, j1 = int((cy - r) / pixel_A) - 1, int((cy + r) / pixel_A) + 2
        i0, j0 = max(i0, 0), max(j0, 0)
        i1, j1 = min(i1, out.shape[0]), min(j1, out.shape[1])
        if i0 >= i1 or j0 >= j1:
            continue
        x = (np.arange(i0, i1) + 0.5) * pixel_A - cx
        y = (np.arange(j0, j1) + 0.5) * pixel_A - cy
        rho2 = x[:, None] ** 2 + y[None, :] ** 2
        t = 2.0 * np.sqrt(np.clip(r * r - rho2, 0.0, None))
        if inner_fraction > 0:
            ri = inner_fraction * r
            t -= 2.0 * np.sqrt(np.clip(ri * ri - rho2, 0.0, None))
        if weight is not None:
            t *= weight[i0:i1, j0:j1]
        out[i0:i1, j0:j1] += t


@_register("random")
def random_phase(
    shape: tuple[int, int],
    pixel_A: float,
    energy_eV: float,
    rng: np.random.Generator,
    feature_A: float = 8.0,
) -> np.ndarray:
    """Band-limited random phase object, 0.1 rad rms, correlation length `feature_A`."""
    return 0.1 * gaussian_random_field(shape, pixel_A, feature_A, rng)


@_register("apoferritin-like")
def apoferritin_like(
    shape: tuple[int, int],
    pixel_A: float,
    energy_eV: float,
    rng: np.random.Generator,
    feature_A: float = 8.0,
) -> np.ndarray:
    """Weak 12 nm protein shells (8 nm cavity) with subunit texture, in amorphous ice.

    Contrast uses the protein-minus-ice mean inner potential (~2.5 V); the ice continuum adds a
    weak band-limited background of ~0.02 rad rms.
    """
    sigma = interaction_constant(energy_eV)
    area = shape[0] * shape[1] * pixel_A**2
    n = max(1, int(0.3 * area / (np.pi * 60.0**2)))
    discs = _random_centres(shape, pixel_A, np.full(n, 60.0), rng)
    texture = 1.0 + 0.3 * gaussian_random_field(shape, pixel_A, 6.0, rng)
    thickness = np.zeros(shape, np.float32)
    _add_spheres(thickness, pixel_A, discs, inner_fraction=40.0 / 60.0, weight=texture)
    ice = 0.02 * gaussian_random_field(shape, pixel_A, max(feature_A / 2, 2.0), rng)
    return (sigma * 2.5 * thickness + ice).astype(np.float32)


@_register("gold-fiducials")
def gold_fiducials(
    shape: tuple[int, int],
    pixel_A: float,
    energy_eV: float,
    rng: np.random.Generator,
    feature_A: float = 8.0,
) -> np.ndarray:
    """A few strong 2-5 nm gold particles (mean inner potential ~30 V) on thin amorphous carbon."""
    sigma = interaction_constant(energy_eV)
    area = shape[0] * shape[1] * pixel_A**2
    n = max(2, int(area / 300.0**2))
    discs = _random_centres(shape, pixel_A, rng.uniform(10.0, 25.0, n), rng)
    thickness = np.zeros(shape, np.float32)
    _add_spheres(thickness, pixel_A, discs)
    carbon = 0.03 * gaussian_random_field(shape, pixel_A, max(feature_A / 2, 2.0), rng)
    return (sigma * 30.0 * thickness + carbon).astype(np.float32)


def make_phase(
    name: str,
    shape: tuple[int, int],
    pixel_A: float,
    energy_eV: float,
    seed: int,
    feature_A: float = 8.0,
    phase_rms: float | None = None,
    q_max_per_A: float | None = None,
) -> np.ndarray:
    """Phase map of preset `name`, band-limited to `q_max_per_A` (default 2/3 grid Nyquist),
    optionally rescaled (about its mean) to `phase_rms` rad."""
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose from {', '.join(SAMPLES)}")
    rng = np.random.default_rng([seed, 0x5A3])
    phase = SAMPLES[name](shape, pixel_A, energy_eV, rng, feature_A=feature_A)
    q_max = q_max_per_A if q_max_per_A is not None else 2.0 / 3.0 / (2.0 * pixel_A)
    phase = band_limit(phase, pixel_A, q_max)
    if phase_rms is not None:
        phase = phase - phase.mean()
        phase *= phase_rms / max(float(phase.std()), 1e-12)
    return phase.astype(np.float32)
