"""HDF5 result file: the layout other tools read, the public contract of docs/result-file.md.

Written by one serializer: each group's attributes are declared once, as a table of attribute
name -> value of the result (`ACQUISITION`, `DOSE`, ...) or the fields of a dataclass
(`AberrationFit`), and `write_attrs` writes any of them (None -> NaN, tuples -> int arrays,
dicts and lists of text -> JSON). The per-position maps come from `result.POSITION_MAPS`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tcbf_live import __version__
from tcbf_live.stream.outputs import atomic_output
from tcbf_live.stream.result import POSITION_MAPS, SeriesResult
from tcbf_live.stream.tcbf import descan

SOFTWARE = "tcbf-live"

Getter = Callable[[SeriesResult], Any]


def _sampling(r: SeriesResult) -> float | None:
    cal = r.calibration
    return cal.angular_sampling_mrad if cal is not None else r.info.angular_sampling_mrad


# /acquisition attributes: what was scanned, what arrived, what screening excluded
ACQUISITION: dict[str, Getter] = {
    "scan_shape": lambda r: tuple(r.info.scan_shape),
    "scan_order": lambda r: r.info.scan_order,
    "detector_shape": lambda r: tuple(r.info.detector_shape),
    "step_A": lambda r: r.info.step_A,
    "energy_eV": lambda r: r.info.energy_eV,
    "semiangle_mrad": lambda r: r.info.semiangle_mrad,
    "angular_sampling_mrad": _sampling,
    "frames_received": lambda r: r.frames_received,
    "frames_missing": lambda r: r.frames_missing,
    "frames_expected": lambda r: r.frames_expected,
    "frames_duplicate": lambda r: r.duplicates,
    "frames_out_of_order": lambda r: r.out_of_order,
    "frames_out_of_range": lambda r: r.out_of_range,
    "complete": lambda r: r.complete,
    # screening (docs/reliability.md): excluded frames still count as received
    "frames_excluded": lambda r: r.frames_excluded,
    "frames_excluded_by_reason": lambda r: dict(r.excluded_reasons),
    "hot_pixels": lambda r: r.calibration.hot_pixels if r.calibration is not None else 0,
    "dead_pixels": lambda r: r.calibration.dead_pixels if r.calibration is not None else 0,
    "pixels_excluded_mid_scan": lambda r: r.pixels_excluded,  # turned hot/dead later
    "suspect": lambda r: list(r.suspect),  # reasons not to trust the image
    "frames_dropped_by_detector": lambda r: r.detector_dropped,  # NaN: unknown
    "series_id": lambda r: r.info.series_id,
}

# /dose attributes: the dose, the beam, and what resolution the dose bought (docs/dose.md)
DOSE: dict[str, Getter] = {
    "dose_e_per_A2": lambda r: r.dose_e_per_A2,
    "electrons_total": lambda r: r.electrons_total,
    "counts_per_electron": lambda r: r.info.counts_per_electron,
    "projected_dose_e_per_A2": lambda r: r.projected_dose_e_per_A2,
    "beam_current_pA": lambda r: r.beam_current_pA,
    "dwell_s": lambda r: r.info.dwell_s,
    "resolution_A": lambda r: r.tcbf.resolution_A if r.tcbf else None,
    "resolution_half_bit_A": lambda r: r.tcbf.resolution_half_bit_A if r.tcbf else None,
    "resolution_limited_by_sampling": lambda r: bool(r.tcbf and r.tcbf.resolution_limited),
}

# /aberrations attributes: fields of the fit (plus defocus_A = -C10_A)
ABERRATIONS = ("C10_A", "C12_A", "phi12_rad", "rotation_rad", "transpose", "defocus_A",
               "residual_px")  # fmt: skip

TRUST_COLUMNS = ("bin_px", "n_tiles", "min_electrons", "median_electrons", "threshold",
                 "trusted", "dose_needed_e_per_A2")  # fmt: skip


def _value(v: Any) -> Any:
    """One attribute value as HDF5 stores it."""
    if v is None:
        return np.nan
    if isinstance(v, dict) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        return json.dumps(v)
    if isinstance(v, tuple):
        return np.asarray(v, np.int64)
    return v


def write_attrs(group: h5py.Group | h5py.Dataset, values: Mapping[str, Any]) -> None:
    """The one serializer: every value of `values` as an attribute of `group`."""
    for name, v in values.items():
        group.attrs[name] = _value(v)


def table(result: SeriesResult, getters: Mapping[str, Getter]) -> dict[str, Any]:
    return {name: get(result) for name, get in getters.items()}


def fields_of(obj: Any, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A dataclass's fields (or the named fields and properties) as attribute values."""
    names = names or tuple(f.name for f in dataclasses.fields(obj))
    return {n: getattr(obj, n) for n in names}


