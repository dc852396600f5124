"""Recorded 4D-STEM datasets: .npy (+ .json sidecar) and HDF5 `FILE.h5:/dataset`.

Arrays are (rows, cols, Qx, Qy) in scan-position order. Metadata (optics, ground truth) lives in
the .json sidecar or in the HDF5 dataset's `tcbf_meta` attribute (JSON text). Reading is lazy:
frames are sliced from a memory map or the HDF5 dataset batch by batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tcbf_live.detectors.base import SeriesInfo, scan_position
from tcbf_live.detectors.native import ALLOWED_DTYPES

META_ATTR = "tcbf_meta"
DEFAULT_H5_DATASET = "/data"


class DatasetError(ValueError):
    """A dataset file that cannot be used (missing, not 4D, unreadable)."""


def split_dataset_spec(spec: str) -> tuple[Path, str | None]:
    """'file.h5:/group/data' -> (Path('file.h5'), '/group/data'); other paths -> (path, None)."""
    path, sep, inner = spec.partition(".h5:")
    if sep:
        return Path(path + ".h5"), inner or DEFAULT_H5_DATASET
    path, sep, inner = spec.partition(".hdf5:")
    if sep:
        return Path(path + ".hdf5"), inner or DEFAULT_H5_DATASET
    p = Path(spec)
    return p, (DEFAULT_H5_DATASET if p.suffix in (".h5", ".hdf5") else None)


class RecordedDataset:
    """A 4D dataset on disk, streamed frame by frame in acquisition (scan) order."""

    def __init__(self, spec: str, overrides: dict[str, Any] | None = None):
        """Open `spec`; `overrides` (None values ignored) replace metadata from the file."""
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        path, inner = split_dataset_spec(spec)
        if not path.is_file():
            raise DatasetError(f"{path}: no such file")
        self.path = path
        self._h5: h5py.File | None = None
        if inner is not None:
            try:
                self._h5 = h5py.File(path, "r")
            except OSError as exc:
                raise DatasetError(f"{path}: not a readable HDF5 file ({exc})") from None
            obj = self._h5.get(inner)
            if not isinstance(obj, h5py.Dataset):
                self.close()
                raise DatasetError(f"{path}: no dataset at {inner}")
            self.array: Any = obj
            meta_text = obj.attrs.get(META_ATTR)
            try:
                self.meta = json.loads(meta_text) if meta_text is not None else {}
            except (TypeError, ValueError):
                self.close()
                raise DatasetError(f"{path}: {META_ATTR} attribute is not JSON") from None
        elif path.suffix == ".npy":
            try:
                self.array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise DatasetError(f"{path}: not a plain .npy array ({exc})") from None
            sidecar = path.with_suffix(".json")
            try:
                self.meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
            except ValueError:
                raise DatasetError(f"{sidecar}: not valid JSON") from None
        else:
            raise DatasetError(f"{path}: expected .npy or .h5/.hdf5[:/dataset]")
        self._adopt(spec)

    def _adopt(self, spec: str) -> None:
        """Check `self.array` (4D, or 3D with a scan shape) and `self.meta`, and take the
        scan shape and order (the overrides first)."""
        shape = tuple(int(n) for n in self.array.shape)
        if self.array.ndim not in (3, 4):
            self.close()
            raise DatasetError(f"{spec}: expected a 4D (rows, cols, Qx, Qy) or 3D (frames, Qx, "
                               f"Qy) array, got {shape}")  # fmt: skip
        scan = self.overrides.get("scan_shape")
        n_frames = int(np.prod(shape[:-2]))
        if scan is None and self.array.ndim == 3:
            scan = self.meta.get("scan_shape")
            if scan is None:
                self.close()
                raise DatasetError(f"{spec}: a 3D frame stack needs the scan shape (--scan)")
        if scan is not None and int(scan[0]) * int(scan[1]) != n_frames:
            self.close()
            raise DatasetError(f"{spec}: scan {scan[0]}x{scan[1]} does not match {n_frames} frames")
        self._scan_shape = (int(scan[0]), int(scan[1])) if scan is not None else shape[:2]
        # frames in acquisition order, one per row of `_flat` (3D stacks are stored that way)
        self._flat = self.array.ndim == 3 or self._scan_shape != shape[:2]
        if self.array.dtype.str not in ALLOWED_DTYPES:
            self.close()
            raise DatasetError(f"{spec}: unsupported dtype {self.array.dtype}")
        if self.array.size == 0:
            self.close()
            raise DatasetError(f"{spec}: the dataset is empty")
        if not isinstance(self.meta, dict):
            self.close()
            raise DatasetError(f"{spec}: metadata must be a JSON object")
        self.scan_order = self.overrides.get("scan_order", self.meta.get("scan_order", "raster"))

    @property
    def scan_shape(self) -> tuple[int, int]:
        return self._scan_shape

    @property
    def stored_by_position(self) -> bool:
        """A 4D array indexed by scan position (serpentine rows stored in scan order), not a
        stack in acquisition order."""
        return not self._flat

    @property
    def detector_shape(self) -> tuple[int, int]:
        return int(self.array.shape[-2]), int(self.array.shape[-1])

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    def series_info(self, series_id: int) -> SeriesInfo:
        """Metadata from the file, with the constructor's `overrides` taking precedence."""
        m = self.meta
        info = SeriesInfo(
            series_id=series_id,
            scan_shape=self.scan_shape,
            detector_shape=self.detector_shape,
            dtype=self.array.dtype.str,
            scan_order=self.scan_order,
            energy_eV=m.get("energy_eV"),
            step_A=m.get("step_A"),
            semiangle_mrad=m.get("semiangle_mrad"),
            angular_sampling_mrad=m.get("angular_sampling_mrad"),
            rotation_deg=m.get("rotation_deg"),
            transpose=m.get("transpose"),
            counts_per_electron=m.get("counts_per_electron", 1.0),
            mask_value=m.get("mask_value"),
            frames_expected=self.n_frames,
            dwell_s=m.get("dwell_s"),
            ground_truth=m or None,
        )
        return info.with_overrides(**self.overrides)

    def frames(self, first: int, count: int) -> np.ndarray:
        ids = np.arange(first, first + count)
        if self._flat:  # acquisition-order stack (or a 4D array re-read with another scan)
            if self.array.ndim == 3:
                return np.ascontiguousarray(self.array[first : first + count])
            rows, cols = np.divmod(ids, self.array.shape[1])
            return np.stack([np.asarray(self.array[r, c]) for r, c in zip(rows, cols, strict=True)])
        if (
            self.scan_order == "raster"
            and isinstance(self.array, np.ndarray)
            and self.array.flags.c_contiguous
        ):
            flat = self.array.reshape(self.n_frames, *self.detector_shape)
            return np.ascontiguousarray(flat[first : first + count])
        rows, cols = scan_position(ids, self.scan_shape, self.scan_order)
        out = np.empty((count, *self.detector_shape), self.array.dtype)
        for r in np.unique(rows):  # one slice read per scan row touched by the batch
            sel = np.flatnonzero(rows == r)
            lo, hi = cols[sel].min(), cols[sel].max()
            out[sel] = np.asarray(self.array[r, lo : hi + 1])[cols[sel] - lo]
        return out

    def iter_batches(self, batch: int = 32) -> Iterator[tuple[int, np.ndarray]]:
        for first in range(0, self.n_frames, batch):
            yield first, self.frames(first, min(batch, self.n_frames - first))

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> RecordedDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_dataset(
    spec: str,
    scan_shape: tuple[int, int],
    detector_shape: tuple[int, int],
    dtype: np.dtype,
    meta: dict[str, Any],
    batches: Iterator[tuple[int, np.ndarray]],
    scan_order: str = "raster",
    extra_arrays: dict[str, tuple[np.ndarray, dict[str, Any]]] | None = None,
) -> Path:
    """Write frames arriving in acquisition order to .npy (+ .json) or HDF5, batch by batch.

    `extra_arrays` (HDF5 only) maps dataset paths to (array, attrs), e.g. the true phase.
    """
    path, inner = split_dataset_spec(spec)
    shape = (*scan_shape, *detector_shape)
    meta = {**meta, "scan_order": scan_order}
    if inner is None and path.suffix != ".npy":
        raise DatasetError(f"{path}: save to .npy or .h5")
    reserved = {name.strip("/").split("/")[0] for name in (extra_arrays or {})}
    if inner is not None and inner.strip("/").split("/")[0] in reserved:
        raise DatasetError(f"{spec}: {inner} is reserved for ground truth; use e.g. /data")
    path.parent.mkdir(parents=True, exist_ok=True)
    if inner is None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        for first, frames in batches:
            r, c = scan_position(np.arange(first, first + len(frames)), scan_shape, scan_order)
            out[r, c] = frames
        out.flush()
        del out
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return path
    with h5py.File(path, "w") as f:
        chunk = (1, min(scan_shape[1], 16), *detector_shape)
        ds = f.create_dataset(inner, shape=shape, dtype=dtype, chunks=chunk)
        ds.attrs[META_ATTR] = json.dumps(meta)
        for key in ("energy_eV", "step_A", "semiangle_mrad", "angular_sampling_mrad"):
            if meta.get(key) is not None:
                ds.attrs[key] = meta[key]
        for first, frames in batches:
            rows, cols = scan_position(
                np.arange(first, first + len(frames)), scan_shape, scan_order
            )
            for r in np.unique(rows):  # a batch covers a contiguous column range per row
                sel = np.flatnonzero(rows == r)
                lo, hi = cols[sel].min(), cols[sel].max()
                block = np.empty((hi - lo + 1, *detector_shape), dtype)
                block[cols[sel] - lo] = frames[sel]
                ds[r, lo : hi + 1] = block
        for name, (arr, attrs) in (extra_arrays or {}).items():
            d = f.create_dataset(name, data=arr)
            for k, v in attrs.items():
                d.attrs[k] = v
    return path
