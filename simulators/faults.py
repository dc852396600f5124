"""Fault injectors: what a live session's detector, beam and network do to a clean series.

Pure and seeded, so tests and `benchmarks/fault_injection.py` share one implementation:
- frame faults take frames (count, Qx, Qy) in acquisition order and return a new array (the
  input is never modified): anomalous frames, zingers, persistent hot/dead pixels, overload
  values, beam-current drift, blanked or dimmed line starts, a missed trigger;
- stream faults take and return lists of events (detectors.base `SeriesStart`, `FrameBatch`,
  `SeriesEnd`, plus `ForeignMessage` for bytes from another producer): a sender restart, a stray
  series start, a repeat start with another geometry, a foreign or malformed header.
  `encode_events` turns them into wire messages (native, DECTRIS stream V1 or V2).

Integer counts are scaled by binomial thinning (each count kept with probability p), so a
thinned frame is still a Poisson frame of lower dose; float intensities are multiplied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import cbor2
import msgpack
import numpy as np

from tcbf_live.detectors import native, registry
from tcbf_live.detectors.base import FrameBatch, SeriesEnd, SeriesInfo, SeriesStart

HOT_PIXEL_COUNTS = 60_000  # a cosmic-ray zinger or hot pixel (fits uint16)
BF_PLATEAU_FRACTION = 0.5  # BF disk: mean pattern >= this fraction of its plateau


@dataclass(frozen=True)
class ForeignMessage:
    """Message parts from another producer (or malformed), put on the wire as they are."""

    parts: tuple[bytes, ...]


StreamEvent = SeriesStart | FrameBatch | SeriesEnd | ForeignMessage


# ---------------------------------------------------------------------------- frame faults
def overload_value(dtype: np.dtype | str) -> int:
    """DECTRIS overload / count-rate cut-off value of an integer detector: 2^bits - 1."""
    dtype = np.dtype(dtype)
    if dtype.kind != "u":
        raise ValueError(f"overload values need an unsigned integer dtype, got {dtype}")
    return int(np.iinfo(dtype).max)


def bf_disk_pixels(frames: np.ndarray, fraction: float = 0.9) -> np.ndarray:
    """Detector pixels (N, 2) well inside the BF disk: mean pattern >= `fraction` x plateau
    (the plateau is the 99th percentile of the mean pattern, robust to a few hot pixels)."""
    mean = frames.mean(axis=0, dtype=np.float64)
    plateau = np.percentile(mean, 99)
    return np.argwhere(mean >= fraction * plateau)


def pick_bf_pixels(frames: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct pixels (n, 2) drawn from inside the BF disk of `frames`."""
    disk = bf_disk_pixels(frames)
    if len(disk) < n:
        raise ValueError(f"only {len(disk)} BF-disk pixels, {n} requested")
    return disk[rng.choice(len(disk), n, replace=False)]


