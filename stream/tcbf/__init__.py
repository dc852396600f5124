"""The science core of tcbf-live: pure numerics, numpy in, numpy out.

Imports numpy, scipy, numba and the pure parts of the standard library only: no logging,
threads, sockets, Qt or h5py, so every step is testable on small arrays and usable in a
notebook:

>>> from tcbf_live.stream.tcbf import reconstruct
>>> result = reconstruct(data, energy_eV=300e3, step_A=10.7, angular_sampling_mrad=0.154)
>>> result.image, result.aberrations.defocus_A, result.resolution_A

The modules, in the order one update uses them: `calibration` (BF disk, masks),
`accumulators` (accumulate and merge), `kernels` (every numba kernel of the core; the ingest
kernel that decompresses DECTRIS frames in its loop is `stream.staging`'s, as it calls the
detector codec), `tiles` (tile geometry and images), `registration` and `alignment`
(coarse-to-fine cross-correlation), `shift_model` (the fit of s = M k), `aberrations`,
`reconstruction` (shift-and-add, phase flip), `dose` (dose, FRC, resolution), `screening`
(outlier frames, missed triggers), `optics` (wavelength, chi), `pipeline` (one update: align,
aberrations, image, resolution) and `offline` (all of it on an array).
"""

from tcbf_live.stream.tcbf.aberrations import AberrationFit, fit_aberrations
from tcbf_live.stream.tcbf.accumulators import Accumulators, AccumulatorState, merged, prepare
from tcbf_live.stream.tcbf.alignment import AlignmentResult, AlignmentSettings, align
from tcbf_live.stream.tcbf.calibration import Calibration, CalibrationError, calibrate
from tcbf_live.stream.tcbf.dose import FRC, fourier_ring_correlation
from tcbf_live.stream.tcbf.offline import reconstruct
from tcbf_live.stream.tcbf.optics import chi_rad, wavelength_A
from tcbf_live.stream.tcbf.pipeline import Pipeline
from tcbf_live.stream.tcbf.registration import register_shift
from tcbf_live.stream.tcbf.screening import FrameScreen, screen_frames
from tcbf_live.stream.tcbf.updates import (
    Acquisition,
    AlignmentInputs,
    PipelineResult,
    PipelineSettings,
)

__all__ = [
    "FRC",
    "AberrationFit",
    "AccumulatorState",
    "Accumulators",
    "Acquisition",
    "AlignmentInputs",
    "AlignmentResult",
    "AlignmentSettings",
    "Calibration",
    "CalibrationError",
    "FrameScreen",
    "Pipeline",
    "PipelineResult",
    "PipelineSettings",
    "align",
    "calibrate",
    "chi_rad",
    "fit_aberrations",
    "fourier_ring_correlation",
    "merged",
    "prepare",
    "reconstruct",
    "register_shift",
    "screen_frames",
    "wavelength_A",
]
