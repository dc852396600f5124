"""Physics-based 4D-STEM detector simulator and stream senders."""

from .optics import Aberrations, interaction_constant, wavelength_A
from .simulate import (
    PRESETS,
    SimulationConfig,
    SimulationError,
    Simulator,
    scan_position,
    tutorial_config,
)

__all__ = [
    "PRESETS",
    "Aberrations",
    "SimulationConfig",
    "SimulationError",
    "Simulator",
    "interaction_constant",
    "scan_position",
    "tutorial_config",
    "wavelength_A",
]
