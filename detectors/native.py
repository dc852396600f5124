"""tcbf-live native stream protocol (docs/protocol.md): encoder and pure decoder.

Every message is two ZeroMQ frames: [msgpack header map, payload bytes]. The payload is empty
for `start` and `end`. msgpack only: nothing on the wire is ever unpickled.
"""

from __future__ import annotations

import math
from typing import Any

import lz4.block
import msgpack
import numpy as np

from tcbf_live.detectors.base import (
    SCAN_ORDERS,
    DecodeError,
    Event,
    FrameBatch,
    Message,
    Replay,
    SeriesEnd,
    SeriesInfo,
    SeriesStart,
    describe_change,
    known_series,
)
from tcbf_live.detectors.compression import decompress_lz4_block

PROTOCOL = "tcbf-live"
VERSION = 1
ENCODINGS = ("raw", "lz4")
ALLOWED_DTYPES = {"|u1", "<u2", ">u2", "<u4", ">u4", "<i2", "<i4", "<f2", ">f2", "<f4", ">f4"}
MAX_HEADER_BYTES = 1 << 20  # 1 MiB: ground truth included, a header is a few kB
MAX_FRAMES = 1 << 28  # frames per series / scan positions accepted from a header
MAX_PIXELS = 1 << 26  # detector pixels accepted from a header (8192^2, as for DECTRIS)
KNOWN_SERIES = 8  # series whose start is remembered (frames of any of them decode)
DEFAULT_MAX_BATCH_BYTES = 512 << 20


def _canonical_dtype(dtype: Any) -> str:
    return np.dtype(dtype).str


def encode_start(info: SeriesInfo, repeat: bool = False) -> list[bytes]:
    """Message parts announcing (or re-announcing, `repeat`) a series."""
    header = {
        "proto": PROTOCOL,
        "v": VERSION,
        "kind": "start",
        "series": int(info.series_id),
        "repeat": bool(repeat),
        "scan_shape": list(info.scan_shape) if info.scan_shape is not None else None,
        "scan_order": info.scan_order,
        "detector_shape": list(info.detector_shape),
        "dtype": _canonical_dtype(info.dtype),
        "energy_eV": info.energy_eV,
        "step_A": info.step_A,
        "semiangle_mrad": info.semiangle_mrad,
        "angular_sampling_mrad": info.angular_sampling_mrad,
        "rotation_deg": info.rotation_deg,
        "transpose": info.transpose,
        "counts_per_electron": info.counts_per_electron,
        "mask_value": info.mask_value,
        "frames_expected": info.frames_expected,
        "dwell_s": info.dwell_s,
        "ground_truth": info.ground_truth,
    }
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise ValueError(f"start header of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}")
    return [packed, b""]


