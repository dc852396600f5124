"""A result file as a HyperSpy file (`.hspy`), written with RosettaSciIO: `hyperspy.api.load`
(and napari/pyxem through RosettaSciIO) opens the images with physical axes.

One `.hspy` holds four signals (HyperSpy "experiments"; `hs.load` returns them as a list):
- `tcBF image`: the phase-flipped, upsampled image (y, x in A, its sampling);
- `incoherent BF`, `axial BF`: the virtual bright-field images (y, x in A, the scan step);
- `BF shifts`: the fitted shift of each BF pixel's image (scan px) on the detector grid,
  navigation axis `component` (row, col shift), signal axes k_y, k_x in mrad relative to the
  disk centre (the angular sampling); NaN outside the bright field.
The metadata carry the beam energy (keV) and convergence angle (mrad) where HyperSpy keeps them
(`Acquisition_instrument.TEM`), the aberrations as py4DSTEM's polar dict
(`tcBF.aberrations`, A and rad) and the result's `/acquisition` attributes as
`original_metadata`.

Why `.hspy` and not `.zspy`: RosettaSciIO's zarr writer holds one signal per store, its HDF5
writer several in one file; HyperSpy converts either way (`s.save("x.zspy")`).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from tcbf_live.stream.emd import _plain, polar_aberrations
from tcbf_live.stream.outputs import atomic_output


def _axis(name: str, size: int, scale: float, units: str, offset: float = 0.0,
          navigate: bool = False) -> dict:  # fmt: skip
    return {"name": name, "size": int(size), "scale": float(scale), "offset": float(offset),
            "units": units, "navigate": navigate}  # fmt: skip


def _signal(data: np.ndarray, axes: list[dict], title: str, quantity: str, meta: dict,
            original: dict) -> dict:  # fmt: skip
    """A RosettaSciIO signal dictionary."""
    return {
        "data": data, "axes": axes,
        "metadata": {"General": {"title": title}, "Signal": {"quantity": quantity}, **meta},
        "original_metadata": original, "attributes": {"_lazy": False},
        "tmp_parameters": {}, "learning_results": {}, "models": {},
        "package_info": {"package": "", "package_version": ""},  # plain HyperSpy signals
    }  # fmt: skip


def _image(data: np.ndarray, sampling_A: float, title: str, quantity: str, meta: dict,
           original: dict) -> dict:  # fmt: skip
    axes = [_axis("y", data.shape[0], sampling_A, "Å"), _axis("x", data.shape[1], sampling_A, "Å")]
    return _signal(np.asarray(data), axes, title, quantity, meta, original)


def _shift_map(f: h5py.File, sampling_mrad: float | None, original: dict, meta: dict) -> dict:
    """The per-BF-pixel shifts on the detector grid (2, Qy, Qx), NaN outside the BF disk."""
    det = tuple(int(n) for n in f["acquisition"].attrs["detector_shape"])
    pixels = f["alignment/bf_pixels"][()].astype(int)
    shifts = f["alignment/shifts_px"][()]
    grid = np.full((2, *det), np.nan)
    grid[:, pixels[:, 0], pixels[:, 1]] = shifts.T
    centre = np.asarray(f["alignment"].attrs.get("center_px", np.array(det) / 2 - 0.5))
    scale, units = (sampling_mrad, "mrad") if sampling_mrad else (1.0, "px")
    axes = [_axis("component", 2, 1.0, "", navigate=True),
            _axis("k_y", det[0], scale, units, -float(centre[0]) * scale),
            _axis("k_x", det[1], scale, units, -float(centre[1]) * scale)]  # fmt: skip
    return _signal(grid, axes, "BF shifts", "shift (scan px)", meta, original)


def signals(result_path: str | Path) -> list[dict]:
    """The RosettaSciIO signal dictionaries of a result file (see the module docstring)."""
    with h5py.File(result_path, "r") as f:
        acq = {k: _plain(v) for k, v in f["acquisition"].attrs.items()}
        step = float(acq.get("step_A") or 1.0)
        tem = {}
        if acq.get("energy_eV"):
            tem["beam_energy"] = float(acq["energy_eV"]) / 1e3
        if acq.get("semiangle_mrad"):
            tem["convergence_angle"] = float(acq["semiangle_mrad"])
        ab = dict(f["aberrations"].attrs) if "aberrations" in f else {}
        meta = {"Acquisition_instrument": {"TEM": tem},
                "tcBF": {"aberrations": polar_aberrations(ab)}}  # fmt: skip
        original = {"acquisition": acq}
        out = []
        if "tcbf" in f:
            s = float(f["tcbf/image"].attrs.get("sampling_A") or step)
            out.append(_image(f["tcbf/image"][()], s, "tcBF image", "phase (rad)", meta,
                              original))  # fmt: skip
        out += [_image(f["bf/incoherent"][()], step, "incoherent BF", "counts", meta, original),
                _image(f["bf/axial"][()], step, "axial BF", "counts", meta, original)]  # fmt: skip
        if "tcbf" in f and "alignment/shifts_px" in f:
            out.append(_shift_map(f, acq.get("angular_sampling_mrad"), original, meta))
    return out


def write_hspy(result_path: str | Path, out_path: str | Path, overwrite: bool = False) -> Path:
    """Write the `.hspy` file of the result `result_path` (atomically; an existing file only
    with `overwrite`). Needs RosettaSciIO (`pip install "tcbf-live[hyperspy]"`)."""
    from rsciio.hspy import file_writer

    with atomic_output(Path(out_path), overwrite) as tmp:
        first, *more = signals(result_path)
        file_writer(str(tmp), first, show_progressbar=False)
        # each further signal through its own file, its experiment group copied in (the
        # writer's append mode passes `mode` on to h5py's require_dataset, which refuses it)
        part = tmp.with_name(tmp.name + ".part")
        try:
            for signal in more:
                file_writer(str(part), signal, show_progressbar=False)
                with h5py.File(part, "r") as src, h5py.File(tmp, "a") as dst:
                    title = signal["metadata"]["General"]["title"]
                    src.copy(src[f"Experiments/{title}"], dst["Experiments"], name=title)
        finally:
            part.unlink(missing_ok=True)
    return Path(out_path)
