"""What each step of `pipeline.Pipeline.update` hands to the next (one update's values)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcbf_live.stream.tcbf.alignment import AlignmentResult
from tcbf_live.stream.tcbf.dose import FRC


@dataclass(frozen=True)
class AlignedStep:
    """Step 1's output: the shift model in use and what came with it."""

    result: AlignmentResult
    shifts_px: np.ndarray  # (N_bf, 2) model correction shifts
    slips: tuple[tuple[int, int], ...]
    seconds: float  # the alignment proper (tiles re-formed, registration, fit)


@dataclass(frozen=True)
class ImageStep:
    """Step 3's output."""

    image: np.ndarray
    shift_and_add: np.ndarray
    halves: tuple[np.ndarray, np.ndarray]  # the checkerboard half reconstructions
    phase_flipped: bool
    rebuilt: bool
    sampling_A: float | None
    ring_radii_px: np.ndarray | None
    ring_bf: np.ndarray | None
    chi_model: str = "linear"  # or "third order" (`full_chi.py`)
    coverage: np.ndarray | None = None  # where data landed (0..1): the flip's and FRC's taper


@dataclass(frozen=True)
class ResolutionStep:
    """Step 4's output."""

    frc: FRC
    resolution_A: float | None
    limited: bool
    half_bit_A: float | None
    history: np.ndarray  # (updates, 4): dose, resolution, its range (better, worse)
    dose_for_target: float | None
    range_A: tuple[float, float]  # (better, worse): the FRC one sigma up and down