def encode_frames(
    series_id: int, first: int, frames: np.ndarray, seq: int = 0, encoding: str = "raw"
) -> list[Any]:
    """Message parts carrying `frames` (count, Qx, Qy) starting at frame index `first`."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}")
    frames = np.ascontiguousarray(frames)
    raw = memoryview(frames).cast("B")
    payload = raw if encoding == "raw" else lz4.block.compress(raw, store_size=False)
    header = {
        "proto": PROTOCOL,
        "v": VERSION,
        "kind": "frames",
        "series": int(series_id),
        "seq": int(seq),
        "first": int(first),
        "count": int(frames.shape[0]),
        "dtype": frames.dtype.str,
        "encoding": encoding,
        "nbytes": int(frames.nbytes),
    }
    return [msgpack.packb(header, use_bin_type=True), payload]


def encode_end(series_id: int, frames_sent: int) -> list[bytes]:
    header = {
        "proto": PROTOCOL,
        "v": VERSION,
        "kind": "end",
        "series": int(series_id),
        "frames_sent": int(frames_sent),
    }
    return [msgpack.packb(header, use_bin_type=True), b""]


class NativeEncoder:
    """The native protocol for the sender: one message per batch, `start` repeated."""

    def start(self, info: SeriesInfo, repeat: bool = False) -> list[Message]:
        return [encode_start(info, repeat)]

    def frames(self, series_id: int, first: int, frames: np.ndarray, seq: int,
               encoding: str) -> list[Message]:  # fmt: skip
        return [encode_frames(series_id, first, frames, seq, encoding)]

    def end(self, series_id: int, frames_sent: int) -> list[Message]:
        return [encode_end(series_id, frames_sent)]

    def replay(self, source: Any, info: SeriesInfo, encoding: str) -> Replay | None:
        return None  # no recording format carries native messages


def _shape2(value: Any, name: str, allow_none: bool = False) -> tuple[int, int] | None:
    if value is None and allow_none:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and 0 < v < 1 << 20 for v in value)
    ):
        raise DecodeError("bad_start", f"{name} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _number(h: dict, key: str, required: bool = False) -> float | None:
    v = h.get(key)
    if v is None:
        if required:
            raise DecodeError("bad_start", f"missing {key}")
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise DecodeError("bad_start", f"{key} must be a finite number, got {v!r}")
    return float(v)


def parse_start(h: dict) -> SeriesInfo:
    """Validate a start header into SeriesInfo (DecodeError 'bad_start' / 'bad_dtype')."""
    dtype = h.get("dtype")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise DecodeError("bad_dtype", f"unsupported dtype {dtype!r}")
    order = h.get("scan_order", "raster")
    if not isinstance(order, str) or order not in SCAN_ORDERS:
        raise DecodeError("bad_start", f"unknown scan order {order!r}")
    frames_expected = h.get("frames_expected")
    if frames_expected is not None and not (
        isinstance(frames_expected, int) and 0 < frames_expected <= MAX_FRAMES
    ):
        raise DecodeError("bad_start", f"bad frames_expected {frames_expected!r}")
    gt = h.get("ground_truth")
    transpose = h.get("transpose")
    mask_value = h.get("mask_value")
    if mask_value is not None and not isinstance(mask_value, int):
        raise DecodeError("bad_start", f"bad mask_value {mask_value!r}")
    detector_shape = _shape2(h.get("detector_shape"), "detector_shape")
    if detector_shape[0] * detector_shape[1] > MAX_PIXELS:
        raise DecodeError("oversized", f"detector of {detector_shape} pixels is implausible")
    scan_shape = _shape2(h.get("scan_shape"), "scan_shape", allow_none=True)
    if scan_shape is not None and scan_shape[0] * scan_shape[1] > MAX_FRAMES:
        raise DecodeError("bad_start", f"scan of {scan_shape} positions is implausible")
    return SeriesInfo(
        series_id=h["series"],
        scan_shape=scan_shape,
        detector_shape=detector_shape,
        dtype=dtype,
        scan_order=order,
        energy_eV=_number(h, "energy_eV"),
        step_A=_number(h, "step_A"),
        semiangle_mrad=_number(h, "semiangle_mrad"),
        angular_sampling_mrad=_number(h, "angular_sampling_mrad"),
        rotation_deg=_number(h, "rotation_deg"),
        transpose=bool(transpose) if transpose is not None else None,
        counts_per_electron=_number(h, "counts_per_electron") or 1.0,
        mask_value=mask_value,
        frames_expected=frames_expected,
        dwell_s=_number(h, "dwell_s"),
        ground_truth=gt if isinstance(gt, dict) else None,
    )


class NativeDecoder:
    """State machine for one native stream: remembers the series it has seen start.

    Frames are only decoded against the `start` of the *same* series id, so a subscriber that
    joined mid-series rejects frames ('no_start') until the sender's periodic repeat of `start`
    arrives, and never misreads them. Several series are remembered, so the start of another
    one (a stray or restarted sender) never costs the open series its frames; a start that
    changes the metadata of a known series is refused ('metadata_changed').
    """

    protocol = "native"

    def __init__(self, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES):
        self.series: SeriesInfo | None = None  # the latest series started
        self._known: dict[int, SeriesInfo] = {}  # started series, oldest first
        self.max_batch_bytes = max_batch_bytes

    def drain_errors(self) -> list[DecodeError]:
        """None recorded: one message is one event, a bad one raises."""
        return []

    def reset(self) -> list[Event]:
        """Forget every series (a native series has no state to close: nothing returned)."""
        self.series = None
        self._known.clear()
        return []

    def decode(self, parts: list[Any]) -> Event:
        """Decode one multipart message (list of bytes-like). Raises DecodeError."""
        if len(parts) != 2:
            raise DecodeError("bad_framing", f"expected 2 message parts, got {len(parts)}")
        head = memoryview(parts[0])
        if head.nbytes > MAX_HEADER_BYTES:
            raise DecodeError("oversized", f"header of {head.nbytes} bytes")
        try:
            h = msgpack.unpackb(head, raw=False, strict_map_key=True, max_bin_len=0)
        except Exception as exc:  # msgpack raises several exception types for garbage
            raise DecodeError("bad_header", f"not msgpack ({type(exc).__name__})") from None
        if not isinstance(h, dict) or h.get("proto") != PROTOCOL:
            raise DecodeError("bad_header", "not a tcbf-live header")
        if h.get("v") != VERSION:
            raise DecodeError("bad_version", f"protocol version {h.get('v')!r}")
        series = h.get("series")
        if not isinstance(series, int) or isinstance(series, bool):
            raise DecodeError("bad_header", "missing series id")
        kind = h.get("kind")
        if kind == "start":
            return self._start(h, series)
        if kind == "frames":
            return self._frames(h, series, parts[1])
        if kind == "end":
            sent = h.get("frames_sent")
            if not isinstance(sent, int) or sent < 0:
                raise DecodeError("bad_header", "end without frames_sent")
            if series not in self._known:
                raise DecodeError("wrong_series", f"end of series {series} never started here")
            return SeriesEnd(series, sent)
        raise DecodeError("bad_header", f"unknown kind {kind!r}")

    def _start(self, h: dict, series: int) -> SeriesStart:
        """A new series is remembered beside the others (the oldest forgotten beyond
        KNOWN_SERIES); a start under a known id must repeat its metadata exactly."""
        info = parse_start(h)
        known = self._known.get(series)
        if known is not None and known != info:
            raise DecodeError("metadata_changed", f"start of series {series} announces "
                              f"{describe_change(known, info)}: the first start holds")  # fmt: skip
        self._known.pop(series, None)
        self._known[series] = info
        while len(self._known) > KNOWN_SERIES:
            self._known.pop(next(iter(self._known)))
        self.series = info
        return SeriesStart(info, repeat=bool(h.get("repeat", False)))

    def _frames(self, h: dict, series: int, payload: Any) -> FrameBatch:
        info = known_series(self._known, series, "frames")
        first, count, nbytes = h.get("first"), h.get("count"), h.get("nbytes")
        if type(first) is not int or type(count) is not int or type(nbytes) is not int:
            raise DecodeError("bad_header", "first/count/nbytes must be integers")
        if h.get("dtype", info.dtype) != info.dtype:
            raise DecodeError("bad_dtype", f"frames dtype {h.get('dtype')!r} != {info.dtype!r}")
        limit = info.frames_expected if info.frames_expected is not None else MAX_FRAMES
        if count < 1 or first < 0 or first + count > limit:
            raise DecodeError("index_out_of_range", f"frames {first}+{count} outside 0..{limit}")
        if nbytes != count * info.frame_nbytes:
            raise DecodeError("size_mismatch", f"nbytes {nbytes} != {count} frames")
        if nbytes > self.max_batch_bytes:
            raise DecodeError("oversized", f"batch of {nbytes} bytes")
        encoding = h.get("encoding", "raw")
        buf = memoryview(payload)
        if encoding == "raw":
            data = buf
        elif encoding == "lz4":
            data = decompress_lz4_block(buf, nbytes)
        else:
            raise DecodeError("bad_encoding", f"unknown encoding {encoding!r}")
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size != nbytes:
            raise DecodeError("size_mismatch", f"payload is not {nbytes} bytes")
        frames = np.frombuffer(data, dtype=info.dtype).reshape(count, *info.detector_shape)
        seq = h.get("seq")
        return FrameBatch(series, first, frames, seq if isinstance(seq, int) else None)
