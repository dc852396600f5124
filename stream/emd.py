"""A result file (`hdf5.write_result`'s layout) as an EMD 1.0 file that py4DSTEM opens
(`py4DSTEM.read`), written with `emdfile`, the library py4DSTEM's own files are written with.

Why a second file rather than the result itself in EMD: the result's paths (`/tcbf/image`,
`/aberrations`, ...) are what users' scripts read, and an EMD 1.0 tree nests every node under
a root group with its own attributes; both in one file would duplicate every array. The export
reads the written result (its public layout), so it works on any result, live or offline.

The tree (root "tcbf_live"): arrays `tcbf_image` (phase-flipped, upsampled; dims in A),
`shift_and_add`, `incoherent_bf`, `axial_bf` (dims in A), `bf_shifts_px` and `bf_pixels` (per
BF pixel); metadata `aberrations` (py4DSTEM's polar keys: C10, C12, phi12, C21, phi21, C23,
phi23, C30 in A and rad, the scan frame; the rotation and transpose; `*_err` 1-sigma errors;
`angle_unit`: "rad") and `acquisition` (energy, step, semi-angle, angular sampling, scan and
detector shape, dose).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np

from tcbf_live.stream.outputs import atomic_output

POLAR_KEYS = ("C10", "C12", "phi12", "C21", "phi21", "C23", "phi23", "C30")


def _plain(value):
    """h5py attribute -> something emdfile stores (numbers, strings, lists)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def polar_aberrations(attrs: dict) -> dict:
    """py4DSTEM-style polar dict (A, rad) from `/aberrations` attributes, with the errors."""
    out = {"angle_unit": "rad", "length_unit": "A"}
    polar = attrs.get("polar")
    polar = json.loads(polar) if isinstance(polar, str | bytes) else {}
    for key in POLAR_KEYS:
        name = key if key.startswith("phi") else f"{key}_A"
        name = f"{name}_rad" if key.startswith("phi") else name
        value = attrs.get(name, polar.get(key))
        if value is not None and math.isfinite(float(value)):
            out[key] = float(value)
        err = attrs.get(f"{name}_err")
        if err is not None and math.isfinite(float(err)):
            out[f"{key}_err"] = float(err)
    for name in ("rotation_rad", "rotation_rad_err", "defocus_A", "transpose"):
        if name in attrs:
            out[name] = _plain(attrs[name])
    return out


def _image(emdfile, data: np.ndarray, name: str, sampling_A: float, units: str):
    """An emdfile Array of a real-space image with its pixel size (A)."""
    return emdfile.Array(data, name=name, units=units, dims=[sampling_A, sampling_A],
                         dim_names=["R_x", "R_y"], dim_units=["A", "A"])  # fmt: skip


def write_emd(result_path: str | Path, emd_path: str | Path, overwrite: bool = False) -> Path:
    """Write the EMD 1.0 file of the result `result_path` (atomically; an existing file only
    with `overwrite`). Needs the optional `emdfile` package (`pip install tcbf-live[emd]`)."""
    import emdfile

    root = emdfile.Root(name="tcbf_live")
    with h5py.File(result_path, "r") as f:
        acq = {k: _plain(v) for k, v in f["acquisition"].attrs.items()}
        step = float(acq.get("step_A") or 1.0)
        arrays = [_image(emdfile, f["bf/incoherent"][()], "incoherent_bf", step, "counts"),
                  _image(emdfile, f["bf/axial"][()], "axial_bf", step, "counts")]  # fmt: skip
        if "tcbf" in f:
            s = float(f["tcbf/image"].attrs.get("sampling_A") or step)
            arrays += [_image(emdfile, f["tcbf/image"][()], "tcbf_image", s, "rad"),
                       _image(emdfile, f["tcbf/shift_and_add"][()], "shift_and_add", s, ""),
                       emdfile.Array(f["alignment/shifts_px"][()], name="bf_shifts_px",
                                     units="scan px"),
                       emdfile.Array(f["alignment/bf_pixels"][()], name="bf_pixels",
                                     units="detector px")]  # fmt: skip
        ab = dict(f["aberrations"].attrs) if "aberrations" in f else {}
    for a in arrays:
        root.add_to_tree(a)
    keep = ("energy_eV", "step_A", "semiangle_mrad", "angular_sampling_mrad", "scan_shape",
            "detector_shape", "frames_received", "series_id")  # fmt: skip
    root.metadata = emdfile.Metadata(name="aberrations", data=polar_aberrations(ab))
    root.metadata = emdfile.Metadata(name="acquisition",
                                     data={k: acq[k] for k in keep if acq.get(k) is not None})
    with atomic_output(Path(emd_path), overwrite) as tmp:
        emdfile.save(str(tmp), root, mode="o")
    return Path(emd_path)