def _clip(value: float, dtype: np.dtype) -> float | int:
    """`value` in `dtype`: rounded and clipped for integers."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return int(np.clip(round(value), info.min, info.max))
    return float(value)


def set_frame(frames: np.ndarray, index: int, value: float) -> np.ndarray:
    """Copy of `frames` with every pixel of frame `index` equal to `value`."""
    out = frames.copy()
    out[index] = _clip(value, frames.dtype)
    return out


def zero_frame(frames: np.ndarray, index: int) -> np.ndarray:
    """One all-zero frame (beam-blank glitch, a trigger without exposure)."""
    return set_frame(frames, index, 0)


def flat_frame(frames: np.ndarray, index: int, value: float | None = None) -> np.ndarray:
    """One flat frame: every pixel `value` (default: that frame's mean, so its total dose is
    right but the BF disk is gone)."""
    if value is None:
        value = float(frames[index].mean(dtype=np.float64))
    return set_frame(frames, index, value)


def set_pixels(frames: np.ndarray, indices: Sequence[int] | np.ndarray | slice,
               pixels: np.ndarray, value: float) -> np.ndarray:  # fmt: skip
    """Copy of `frames` with `pixels` (N, 2) set to `value` in the frames `indices`
    (one index per pixel for single-frame events, or a slice for every frame)."""
    out = frames.copy()
    pixels = np.asarray(pixels, np.int64).reshape(-1, 2)
    v = _clip(value, frames.dtype)
    if isinstance(indices, slice):
        out[indices, pixels[:, 0], pixels[:, 1]] = v
    else:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if len(idx) != len(pixels):
            raise ValueError(f"{len(idx)} frame indices for {len(pixels)} pixels")
        out[idx, pixels[:, 0], pixels[:, 1]] = v
    return out


def hot_pixel(frames: np.ndarray, index: int, pixel: tuple[int, int],
              counts: float = HOT_PIXEL_COUNTS) -> np.ndarray:  # fmt: skip
    """A single-frame zinger: one pixel of frame `index` at `counts` (cosmic ray)."""
    return set_pixels(frames, [index], np.asarray([pixel]), counts)


def persistent_pixel(frames: np.ndarray, pixel: tuple[int, int], counts: float) -> np.ndarray:
    """A pixel stuck at `counts` in every frame: hot (large) or dead (0)."""
    return set_pixels(frames, slice(None), np.asarray([pixel]), counts)


def overload_pixels(frames: np.ndarray, indices: Sequence[int],
                    pixels: np.ndarray) -> np.ndarray:  # fmt: skip
    """Pixels at the detector's overload value 2^bits - 1 (count-rate cut-off), one pixel in
    each of the frames `indices`."""
    return set_pixels(frames, indices, pixels, overload_value(frames.dtype))


def scale_frames(frames: np.ndarray, factors: np.ndarray, rng: np.random.Generator,
                 keep_value: int | None = None) -> np.ndarray:  # fmt: skip
    """Frames scaled by per-frame `factors` (count,): integer counts by binomial thinning
    (factors must lie in [0, 1]), floats multiplied. Pixels equal to `keep_value` (the
    detector's flag for dead/hot pixels) keep it."""
    factors = np.asarray(factors, np.float64)
    if factors.shape != (len(frames),):
        raise ValueError(f"{factors.shape} factors for {len(frames)} frames")
    if frames.dtype.kind == "f":
        out = (frames * factors[:, None, None]).astype(frames.dtype)
    else:
        if not np.all((factors >= 0) & (factors <= 1)):
            raise ValueError("integer counts can only be thinned: factors must be in [0, 1]")
        out = np.empty_like(frames)
        for k in range(len(frames)):  # one frame at a time: no int64 copy of the whole series
            out[k] = rng.binomial(frames[k], factors[k]).astype(frames.dtype)
    if keep_value is not None:
        flagged = frames == keep_value
        out[flagged] = frames[flagged]
    return out


def drift_profile(n_frames: int, amplitude: float = 0.10, profile: str = "ramp",
                  period_frames: int | None = None) -> np.ndarray:  # fmt: skip
    """Relative beam current per frame, mean 1: "ramp" runs linearly from 1 - amplitude to
    1 + amplitude across the scan; "sine" is 1 + amplitude sin(2 pi i / period_frames)."""
    if not 0 <= amplitude < 1:
        raise ValueError("amplitude must be in [0, 1)")
    i = np.arange(n_frames, dtype=np.float64)
    if profile == "ramp":
        return 1.0 + amplitude * (2.0 * i / max(n_frames - 1, 1) - 1.0)
    if profile == "sine":
        if not period_frames or period_frames < 2:
            raise ValueError("a sine profile needs period_frames >= 2")
        return 1.0 + amplitude * np.sin(2.0 * np.pi * i / period_frames)
    raise ValueError(f"unknown profile {profile!r}")


def beam_current_drift(frames: np.ndarray, rng: np.random.Generator, amplitude: float = 0.10,
                       profile: str = "ramp", period_frames: int | None = None,
                       keep_value: int | None = None) -> np.ndarray:  # fmt: skip
    """Beam current varying by +-`amplitude` across the scan (`drift_profile`). Integer
    counts are thinned by current / max(current) (the mean dose drops by 1 / (1 + amplitude),
    the variation is the same), floats multiplied by the current."""
    current = drift_profile(len(frames), amplitude, profile, period_frames)
    factors = current if frames.dtype.kind == "f" else current / current.max()
    return scale_frames(frames, factors, rng, keep_value)


def line_starts(frames: np.ndarray, scan_cols: int, columns: int, factor: float,
                rng: np.random.Generator, keep_value: int | None = None) -> np.ndarray:  # fmt: skip
    """The first `columns` frames acquired on every scan row (right after the flyback)
    scaled by `factor`: 0 blanks them, 0.5 dims them (a column-wise common-mode feature)."""
    if not 0 < columns <= scan_cols or len(frames) % scan_cols:
        raise ValueError(f"{columns} line-start columns of {scan_cols} for {len(frames)} frames")
    factors = np.where(np.arange(len(frames)) % scan_cols < columns, factor, 1.0)
    return scale_frames(frames, factors, rng, keep_value)


def missed_trigger(frames: np.ndarray, index: int) -> np.ndarray:
    """The detector misses the trigger of frame `index`: that frame is never recorded, every
    later frame is one index earlier, and the series is one frame short."""
    if not 0 <= index < len(frames):
        raise IndexError(f"frame {index} outside 0..{len(frames) - 1}")
    return np.delete(frames, index, axis=0)


# --------------------------------------------------------------------------- stream faults
def series_events(info: SeriesInfo, frames: np.ndarray, batch: int = 16,
                  repeat_start_every: int = 0) -> list[StreamEvent]:  # fmt: skip
    """A series as a sender puts it out: start, frame batches (numbered 0..len(frames)-1,
    whatever `info` claims), an optional repeat start every `repeat_start_every` batches,
    and an end carrying the number of frames sent."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    events: list[StreamEvent] = [SeriesStart(info, repeat=False)]
    for k, first in enumerate(range(0, len(frames), batch)):
        if repeat_start_every and k and k % repeat_start_every == 0:
            events.append(SeriesStart(info, repeat=True))
        events.append(FrameBatch(info.series_id, first, frames[first : first + batch], seq=k))
    events.append(SeriesEnd(info.series_id, len(frames)))
    return events


def split_at_frame(events: Sequence[StreamEvent],
                   frame: int) -> tuple[list[StreamEvent], list[StreamEvent]]:  # fmt: skip
    """Events before and from the first frame index >= `frame` of the first series (a batch
    straddling `frame` is split in two)."""
    series = next(e.info.series_id for e in events if isinstance(e, SeriesStart))
    for k, e in enumerate(events):
        if not isinstance(e, FrameBatch) or e.series_id != series:
            continue
        if e.first >= frame:
            return list(events[:k]), list(events[k:])
        if e.first + len(e.frames) > frame:
            cut = frame - e.first
            head = FrameBatch(e.series_id, e.first, e.frames[:cut], e.seq)
            tail = FrameBatch(e.series_id, frame, e.frames[cut:], e.seq)
            return [*events[:k], head], [tail, *events[k + 1 :]]
    end = next((k for k, e in enumerate(events) if isinstance(e, SeriesEnd)), len(events))
    return list(events[:end]), list(events[end:])


def insert_at_frame(events: Sequence[StreamEvent], frame: int,
                    new: Sequence[StreamEvent]) -> list[StreamEvent]:  # fmt: skip
    """`new` events put on the wire just before frame `frame` of the series."""
    head, tail = split_at_frame(events, frame)
    return [*head, *new, *tail]


def first_info(events: Sequence[StreamEvent]) -> SeriesInfo:
    return next(e.info for e in events if isinstance(e, SeriesStart))


def sender_restart(events: Sequence[StreamEvent], frame: int,
                   new_series_id: int) -> list[StreamEvent]:  # fmt: skip
    """The sender is restarted before frame `frame`: the first series never ends, and the
    whole series is sent again, from its start, under `new_series_id`."""
    head, _ = split_at_frame(events, frame)
    old = first_info(events).series_id
    again = []
    for e in events:
        if isinstance(e, SeriesStart):
            again.append(SeriesStart(replace(e.info, series_id=new_series_id), e.repeat))
        elif isinstance(e, FrameBatch) and e.series_id == old:
            again.append(FrameBatch(new_series_id, e.first, e.frames, e.seq))
        elif isinstance(e, SeriesEnd) and e.series_id == old:
            again.append(SeriesEnd(new_series_id, e.frames_sent))
    return [*head, *again]


def stray_start(events: Sequence[StreamEvent], frame: int,
                stray_series_id: int) -> list[StreamEvent]:  # fmt: skip
    """A stray sender announces another series (same geometry) before frame `frame`, sends
    nothing else; the good series goes on."""
    info = replace(first_info(events), series_id=stray_series_id)
    return insert_at_frame(events, frame, [SeriesStart(info, repeat=False)])


def reshaped_repeat_start(events: Sequence[StreamEvent], frame: int,
                          detector_shape: tuple[int, int] | None = None,
                          dtype: str | None = None) -> list[StreamEvent]:  # fmt: skip
    """A repeat `start` under the same series id claiming another detector shape and/or
    dtype, before frame `frame`; the series' own frames go on unchanged."""
    info = first_info(events).with_overrides(detector_shape=detector_shape, dtype=dtype)
    return insert_at_frame(events, frame, [SeriesStart(info, repeat=True)])


def foreign_header_messages(series_id: int, protocol: str = "native") -> list[tuple[bytes, ...]]:
    """A header from another producer in the receiver's encoding (msgpack, JSON or CBOR) but
    not of its protocol (another name, version and field layout): counted and skipped."""
    if protocol == "native":
        header = {"proto": "acme-daq", "v": 3, "kind": "start", "series": int(series_id),
                  "shape": [64, 64], "dtype": "<f8", "frames": 10}  # fmt: skip
        return [(msgpack.packb(header, use_bin_type=True), b"")]
    if protocol == "dectris-v1":
        return [(json.dumps({"htype": "acme-header-2.0", "series": int(series_id)}).encode(),)]
    if protocol == "dectris-v2":
        return [(cbor2.dumps({"type": "acme-start", "series_id": int(series_id)}),)]
    raise ValueError(f"unknown protocol {protocol!r}")


def bad_start_messages(series_id: int, protocol: str = "native") -> list[tuple[bytes, ...]]:
    """A start (header) of series `series_id` in the receiver's own protocol with impossible
    fields: malformed, never to be folded into the series under way."""
    if protocol == "native":
        header = {"proto": native.PROTOCOL, "v": native.VERSION, "kind": "start",
                  "series": int(series_id), "repeat": True, "scan_shape": [-1, 0],
                  "detector_shape": [128, 128], "dtype": "<c16"}  # fmt: skip
        return [(msgpack.packb(header, use_bin_type=True), b"")]
    if protocol == "dectris-v1":  # a dheader, then a config without the detector geometry
        head = {"htype": "dheader-1.0", "series": int(series_id), "header_detail": "basic"}
        return [(json.dumps(head).encode(),), (json.dumps({"bit_depth_image": 12}).encode(),)]
    if protocol == "dectris-v2":
        start = {"type": "start", "series_id": int(series_id), "image_size_x": -1,
                 "image_size_y": 0, "image_dtype": "complex128"}  # fmt: skip
        return [(cbor2.dumps(start),)]
    raise ValueError(f"unknown protocol {protocol!r}")


def foreign_messages(events: Sequence[StreamEvent], frame: int,
                     messages: Sequence[Sequence[bytes]]) -> list[StreamEvent]:  # fmt: skip
    """`messages` (each a sequence of parts) put on the wire as they are before frame `frame`."""
    return insert_at_frame(events, frame, [ForeignMessage(tuple(m)) for m in messages])


# -------------------------------------------------------------------------------- encoding
def encode_events(events: Sequence[StreamEvent], protocol: str = "native",
                  encoding: str | None = None) -> Iterator[list]:  # fmt: skip
    """Wire messages (lists of parts) for `events` in any registered protocol, by its encoder
    (native: one message per batch, raw | lz4; DECTRIS stream V1 or V2: one message per frame,
    bslz4 by default). A `ForeignMessage` goes out as it is, in any protocol."""
    proto = registry.protocol(protocol)
    encoder = proto.encoder
    if encoding is None:
        encoding = proto.encodings[0]
    for e in events:
        if isinstance(e, ForeignMessage):
            yield list(e.parts)
        elif isinstance(e, SeriesStart):
            yield from encoder.start(e.info, repeat=e.repeat)
        elif isinstance(e, FrameBatch):
            yield from encoder.frames(e.series_id, e.first, e.frames, e.seq or 0, encoding)
        elif isinstance(e, SeriesEnd):
            yield from encoder.end(e.series_id, e.frames_sent)
        else:
            raise TypeError(f"not a stream event: {type(e).__name__}")
