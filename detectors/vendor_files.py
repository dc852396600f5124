"""Vendor recordings as frame sources for `simulate --replay`: DECTRIS master/data HDF5 and
Quantum Detectors Merlin `.mib`.

- **DECTRIS**: `series_<id>_master.h5` links `/entry/data/data_000001, ...` to data files whose
  `/entry/data/data` is (N, H, W), one frame per chunk, bitshuffle/LZ4 (filter 32008).
  `read_direct_chunk` returns exactly the bslz4 blob a stream carries, so a replay in a DECTRIS
  protocol sends the stored chunks unchanged (`iter_compressed`), without decompressing or
  recompressing. Metadata from `/entry/instrument/detector/detectorSpecific`.
- **Merlin .mib**: MQ1 frames (ASCII header padded to its data offset + big-endian pixels)
  back to back; a replay in the Merlin protocol sends each frame as it is, wrapped in MPX
  framing (`iter_raw_frames`), after an HDR built from the `.hdr` sidecar when present.

Both also decode frames (`frames`, `iter_batches`) for the other protocols.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tcbf_live.detectors.base import SeriesInfo
from tcbf_live.detectors.compression import compress_bslz4, decompress
from tcbf_live.detectors.files import META_ATTR, DatasetError, RecordedDataset

BITSHUFFLE_FILTER = 32008
# a raw recording of `run --record` (stream/recorder.py): one data file in the master, its
# metadata as JSON in the dataset's META_ATTR, the frames it holds, the detector's pixel mask
RECORDED_DATA = "entry/data/data_000001"
PRESENT = "entry/recording/frames_present"
PIXEL_MASK = "entry/recording/pixel_mask"
RECORDED_FIELDS = ("scan_order", "energy_eV", "step_A", "semiangle_mrad", "angular_sampling_mrad",
                   "rotation_deg", "transpose", "counts_per_electron", "mask_value", "dwell_s")


def is_dectris_master(path: str | Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "entry/data" in f and any(k.startswith("data_") for k in f["entry/data"])
    except (OSError, KeyError):
        return False


def _bslz4_filter(d: h5py.Dataset, itemsize: int) -> bool:
    """The dataset's bitshuffle filter (32008) compresses with LZ4, so its chunks are the
    bslz4 blobs a stream carries. The filter values are stored either as the writer gave them,
    (block size, compression), or as the plugin completes them, (version, version, element
    size, block size, compression); compression 2 is LZ4, 3 zstd, 0 none."""
    plist = d.id.get_create_plist()
    if plist.get_nfilters() != 1:  # bitshuffle alone, or the chunk is not what a stream carries
        return False
    code, _, values, _ = plist.get_filter(0)
    if code != BITSHUFFLE_FILTER:
        return False
    if len(values) >= 5:
        return values[4] == 2 and values[2] in (0, itemsize)
    return len(values) == 2 and values[1] == 2


class DectrisMaster:
    """A DECTRIS FileWriter series (master file + linked data files)."""

    def __init__(self, path: str | Path, overrides: dict[str, Any] | None = None):
        self.path = Path(path)
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        try:
            self._f = h5py.File(self.path, "r")
            group = self._f["entry/data"]
            names = sorted(k for k in group if k.startswith("data_"))
            self._datasets = [group[k] for k in names]
            recorded = json.loads(self._datasets[0].attrs.get(META_ATTR, "{}"))
        except (OSError, KeyError, IndexError, ValueError) as exc:
            raise DatasetError(f"{path}: not a readable DECTRIS master file ({exc})") from None
        # a `run --record` file says how it was taken; the caller's values take precedence
        self.overrides = {**recorded_overrides(recorded), **given}
        shapes = {d.shape[1:] for d in self._datasets}
        if len(shapes) != 1 or any(d.ndim != 3 for d in self._datasets):
            raise DatasetError(f"{path}: data files disagree on the frame shape")
        self.detector_shape = tuple(int(n) for n in shapes.pop())
        self.dtype = np.dtype(self._datasets[0].dtype).newbyteorder("<").str
        self._offsets = np.cumsum([0] + [d.shape[0] for d in self._datasets])
        self.n_frames = int(self._offsets[-1])
        spec = self._f.get("entry/instrument/detector/detectorSpecific")
        self.meta = {k: spec[k][()] for k in spec} if isinstance(spec, h5py.Group) else {}
        scan = self.overrides.get("scan_shape")
        if scan is None:
            raise DatasetError(f"{path}: DECTRIS files do not store the scan shape: pass --scan")
        if scan[0] * scan[1] != self.n_frames:
            raise DatasetError(f"{path}: scan {scan[0]}x{scan[1]} != {self.n_frames} frames")
        self.scan_shape = (int(scan[0]), int(scan[1]))
        itemsize = np.dtype(self.dtype).itemsize
        self._compressed = all(
            d.chunks == (1, *self.detector_shape) and _bslz4_filter(d, itemsize)
            for d in self._datasets
        )
        self.present = self._recorded(PRESENT, (self.n_frames,), bool)  # None: all frames
        self.pixel_mask = self._recorded(PIXEL_MASK, self.detector_shape, bool)

    def _recorded(self, name: str, shape: tuple, dtype) -> np.ndarray | None:
        """An array a raw recording adds (None when absent)."""
        d = self._f.get(name)
        if d is None:
            return None
        if not isinstance(d, h5py.Dataset) or d.shape != shape:
            raise DatasetError(f"{self.path}: /{name} is not {shape}")
        return np.asarray(d[()]).astype(dtype)

    def series_info(self, series_id: int) -> SeriesInfo:
        bits = np.dtype(self.dtype).itemsize * 8
        frame_time = self.meta.get("frame_time")
        info = SeriesInfo(
            series_id=series_id, scan_shape=self.scan_shape, detector_shape=self.detector_shape,
            dtype=self.dtype, counts_per_electron=1.0, mask_value=(1 << bits) - 1,
            frames_expected=self.n_frames,
            dwell_s=float(frame_time) if frame_time is not None else None,
            pixel_mask=self.pixel_mask,
        )  # fmt: skip
        keep = {k: v for k, v in self.overrides.items() if k != "scan_shape"}
        return info.with_overrides(**keep)

    def _locate(self, index: int) -> tuple[h5py.Dataset, int]:
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._datasets[k], index - int(self._offsets[k])

    def iter_compressed(self) -> Iterator[tuple[int, bytes]] | None:
        """(frame index, stored bslz4 chunk) in order, or None when not bitshuffle-chunked."""
        if not self._compressed:
            return None

        def chunks():
            for i in range(self.n_frames):
                if self.present is not None and not self.present[i]:
                    continue  # never recorded: missing in the replay too
                d, j = self._locate(i)
                skipped, blob = d.id.read_direct_chunk((j, 0, 0))
                if skipped:  # HDF5 stored this chunk unfiltered: compress it for the stream
                    blob = compress_bslz4(self._unfiltered(blob, i))
                yield i, bytes(blob)

        return chunks()

    def frames(self, first: int, count: int) -> np.ndarray:
        out = np.empty((count, *self.detector_shape), self.dtype)
        nbytes = int(np.prod(self.detector_shape)) * np.dtype(self.dtype).itemsize
        for k in range(count):
            d, j = self._locate(first + k)
            if self._compressed:  # decode the stored chunk (no HDF5 filter plugin needed)
                skipped, blob = d.id.read_direct_chunk((j, 0, 0))
                if skipped:  # filter mask set: HDF5 stored this chunk as it is
                    out[k] = self._unfiltered(blob, first + k)
                    continue
                raw = decompress("bslz4", np.dtype(self.dtype).itemsize, blob, nbytes)
                out[k] = np.frombuffer(raw, self.dtype).reshape(self.detector_shape)
            else:
                try:
                    out[k] = d[j]
                except OSError as exc:  # e.g. bitshuffle/zstd without its HDF5 plugin
                    raise DatasetError(
                        f"{self.path}: cannot read frame {first + k}: {exc}"
                    ) from None
        return out

    def _unfiltered(self, chunk: bytes, index: int) -> np.ndarray:
        """A chunk HDF5 stored without its filter (the filter mask says so): raw pixels."""
        nbytes = int(np.prod(self.detector_shape)) * np.dtype(self.dtype).itemsize
        if len(chunk) != nbytes:
            raise DatasetError(f"{self.path}: frame {index}: unfiltered chunk of {len(chunk)} "
                               f"bytes, a frame has {nbytes}")  # fmt: skip
        return np.frombuffer(chunk, self.dtype).reshape(self.detector_shape)

    def iter_batches(self, batch: int = 32) -> Iterator[tuple[int, np.ndarray]]:
        """Runs of consecutive frames; frames a recording does not hold are skipped."""
        for first, count in present_runs(self.present, self.n_frames, batch):
            yield first, self.frames(first, count)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> DectrisMaster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def recorded_overrides(meta: dict[str, Any]) -> dict[str, Any]:
    """The SeriesInfo values a raw recording's metadata gives (scan shape included)."""
    out = {k: meta[k] for k in ("scan_shape", *RECORDED_FIELDS) if meta.get(k) is not None}
    if "scan_shape" in out:
        out["scan_shape"] = tuple(int(n) for n in out["scan_shape"])
    return out


