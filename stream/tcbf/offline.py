"""The science core on a 4D array in memory: no file, no socket, no thread.

`reconstruct(data, energy_eV=..., step_A=..., ...)` runs what a live series runs (calibration
on the first frames, accumulation, then one final cold-started update: alignment, aberrations,
image, resolution) on a (rows, cols, Qx, Qy) numpy array, e.g. in a notebook.
"""

from __future__ import annotations

import numpy as np

from tcbf_live.stream.tcbf.accumulators import Accumulators, prepare
from tcbf_live.stream.tcbf.calibration import DEFAULT_BF_THRESHOLD, calibrate
from tcbf_live.stream.tcbf.pipeline import Pipeline
from tcbf_live.stream.tcbf.updates import Acquisition, PipelineResult, PipelineSettings

BATCH_FRAMES = 256  # frames per kernel call (a view of the input, nothing copied)


def reconstruct(
    data: np.ndarray,
    *,
    energy_eV: float,
    step_A: float,
    semiangle_mrad: float | None = None,
    angular_sampling_mrad: float | None = None,
    counts_per_electron: float = 1.0,
    scan_order: str = "raster",
    mask: np.ndarray | None = None,
    mask_value: int | None = None,
    bins: tuple[int, ...] | None = None,
    calibration_frames: int = 64,
    bf_threshold: float = DEFAULT_BF_THRESHOLD,
    settings: PipelineSettings | None = None,
) -> PipelineResult | None:
    """tcBF of a 4D-STEM dataset held in memory.

    Parameters
    ----------
    data : (rows, cols, Qx, Qy) array of counts (any numeric dtype), in scan order
        (`scan_order="serpentine"`: odd rows were acquired right to left, stored as acquired).
    energy_eV, step_A : beam energy and scan step.
    semiangle_mrad, angular_sampling_mrad : the probe's semi-angle and the detector's angular
        sampling; one of them is needed for the aberrations (the other follows from the
        measured BF-disk radius).
    counts_per_electron : detector gain (dose figures).
    mask, mask_value : pixels to leave out (bool (Qx, Qy)), and the value the detector writes
        into its own masked pixels.
    bins, calibration_frames, bf_threshold, settings : as the `run`/`reconstruct` flags.

    Returns
    -------
    The final update (`PipelineResult`: image, shifts, aberrations, resolution, screening), or
    None when the data hold too little for a model (too few rows, or too little dose).
    Raises `calibration.CalibrationError` when the frames show no usable BF disk.
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be (rows, cols, Qx, Qy), got shape {data.shape}")
    rows, cols, qx, qy = data.shape
    frames = data.reshape(rows * cols, qx, qy)
    cal = calibrate(frames[:calibration_frames], mask_value=mask_value, supplied_mask=mask,
                    threshold=bf_threshold, semiangle_mrad=semiangle_mrad,
                    angular_sampling_mrad=angular_sampling_mrad,
                    counts_per_electron=counts_per_electron)  # fmt: skip
    cal, layout = prepare(cal, bins, semiangle_mrad, angular_sampling_mrad)
    acc = Accumulators((rows, cols), cal, layout, axial_radius_px=0.25 * cal.radius_px,
                       serpentine=scan_order == "serpentine",
                       integer_stack=data.dtype.kind == "u")  # fmt: skip
    for first in range(0, len(frames), BATCH_FRAMES):
        acc.add(first, frames[first : first + BATCH_FRAMES])
    acquisition = Acquisition((rows, cols), (qx, qy), scan_order, energy_eV, step_A,
                              semiangle_mrad, counts_per_electron)  # fmt: skip
    pipeline = Pipeline(acquisition, cal, layout, settings or PipelineSettings())
    return pipeline.update(pipeline.inputs(acc.state, acc.frames_accepted), final=True)
