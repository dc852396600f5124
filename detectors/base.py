"""What every detector decoder produces: series metadata, frame batches, series ends.

Decoders are pure: wire message parts in, one of these events out, or `DecodeError` with a
reason. Sockets, counting and logging live in `stream/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np


class DecodeError(ValueError):
    """A message that cannot be used. `reason` is a short stable key for counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


SCAN_ORDERS = ("raster", "serpentine")
LZ4_MAX_RATIO = 256  # an LZ4 block never decompresses to more than ~255x its size


class CollectsErrors:
    """For decoders that turn one input into several events: a bad part is recorded instead
    of discarding the good events decoded before it. `decode` raises the first error only
    when nothing else came out; receivers count the rest with `drain_errors()`."""

    def _init_errors(self) -> None:
        self._errors: list[DecodeError] = []

    def drain_errors(self) -> list[DecodeError]:
        errors, self._errors = self._errors, []
        return errors

    def _finish(self, events: list) -> list:
        if self._errors and not events:
            first = self._errors.pop(0)
            raise first
        return events


def header_int(d: Any, key: str, low: int = 0, high: int = 1 << 62) -> int:
    """An integer header field within [low, high] (bools and floats refused), else
    DecodeError: the shared check of every decoder's numeric header fields."""
    v = d.get(key)
    if type(v) is not int or not low <= v <= high:
        raise DecodeError("bad_header", f"{key} must be an integer in [{low}, {high}]")
    return v


def known_series(known: dict, series: int, what: str):
    """The state a decoder remembers for `series` (its start), or the DecodeError that says why
    `what` (e.g. "frames", "image") of it cannot be decoded."""
    state = known.get(series)
    if state is not None:
        return state
    if not known:
        raise DecodeError("no_start", f"{what} of series {series} before its start")
    raise DecodeError("wrong_series", f"{what} of series {series}, whose start never came "
                      f"(known: {', '.join(map(str, known))})")  # fmt: skip


def defect_mask(raw: Any, detector_shape: tuple[int, int]) -> np.ndarray:
    """The detector's own pixel mask (DECTRIS: uint32 LE bit flags per pixel; gap, dead,
    under/over-responding, noisy...) as bool (True = exclude): any flag set excludes the pixel.
    DecodeError if the blob does not hold one uint32 per detector pixel."""
    data = memoryview(raw).cast("B")
    expected = 4 * detector_shape[0] * detector_shape[1]
    if data.nbytes != expected:
        raise DecodeError("size_mismatch", f"pixel mask of {data.nbytes} bytes, detector "
                          f"needs {expected}")  # fmt: skip
    return np.frombuffer(data, "<u4").reshape(detector_shape) != 0


def scan_position(
    frame_index: np.ndarray, scan_shape: tuple[int, int], order: str = "raster"
) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each frame index for raster or serpentine (boustrophedon) scans."""
    row, col = np.divmod(np.asarray(frame_index), scan_shape[1])
    if order == "serpentine":
        col = np.where(row % 2 == 1, scan_shape[1] - 1 - col, col)
    return row, col


@dataclass(frozen=True)
class SeriesInfo:
    """Acquisition metadata announced at the start of a series (units in the names)."""

    series_id: int
    scan_shape: tuple[int, int] | None  # (rows, cols); None when the detector does not say
    detector_shape: tuple[int, int]
    dtype: str  # numpy dtype string, e.g. "<u2"
    scan_order: str = "raster"
    energy_eV: float | None = None
    step_A: float | None = None
    semiangle_mrad: float | None = None
    angular_sampling_mrad: float | None = None
    rotation_deg: float | None = None
    transpose: bool | None = None
    counts_per_electron: float = 1.0
    mask_value: int | None = None  # pixels carrying this value are dead/hot (2**bits - 1)
    # pixels the detector flags as defective (True = exclude), e.g. a DECTRIS pixel mask sent
    # with header_detail "all": needed when the detector does not apply it to the images
    pixel_mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    frames_expected: int | None = None
    dwell_s: float | None = None
    ground_truth: dict[str, Any] | None = field(default=None, compare=False)

    def with_overrides(self, **values: Any) -> SeriesInfo:
        """A copy with every given value that is not None replacing the announced one."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def frame_nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * self.detector_shape[0] * self.detector_shape[1])


def describe_change(old: SeriesInfo, new: SeriesInfo) -> str:
    """'detector_shape (128, 128) -> (64, 64), dtype <u2 -> <f4': what a repeated start
    changes (fields compared by SeriesInfo equality only)."""
    changes = [f"{f.name} {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
               for f in fields(SeriesInfo)
               if f.compare and getattr(old, f.name) != getattr(new, f.name)]  # fmt: skip
    return ", ".join(changes) or "other metadata"


@dataclass(frozen=True)
class SeriesStart:
    info: SeriesInfo
    repeat: bool  # the sender's re-announcement of a series already under way


@dataclass(frozen=True)
class FrameBatch:
    """`frames` is (count, Qx, Qy), a view on the message buffer where possible (read-only)."""

    series_id: int
    first: int
    frames: np.ndarray
    seq: int | None = None


@dataclass(frozen=True)
class CompressedFrame:
    """One DECTRIS frame left bslz4-compressed by a decoder asked to (`defer_bslz4`): the
    accumulate kernel decompresses it straight into its cache-resident buffer, which saves a
    bytes object and a staging copy per frame. The decoder has checked everything but the
    blob's contents; `decoded()` gives the FrameBatch for every other use."""

    series_id: int
    first: int
    blob: Any  # bytes-like: the bslz4 header and blocks, as received
    element_size: int
    shape: tuple[int, int]
    dtype: str

    def decoded(self) -> FrameBatch:
        """DecodeError if the blob does not decompress to exactly one frame."""
        from tcbf_live.detectors.compression import decompress

        nbytes = np.dtype(self.dtype).itemsize * self.shape[0] * self.shape[1]
        raw = decompress("bslz4", self.element_size, self.blob, nbytes)
        frames = np.frombuffer(raw, self.dtype).reshape(1, *self.shape)
        return FrameBatch(self.series_id, self.first, frames)


@dataclass(frozen=True)
class SeriesEnd:
    series_id: int
    frames_sent: int


Event = SeriesStart | FrameBatch | CompressedFrame | SeriesEnd
