"""What every detector codec speaks: series metadata, frame batches, series ends, and the
typed `Decoder` / `Encoder` protocols that `detectors.registry` records for each wire format.

Decoders are pure: wire message parts in, one of these events out, or `DecodeError` with a
reason. Encoders are their mirror for the simulator's sender. Sockets, counting and logging
live in `stream/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple, Protocol

import numpy as np

from tcbf_live.detectors.compression import decompress
from tcbf_live.detectors.errors import DecodeError  # also imported from here by many callers

SCAN_ORDERS = ("raster", "serpentine")


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
    dose_e_per_A2: float | None = None  # per position, when stated (float frames' gain from it)
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
        nbytes = np.dtype(self.dtype).itemsize * self.shape[0] * self.shape[1]
        raw = decompress("bslz4", self.element_size, self.blob, nbytes)
        frames = np.frombuffer(raw, self.dtype).reshape(1, *self.shape)
        return FrameBatch(self.series_id, self.first, frames)


@dataclass(frozen=True)
class SeriesEnd:
    series_id: int
    frames_sent: int


Event = SeriesStart | FrameBatch | CompressedFrame | SeriesEnd


Message = list[Any]
"""One wire message: its parts (bytes-like). Byte-stream protocols send the parts joined."""


class Decoder(Protocol):
    """What the receivers call on a decoder (`stream.receiver`): one decoder per stream."""

    def decode(self, parts: list[Any]) -> Event | list[Event] | None:
        """Events of one message (or, for a byte stream, one received chunk); DecodeError
        when nothing in it can be used."""
        ...

    def drain_errors(self) -> list[DecodeError]:
        """The errors recorded (not raised) since the last call, for the counters."""
        ...

    def reset(self) -> list[Event]:
        """Forget the stream state (a new connection); the events that closes (e.g. the end
        of an acquisition left open)."""
        ...


class Replay(NamedTuple):
    """A recording's own wire data for one protocol, sent unchanged: the start messages, then
    one message per frame."""

    start: list[Message]
    frames: Iterator[Message]


class Encoder(Protocol):
    """What the simulator's sender calls to put a series on the wire (`simulators.sender`)."""

    def start(self, info: SeriesInfo, repeat: bool = False) -> list[Message]:
        """The messages that announce a series (`repeat`: a re-announcement)."""
        ...

    def frames(self, series_id: int, first: int, frames: np.ndarray, seq: int,
               encoding: str) -> list[Message]:  # fmt: skip
        """The messages of frames `first`, `first + 1`, ... (`seq`: the batch's 1-based number)."""
        ...

    def end(self, series_id: int, frames_sent: int) -> list[Message]:
        """The messages that end a series (none where the protocol has no end message)."""
        ...

    def replay(self, source: Any, info: SeriesInfo, encoding: str) -> Replay | None:
        """`source`'s own wire data in this protocol and encoding (a vendor recording), or
        None: then its frames are encoded."""
        ...
