"""Physics-based 4D-STEM detector simulator and stream senders."""

from tcbf_live.simulators.optics import Aberrations, interaction_constant, wavelength_A
from tcbf_live.simulators.simulate import (
    PRESETS,
    SimulationConfig,
    SimulationError,
    Simulator,
    scan_position,
    tutorial_config,
    weak_phase_config,
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
    "weak_phase_config",
    "wavelength_A",
]
