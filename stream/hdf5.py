"""HDF5 result file: the layout other tools read (docs/results.md).

/                 attrs software, software_version, created
/acquisition      attrs scan_shape, step_A, energy_eV, frames_received, frames_missing,
                  frames_duplicate, frames_out_of_order, protocol, series_id, frames_excluded,
                  frames_excluded_by_reason (JSON), hot_pixels, dead_pixels, suspect (JSON
                  list), ...; /acquisition/excluded (rows, cols) bool: frames screened out
/bf/incoherent    (rows, cols) BF counts per position
/bf/axial         (rows, cols) axial virtual BF
/bf/dark_field    (rows, cols) counts outside the BF disk
/bf/hits          (rows, cols) frames accumulated per position (0 = missing)
/alignment/bf_pixels (N_bf, 2) detector (row, col); attrs bins, n_tiles, center_px, radius_px
/calibration/mean_pattern, /calibration/mask
/dose             attrs dose_e_per_A2, electrons_total, counts_per_electron, beam_current_pA,
                  projected_dose_e_per_A2, resolution_A, resolution_half_bit_A; datasets map,
                  bf_fraction, frc, resolution_vs_dose, trust (docs/dose.md)

/tcbf/image       (rows f, cols f) tcBF image; attrs sampling_A, upsampling_factor,
                  phase_flipped; /tcbf/shift_and_add (before phase flipping, mean ~1)
/alignment/shifts_px (N_bf, 2) correction shifts (scan px); /alignment/error (iterations,)
                  rms misfit of the tiles to the model; attrs schedule, matrix_px, rows
/aberrations      attrs C10_A, C12_A, phi12_rad, rotation_rad, transpose, defocus_A,
                  residual_px (only when the angular sampling and step are known)
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import h5py
import numpy as np

from tcbf_live import __version__
from tcbf_live.stream.outputs import atomic_output
from tcbf_live.stream.series import SeriesResult

SOFTWARE = "tcbf-live"


def _attr(value):
    return np.nan if value is None else value


def write_result(
    path: str | Path, result: SeriesResult, protocol: str, overwrite: bool = False
) -> Path:
    """Write one series' result atomically: to a temporary file beside `path`, flushed, then
    moved into place, so `path` never holds half a file. An existing `path` is replaced only
    with `overwrite`; else `outputs.OutputExists` and nothing is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = result.info
    with atomic_output(path, overwrite) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["software"] = SOFTWARE
        f.attrs["software_version"] = __version__
        f.attrs["created"] = datetime.datetime.now(datetime.UTC).isoformat()
        acq = f.create_group("acquisition")
        acq.attrs["scan_shape"] = np.asarray(info.scan_shape, np.int64)
        acq.attrs["scan_order"] = info.scan_order
        acq.attrs["detector_shape"] = np.asarray(info.detector_shape, np.int64)
        acq.attrs["step_A"] = _attr(info.step_A)
        acq.attrs["energy_eV"] = _attr(info.energy_eV)
        acq.attrs["semiangle_mrad"] = _attr(info.semiangle_mrad)
        cal = result.calibration
        sampling = cal.angular_sampling_mrad if cal is not None else info.angular_sampling_mrad
        acq.attrs["angular_sampling_mrad"] = _attr(sampling)
        acq.attrs["frames_received"] = result.frames_received
        acq.attrs["frames_missing"] = result.frames_missing
        acq.attrs["frames_expected"] = result.frames_expected
        acq.attrs["frames_duplicate"] = result.duplicates
        acq.attrs["frames_out_of_order"] = result.out_of_order
        acq.attrs["frames_out_of_range"] = result.out_of_range
        acq.attrs["complete"] = result.complete
        write_screening(acq, result)
        acq.attrs["protocol"] = protocol
        acq.attrs["series_id"] = info.series_id
        if info.ground_truth:
            acq.attrs["ground_truth"] = json.dumps(info.ground_truth)

        bf = f.create_group("bf")
        bf["incoherent"] = result.incoherent_bf
        bf["axial"] = result.axial_bf
        bf["dark_field"] = result.dark_field
        bf["hits"] = result.hits

        align = f.create_group("alignment")
        if cal is not None:
            align["bf_pixels"] = cal.bf_pixels
            align.attrs["center_px"] = np.asarray(cal.center_px)
            align.attrs["radius_px"] = cal.radius_px
            align.attrs["bf_threshold"] = cal.threshold
            cg = f.create_group("calibration")
            cg["mean_pattern"] = cal.mean_pattern
            cg["mask"] = cal.mask
        else:
            align["bf_pixels"] = np.zeros((0, 2), np.int32)
        align.attrs["bins"] = np.asarray(result.bins, np.int64)
        align.attrs["n_tiles"] = np.asarray(result.n_tiles, np.int64)

        if result.tcbf is not None:
            write_tcbf(f, result.tcbf)

        write_dose(f.create_group("dose"), result)
    return path