def _columns(group: h5py.Group, name: str, data: np.ndarray, columns: str) -> None:
    group[name] = data
    group[name].attrs["columns"] = columns


def write_result(
    path: str | Path, result: SeriesResult, protocol: str, overwrite: bool = False
) -> Path:
    """Write one series' result atomically: to a temporary file beside `path`, flushed, then
    moved into place, so `path` never holds half a file. An existing `path` is replaced only
    with `overwrite`; else `outputs.OutputExists` and nothing is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite) as tmp, h5py.File(tmp, "w") as f:
        write_attrs(f, {"software": SOFTWARE, "software_version": __version__,
                        "created": datetime.datetime.now(datetime.UTC).isoformat()})  # fmt: skip
        acq = f.create_group("acquisition")
        write_attrs(acq, table(result, ACQUISITION) | {"protocol": protocol})
        if result.info.ground_truth:
            write_attrs(acq, {"ground_truth": dict(result.info.ground_truth)})
        if result.excluded is not None:
            acq["excluded"] = result.excluded
        for name, m in POSITION_MAPS.items():
            if m.path:
                f[m.path] = getattr(result, name)
        write_calibration(f, result)
        if result.tcbf is not None:
            write_tcbf(f, result.tcbf)
        # the choice of alignment and its reason (also when there is no model)
        f.require_group("alignment").attrs["method_note"] = result.alignment_note
        write_dose(f.require_group("dose"), result)
    return path


def write_calibration(f: h5py.File, result: SeriesResult) -> None:
    """/alignment/bf_pixels and the BF-disk geometry; /calibration (mean pattern, mask)."""
    align, cal = f.create_group("alignment"), result.calibration
    align["bf_pixels"] = cal.bf_pixels if cal is not None else np.zeros((0, 2), np.int32)
    write_attrs(align, {"bins": tuple(result.bins), "n_tiles": tuple(result.n_tiles)})
    if cal is None:
        return
    write_attrs(align, {"center_px": np.asarray(cal.center_px), "radius_px": cal.radius_px,
                        "bf_threshold": cal.threshold})  # fmt: skip
    cg = f.create_group("calibration")
    cg["mean_pattern"] = cal.mean_pattern
    cg["mask"] = cal.mask


def write_dose(dose: h5py.Group, result: SeriesResult) -> None:
    """/dose: attributes (`DOSE`), the dose map, BF fraction, FRC and resolution history."""
    write_attrs(dose, table(result, DOSE))
    dose["bf_fraction"] = result.bf_fraction
    t = result.tcbf
    if t is None:
        return
    if t.frc is not None:
        frc = np.column_stack([t.frc.q_per_A, t.frc.frc, t.frc.n_pixels])
        _columns(dose, "frc", frc, "q_per_A, frc, ring_pixels")
    rvd = t.resolution_vs_dose if t.resolution_vs_dose is not None else np.zeros((0, 4))
    columns = "scan_dose_e_per_A2, resolution_A, resolution_better_A, resolution_worse_A"
    _columns(dose, "resolution_vs_dose", rvd, columns)
    if t.target_resolution_A is not None:
        estimate = t.dose_for_target_e_per_A2
        write_attrs(dose, {"target_resolution_A": t.target_resolution_A,
                           "dose_for_target_e_per_A2_estimate": estimate})  # fmt: skip
    if t.trust:
        rows = [[_value(getattr(x, c)) for c in TRUST_COLUMNS] for x in t.trust]
        _columns(dose, "trust", np.array(rows, float),
                 "bin_px, tiles, min_tile_electrons, median_tile_electrons, threshold, "
                 "trusted, scan_dose_needed_e_per_A2_estimate")  # fmt: skip


def write_tcbf(f: h5py.File, tcbf) -> None:
    """/tcbf (image, shift-and-add), /alignment (shifts, misfit, tiles), /aberrations."""
    g = f.create_group("tcbf")
    sampling = {"sampling_A": tcbf.sampling_A, "upsampling_factor": tcbf.upsampling_factor,
                "chi_model": tcbf.chi_model}
    g["image"] = tcbf.image
    write_attrs(g["image"], sampling | {"phase_flipped": tcbf.phase_flipped})
    write_attrs(g, sampling)
    g["shift_and_add"] = tcbf.shift_and_add
    align = f["alignment"]
    align["shifts_px"] = tcbf.shifts_px
    align["error"] = tcbf.errors_px
    a = tcbf.alignment
    write_attrs(align, {"schedule": tuple(a.schedule), "rows": tuple(tcbf.rows),
                        "matrix_px": a.matrix_px, "method": a.method})  # fmt: skip
    if tcbf.alignment.iterations:  # the last iteration, tile by tile
        it = tcbf.alignment.iterations[-1]
        _columns(align, "tiles", np.column_stack([it.k_px, it.shifts_px, it.quality, it.used]),
                 "k_row_px, k_col_px, shift_row_px, shift_col_px, peak_quality, used")  # fmt: skip
        align["tiles"].attrs["bin_px"] = it.bin_px
    if tcbf.aberrations is not None:
        ab = tcbf.aberrations
        errors = {f"{k}_err": v for k, v in (ab.errors or {}).items()}
        write_attrs(f.create_group("aberrations"), fields_of(ab, ABERRATIONS) | errors)
        if tcbf.higher is not None:  # C21, C23, C30 with uncertainties (`tcbf.higher_order`)
            write_attrs(f["aberrations"], tcbf.higher.file_attributes())
    s = tcbf.descan
    if s is not None:  # the BF disk's drift (`tcbf.descan`); per position and the model
        f.create_group("descan")["centre_px"] = s.centres_px
        write_attrs(f["descan"], {
            "model": s.model,
            "terms": ", ".join(descan.TERMS[: len(s.coefficients_px)]),
            "coefficients_px": s.coefficients_px,
            "errors_px": s.errors_px, "per_step_px": s.per_step_px, "residual_px": s.residual_px,
            "drift_px": s.drift_px(), "moment_gain": s.gain,
            "compensated": s.read_shift_px is not None, "positions_clipped": s.clipped,
            "method": "BF first moments" if s.read_shift_px is None else "centre of mass",
        })  # fmt: skip
        if s.read_shift_px is not None:  # where each position's BF pixels were read
            f["descan"]["read_shift_px"] = s.read_shift_px
    d = tcbf.depth
    if d is not None:  # refocused sections (`tcbf.depth`), one image per offset
        g.create_dataset("depth_sections", data=d.images, chunks=(1, *d.images.shape[1:]))
        write_attrs(g["depth_sections"], sampling | {
            "offsets_A": d.offsets_A, "sharpness": d.sharpness, "phase_flipped": d.phase_flipped,
            "depth_of_field_A": d.depth_of_field_A, "sharpest_offset_A": d.sharpest_offset_A,
            "offset_convention": "change of defocus from the fitted one (C10 - offset)",
        })  # fmt: skip
