"""What a simulated 4D-STEM acquisition is: `SimulationConfig` (every physical and detector
parameter, units in the names, `validate()` with one clear sentence per impossible setting) and
the presets (`tutorial_config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from tcbf_live.detectors.base import SCAN_ORDERS
from tcbf_live.simulators.optics import Aberrations
from tcbf_live.simulators.samples import SAMPLES

DTYPE_BY_BITS = {8: np.uint8, 16: np.uint16, 32: np.uint32}


class SimulationError(ValueError):
    """Impossible or contradictory simulation parameters (reported as one line by the CLI)."""


@dataclass(frozen=True)
class SimulationConfig:
    """All parameters of a simulated 4D-STEM acquisition (units in the names)."""

    scan_shape: tuple[int, int] = (24, 48)
    step_A: float = 10.67
    detector_shape: tuple[int, int] = (128, 128)
    energy_eV: float = 300e3
    semiangle_mrad: float = 4.0
    angular_sampling_mrad: float | None = None  # None: BF-disk radius = 20% of the detector
    rolloff_mrad: float = 0.125
    aberrations: Aberrations = field(default_factory=lambda: Aberrations.from_defocus(15000.0))
    rotation_deg: float = 0.0
    transpose: bool = False
    center_px: tuple[float, float] | None = None  # None: detector centre
    descan_px_per_step: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    dose_e_per_A2: float = 100.0
    noise: bool = True  # False: expected counts as float32 frames (no Poisson, no mask value)
    counts_per_electron: float = 1.0
    bits: int = 16
    bad_pixels: int = 0
    sample: str = "apoferritin-like"
    feature_A: float = 8.0
    phase_rms: float | None = None
    periodic_sample: bool = False  # sample repeats with the scan period (exact for FFT tests)
    scan_order: str = "raster"
    seed: int = 0
    dwell_s: float = 1e-5

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if not self.noise else np.dtype(DTYPE_BY_BITS[self.bits])

    @property
    def mask_value(self) -> int | None:
        """Value carried by dead/hot (masked) pixels: 2**bits - 1 for integer detectors."""
        return (1 << self.bits) - 1 if self.noise else None

    def resolved_angular_sampling_mrad(self) -> float:
        if self.angular_sampling_mrad is not None:
            return self.angular_sampling_mrad
        return self.semiangle_mrad / (0.2 * min(self.detector_shape))

    def resolved_center_px(self) -> tuple[float, float]:
        if self.center_px is not None:
            return self.center_px
        return (self.detector_shape[0] / 2.0, self.detector_shape[1] / 2.0)

    def disk_edge_mrad(self) -> float:
        """Outer edge of the soft aperture."""
        return self.semiangle_mrad + self.rolloff_mrad / 2.0

    def max_descan_px(self) -> float:
        """Largest BF-disk displacement (detector px) anywhere in the scan."""
        d = self.descan_px_per_step
        corners = [(r, c) for r in (0, self.scan_shape[0] - 1) for c in (0, self.scan_shape[1] - 1)]
        return max(math.hypot(d[0] * r + d[1] * c, d[2] * r + d[3] * c) for r, c in corners)

    def validate(self) -> None:
        """Raise SimulationError with one clear sentence for impossible settings."""
        if min(self.scan_shape) < 1 or len(self.scan_shape) != 2:
            raise SimulationError(f"scan shape must be two positive sizes, got {self.scan_shape}")
        if min(self.detector_shape) < 8 or max(self.detector_shape) > 4096:
            raise SimulationError(
                f"detector must be 8 to 4096 px a side, got {self.detector_shape}"
            )
        ranges = {
            "step_A": (1e-2, 1e4),
            "energy_eV": (1e3, 1e7),
            "semiangle_mrad": (1e-3, 200.0),
            "rolloff_mrad": (0.0, 50.0),
            "feature_A": (1e-2, 1e5),
            "dwell_s": (1e-12, 1e3),
        }
        for name, (lo, hi) in ranges.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise SimulationError(f"{name} must lie in [{lo:g}, {hi:g}], got {v}")
        if self.phase_rms is not None and not 0 <= self.phase_rms <= 10:
            raise SimulationError(f"phase rms must lie in [0, 10] rad, got {self.phase_rms}")
        if not 0 <= self.seed < 2**63:
            raise SimulationError(f"seed must be in [0, 2^63), got {self.seed}")
        if self.angular_sampling_mrad is not None and not self.angular_sampling_mrad > 0:
            raise SimulationError("angular sampling must be positive")
        if not self.dose_e_per_A2 >= 0:
            raise SimulationError(f"dose must be >= 0 e/A^2, got {self.dose_e_per_A2}")
        if not self.counts_per_electron > 0:
            raise SimulationError("counts per electron must be positive")
        if self.bits not in DTYPE_BY_BITS:
            raise SimulationError(f"bit depth must be one of 8, 16, 32, got {self.bits}")
        if self.sample not in SAMPLES:
            raise SimulationError(f"unknown sample {self.sample!r} (choose {', '.join(SAMPLES)})")
        if self.scan_order not in SCAN_ORDERS:
            raise SimulationError(f"scan order must be one of {SCAN_ORDERS}")
        if (
            not 0
            <= self.bad_pixels
            <= min(10_000, self.detector_shape[0] * self.detector_shape[1] // 4)
        ):
            raise SimulationError(
                "bad pixels must number 0 to min(10000, a quarter of the detector)"
            )
        if self.bad_pixels and not self.noise:
            raise SimulationError("bad pixels need integer (noisy) frames, not --no-noise")
        radius = self.disk_edge_mrad() / self.resolved_angular_sampling_mrad()
        reach = radius + self.max_descan_px()
        cx, cy = self.resolved_center_px()
        qx, qy = self.detector_shape
        if min(cx, qx - cx, cy, qy - cy) < reach:
            raise SimulationError(
                f"BF disk (radius {radius:.1f} px at {self.resolved_angular_sampling_mrad():.4g} "
                f"mrad/px, centre {cx:g},{cy:g}, descan drift {self.max_descan_px():.1f} px) "
                f"does not fit on the {qx}x{qy} detector"
            )


def tutorial_config(**overrides) -> SimulationConfig:
    """The tcBF tutorial's conditions: 24x48 scan, 128^2 detector, 300 kV, 4 mrad, 1.5 um
    defocus, rotation -15 deg, step 256/24 A, 100 e/A^2, BF radius ~26 px."""
    base = SimulationConfig(
        scan_shape=(24, 48),
        step_A=256.0 / 24.0,
        detector_shape=(128, 128),
        energy_eV=300e3,
        semiangle_mrad=4.0,
        angular_sampling_mrad=0.154,
        rolloff_mrad=0.125,
        aberrations=Aberrations.from_defocus(15000.0),
        rotation_deg=-15.0,
        dose_e_per_A2=100.0,
        sample="apoferritin-like",
    )
    return replace(base, **overrides)


def weak_phase_config(**overrides) -> SimulationConfig:
    """py4DSTEM's low-dose test object (docs/tcbf.md): 24x48 scan, 128^2 detector, 300 kV,
    20 mrad, 150 A defocus, 0.5 A step, 1.23 mrad/px (~800 BF px), a weak random phase of
    0.038 rad rms, 10^5 e/A^2."""
    base = SimulationConfig(
        scan_shape=(24, 48), step_A=0.5, detector_shape=(128, 128), energy_eV=300e3,
        semiangle_mrad=20.0, angular_sampling_mrad=1.23, rolloff_mrad=0.2,
        aberrations=Aberrations.from_defocus(150.0), dose_e_per_A2=1e5, sample="random",
        feature_A=0.5, phase_rms=0.038,
    )  # fmt: skip
    return replace(base, **overrides)


PRESETS = {"tutorial": tutorial_config, "weak-phase": weak_phase_config}
