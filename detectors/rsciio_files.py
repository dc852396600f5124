"""4D-STEM files that RosettaSciIO reads, read lazily through it: HyperSpy `.hspy`/`.zspy`,
EMPAD `.xml` (with its raw file), NanoMegas/Gatan `.blo`, EMD (Velox, NCEM) `.emd`.

`reconstruct` and `simulate --replay` take them as any other recording: the first signal
with two signal and one or two navigation axes is the scan; its axes give the scan step (a
length unit: A, nm, pm, um) and the angular sampling (mrad or rad), its metadata the beam
energy and convergence angle (HyperSpy's `Acquisition_instrument.TEM`); flags override
them. Frames are read a scan row at a time from RosettaSciIO's dask array, so a file larger
than memory is streamed.

Readers of our own remain where they do more: Merlin `.mib` (`vendor_files.MibFile`: the
stored MQ1 frames are replayed unchanged in the Merlin protocol, the `.hdr`'s scan size is
read) and DECTRIS master files (`vendor_files.DectrisMaster`: the stored bslz4 chunks are sent
unchanged, a `run --record` file's missing frames and pixel mask are kept).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from tcbf_live.detectors.base import SeriesInfo
from tcbf_live.detectors.files import DatasetError, RecordedDataset

READERS = {".hspy": "hspy", ".zspy": "zspy", ".blo": "blockfile", ".xml": "empad",
           ".emd": "emd"}  # fmt: skip
LENGTH_A = {"a": 1.0, "å": 1.0, "angstrom": 1.0, "nm": 10.0, "pm": 0.01, "um": 1e4, "µm": 1e4}
ANGLE_MRAD = {"mrad": 1.0, "rad": 1e3}


def is_rsciio_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in READERS


def scan_metadata(signal: dict[str, Any]) -> dict[str, float]:
    """energy_eV, semiangle_mrad, step_A and angular_sampling_mrad where the signal's
    metadata and axes give them (axes with other units give nothing: a detector calibrated
    in reciprocal length gets its angular sampling from the convergence angle and the
    measured disk radius, or from --angular-sampling)."""
    tem = signal.get("metadata", {}).get("Acquisition_instrument", {}).get("TEM", {})
    out: dict[str, float] = {}
    if tem.get("beam_energy"):
        out["energy_eV"] = float(tem["beam_energy"]) * 1e3  # HyperSpy: keV
    if tem.get("convergence_angle"):
        out["semiangle_mrad"] = float(tem["convergence_angle"])
    nav = [a for a in signal["axes"] if a.get("navigate")]
    sig = [a for a in signal["axes"] if not a.get("navigate")]
    units = str(nav[-1].get("units") or "").strip().lower()
    if nav and units in LENGTH_A:
        out["step_A"] = float(nav[-1]["scale"]) * LENGTH_A[units]
    units = str(sig[-1].get("units") or "").strip().lower()
    if units in ANGLE_MRAD:
        out["angular_sampling_mrad"] = float(sig[-1]["scale"]) * ANGLE_MRAD[units]
    return out


def _scan_signal(signals: list[dict], path: Path) -> dict:
    """The first signal with two signal and two navigation axes (a 4D scan), else the first
    with one navigation axis (a frame stack, with --scan)."""
    for want in (2, 1):
        for s in signals:
            n_nav = sum(1 for a in s["axes"] if a.get("navigate"))
            if len(s["axes"]) - n_nav == 2 and n_nav == want:
                return s
    shapes = ", ".join(str(tuple(s["data"].shape)) for s in signals)
    raise DatasetError(f"{path}: no 4D-STEM signal (two signal axes and one or two "
                       f"navigation axes) among {shapes or 'no signals'}")  # fmt: skip


class RsciioDataset(RecordedDataset):
    """A 4D-STEM file read through RosettaSciIO (lazily), frames in scan order."""

    def __init__(self, spec: str, overrides: dict[str, Any] | None = None):
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.path, self._h5 = Path(spec), None
        if not self.path.exists():
            raise DatasetError(f"{self.path}: no such file")
        try:
            reader = importlib.import_module(f"rsciio.{READERS[self.path.suffix.lower()]}")
        except ImportError:
            raise DatasetError(f"{self.path}: reading it needs RosettaSciIO: pip install "
                               '"tcbf-live[hyperspy]"') from None  # fmt: skip
        try:
            signals = reader.file_reader(str(self.path), lazy=True)
        except Exception as exc:  # a reader's own error, whatever its type: one clear line
            raise DatasetError(f"{self.path}: RosettaSciIO cannot read it ({exc})") from None
        signal = _scan_signal(signals, self.path)
        axes = signal["axes"]
        order = [i for i, a in enumerate(axes) if a.get("navigate")]
        order += [i for i, a in enumerate(axes) if not a.get("navigate")]
        data = signal["data"]
        self.array = data if order == sorted(order) else data.transpose(order)
        self.meta = scan_metadata(signal)
        self._adopt(str(self.path))

    def series_info(self, series_id: int) -> SeriesInfo:
        """As `RecordedDataset`'s, without ground truth (the metadata are the file's)."""
        return replace(super().series_info(series_id), ground_truth=None)

    def close(self) -> None:
        """Close the file RosettaSciIO keeps open for the lazy array (HDF5, TIFF)."""
        try:
            from rsciio.utils.file import get_file_handle

            handle = get_file_handle(self.array, warn=False) if hasattr(self.array, "dask") \
                else None  # fmt: skip
        except (ImportError, AttributeError):  # an older RosettaSciIO: left to the collector
            handle = None
        if handle is not None:
            handle.close()