def write_screening(acq: h5py.Group, result: SeriesResult) -> None:
    """What screening excluded and why (docs/reliability.md): excluded frames still count as
    received; `suspect` lists reasons not to trust the image (e.g. a missed trigger)."""
    acq.attrs["frames_excluded"] = result.frames_excluded
    acq.attrs["frames_excluded_by_reason"] = json.dumps(result.excluded_reasons)
    cal = result.calibration
    acq.attrs["hot_pixels"] = cal.hot_pixels if cal is not None else 0
    acq.attrs["dead_pixels"] = cal.dead_pixels if cal is not None else 0
    acq.attrs["pixels_excluded_mid_scan"] = result.pixels_excluded  # turned hot/dead later
    acq.attrs["suspect"] = json.dumps(list(result.suspect))
    acq.attrs["frames_dropped_by_detector"] = _attr(result.detector_dropped)  # NaN: unknown
    if result.excluded is not None:
        acq["excluded"] = result.excluded


def write_dose(dose: h5py.Group, result: SeriesResult) -> None:
    """/dose: the dose, the beam, and what resolution the dose bought (docs/dose.md)."""
    info = result.info
    dose.attrs["dose_e_per_A2"] = result.dose_e_per_A2
    dose.attrs["electrons_total"] = result.electrons_total
    dose.attrs["counts_per_electron"] = info.counts_per_electron
    dose.attrs["projected_dose_e_per_A2"] = result.projected_dose_e_per_A2
    dose.attrs["beam_current_pA"] = _attr(result.beam_current_pA)
    dose.attrs["dwell_s"] = _attr(info.dwell_s)
    dose["map"] = result.dose_map
    dose["bf_fraction"] = result.bf_fraction
    t = result.tcbf
    dose.attrs["resolution_A"] = _attr(None if t is None else t.resolution_A)
    dose.attrs["resolution_half_bit_A"] = _attr(None if t is None else t.resolution_half_bit_A)
    dose.attrs["resolution_limited_by_sampling"] = bool(t is not None and t.resolution_limited)
    if t is None:
        return
    if t.frc is not None:
        frc = np.column_stack([t.frc.q_per_A, t.frc.frc, t.frc.n_pixels])
        dose["frc"] = frc
        dose["frc"].attrs["columns"] = "q_per_A, frc, ring_pixels"
    rvd = t.resolution_vs_dose if t.resolution_vs_dose is not None else np.zeros((0, 2))
    dose["resolution_vs_dose"] = rvd
    dose["resolution_vs_dose"].attrs["columns"] = "scan_dose_e_per_A2, resolution_A"
    if t.target_resolution_A is not None:
        dose.attrs["target_resolution_A"] = t.target_resolution_A
        dose.attrs["dose_for_target_e_per_A2_estimate"] = _attr(t.dose_for_target_e_per_A2)
    if t.trust:
        trust = np.array([[x.bin_px, x.n_tiles, x.min_electrons, x.median_electrons,
                           x.threshold, x.trusted, _attr(x.dose_needed_e_per_A2)]
                          for x in t.trust], float)  # fmt: skip
        dose["trust"] = trust
        dose["trust"].attrs["columns"] = (
            "bin_px, tiles, min_tile_electrons, median_tile_electrons, threshold, trusted, "
            "scan_dose_needed_e_per_A2_estimate"
        )


def write_tcbf(f: h5py.File, tcbf) -> None:
    """The alignment/reconstruction part of the result (see the module docstring)."""
    g = f.create_group("tcbf")
    g["image"] = tcbf.image
    g["image"].attrs["sampling_A"] = _attr(tcbf.sampling_A)
    g["image"].attrs["upsampling_factor"] = tcbf.upsampling_factor
    g["image"].attrs["phase_flipped"] = tcbf.phase_flipped
    g.attrs["sampling_A"] = _attr(tcbf.sampling_A)
    g.attrs["upsampling_factor"] = tcbf.upsampling_factor
    g["shift_and_add"] = tcbf.shift_and_add
    align = f["alignment"]
    align["shifts_px"] = tcbf.shifts_px
    align["error"] = tcbf.errors_px
    align.attrs["schedule"] = np.asarray(tcbf.alignment.schedule, np.int64)
    align.attrs["matrix_px"] = tcbf.alignment.matrix_px
    align.attrs["rows"] = np.asarray(tcbf.rows, np.int64)
    if tcbf.alignment.iterations:  # the last iteration, tile by tile
        it = tcbf.alignment.iterations[-1]
        align["tiles"] = np.column_stack([it.k_px, it.shifts_px, it.quality, it.used])
        align["tiles"].attrs["columns"] = (
            "k_row_px, k_col_px, shift_row_px, shift_col_px, peak_quality, used"
        )
        align["tiles"].attrs["bin_px"] = it.bin_px

    ab = tcbf.aberrations
    if ab is not None:
        a = f.create_group("aberrations")
        a.attrs["C10_A"] = ab.C10_A
        a.attrs["C12_A"] = ab.C12_A
        a.attrs["phi12_rad"] = ab.phi12_rad
        a.attrs["rotation_rad"] = ab.rotation_rad
        a.attrs["transpose"] = ab.transpose
        a.attrs["defocus_A"] = ab.defocus_A
        a.attrs["residual_px"] = ab.residual_px