def present_runs(present: np.ndarray | None, n_frames: int,
                 batch: int) -> Iterator[tuple[int, int]]:  # fmt: skip
    """(first, count) of consecutive present frames, at most `batch` each (None: all)."""
    if present is None:
        present = np.ones(n_frames, bool)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], present.view(np.int8), [0]))))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        for first in range(int(start), int(stop), batch):
            yield first, min(batch, int(stop) - first)


def open_recording(spec: str, overrides: dict[str, Any]):
    """A .mib (Merlin), a DECTRIS master file (a `run --record` file too), a file RosettaSciIO
    reads (`rsciio_files`: .hspy, .zspy, .blo, EMPAD .xml, .emd) or a 4D .npy / HDF5 dataset:
    the frame sources `simulate --replay` and `reconstruct` read."""
    from tcbf_live.detectors.rsciio_files import RsciioDataset, is_rsciio_file

    if spec.endswith(".mib"):
        return MibFile(spec, overrides)
    if is_rsciio_file(spec):
        return RsciioDataset(spec, overrides)
    if spec.endswith((".h5", ".hdf5")) and is_dectris_master(spec):
        return DectrisMaster(spec, overrides)
    return RecordedDataset(spec, overrides)


class MibFile:
    """A Merlin .mib recording (optionally with its .hdr sidecar)."""

    def __init__(self, path: str | Path, overrides: dict[str, Any] | None = None):
        self.path = Path(path)
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        try:
            data = np.memmap(self.path, np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read ({exc})") from None
        head = bytes(data[:512]).split(b",")
        try:
            if head[0] != b"MQ1":
                raise ValueError
            offset, width, height = int(head[2]), int(head[4]), int(head[5])
            ptype = head[6].decode()
        except (IndexError, ValueError, UnicodeDecodeError):
            raise DatasetError(f"{path}: not a Merlin .mib file (no MQ1 header)") from None
        dtype = {"U08": ">u1", "U16": ">u2", "U32": ">u4"}.get(ptype)
        if dtype is None:
            raise DatasetError(f"{path}: pixel type {ptype} not supported (raw R64)")
        if offset <= 0 or width <= 0 or height <= 0:
            raise DatasetError(f"{path}: MQ1 header with offset {offset}, {width}x{height}")
        self.frame_bytes = offset + width * height * np.dtype(dtype).itemsize
        if data.size % self.frame_bytes:
            raise DatasetError(f"{path}: size is not a whole number of {self.frame_bytes}-byte "
                               "frames (mixed or truncated file)")  # fmt: skip
        self._data, self._offset, self._wire = data, offset, dtype
        self.detector_shape = (height, width)
        self.dtype = np.dtype(dtype).newbyteorder("<").str
        self.n_frames = data.size // self.frame_bytes
        hdr = self.path.with_suffix(".hdr")
        self.header_text = hdr.read_text("latin-1") if hdr.is_file() else None
        scan = self.overrides.get("scan_shape")
        if scan is None and self.header_text:
            from tcbf_live.detectors.merlin import _header_fields

            f = _header_fields(self.header_text)
            if "ScanX" in f and "ScanY" in f:
                try:
                    scan = (int(f["ScanY"]), int(f["ScanX"]))
                except ValueError:
                    raise DatasetError(f"{hdr}: ScanX/ScanY are not integers") from None
        if scan is None:
            raise DatasetError(f"{path}: no ScanX/ScanY in a .hdr sidecar: pass --scan")
        if scan[0] * scan[1] != self.n_frames:
            raise DatasetError(f"{path}: scan {scan[0]}x{scan[1]} != {self.n_frames} frames")
        self.scan_shape = (int(scan[0]), int(scan[1]))

    def series_info(self, series_id: int) -> SeriesInfo:
        info = SeriesInfo(series_id=series_id, scan_shape=self.scan_shape,
                          detector_shape=self.detector_shape, dtype=self.dtype,
                          frames_expected=self.n_frames)  # fmt: skip
        keep = {k: v for k, v in self.overrides.items() if k != "scan_shape"}
        return info.with_overrides(**keep)

    def raw_frame(self, index: int) -> bytes:
        """The stored MQ1 frame (header + big-endian pixels), as the detector sent it."""
        start = index * self.frame_bytes
        return bytes(self._data[start : start + self.frame_bytes])

    def frames(self, first: int, count: int) -> np.ndarray:
        out = np.empty((count, *self.detector_shape), self.dtype)
        for k in range(count):
            start = (first + k) * self.frame_bytes + self._offset
            pixels = np.frombuffer(self._data, self._wire, int(np.prod(self.detector_shape)),
                                   start)  # fmt: skip
            out[k] = pixels.reshape(self.detector_shape)
        return out

    def iter_batches(self, batch: int = 32) -> Iterator[tuple[int, np.ndarray]]:
        for first in range(0, self.n_frames, batch):
            yield first, self.frames(first, min(batch, self.n_frames - first))

    def close(self) -> None:
        pass

    def __enter__(self) -> MibFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
