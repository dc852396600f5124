"""DECTRIS SIMPLON stream V2 (CBOR): pure decoder and a byte-faithful encoder for the simulator.

Wire format (detector-protocols.md sect. 3): one ZeroMQ frame per message, one CBOR map whose
`type` is `start`, `image` or `end` (with or without the self-described prefix d9d9f7). Frames
are `tag 40 [[height, width], typed array]`, the typed array (tag 64 uint8, 69 uint16 LE,
70 uint32 LE) wrapping either the raw bytes or `tag 56500 [algorithm, element size, blob]`
(DECTRIS compression: "bslz4" or HDF5-framed "lz4").

DECTRIS does not send the scan shape: it comes from `user_data.scan_shape` ([rows, cols], as our
simulator and a SIMPLON `header_appendix` can set it) or from `--scan`; a series without one is
refused by the engine with a clear error. Masked pixels carry 2^bits - 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import cbor2
import numpy as np

from tcbf_live.detectors.base import (
    CollectsErrors,
    CompressedFrame,
    DecodeError,
    Event,
    FrameBatch,
    SeriesEnd,
    SeriesInfo,
    SeriesStart,
    defect_mask,
    describe_change,
    known_series,
)
from tcbf_live.detectors.base import (
    header_int as _int,
)
from tcbf_live.detectors.compression import compress_bslz4, decompress

TYPED = {64: "|u1", 69: "<u2", 70: "<u4"}
TYPED_TAG = {v: k for k, v in TYPED.items()}
DTYPES = {"uint8": "|u1", "uint16": "<u2", "uint32": "<u4"}
MAX_MESSAGE_BYTES = 1 << 30
MAX_PIXELS = 1 << 26  # 8192^2: larger than any DECTRIS detector
MAX_IMAGES = 1 << 31
KNOWN_SERIES = 8  # series whose start is remembered (images of any of them decode)
SELF_DESCRIBED = b"\xd9\xd9\xf7"


class _Compressed:  # tag 56500 (plain slotted classes: built three times per image)
    __slots__ = ("algorithm", "element_size", "data")

    def __init__(self, algorithm: str, element_size: int, data: Any):
        self.algorithm, self.element_size, self.data = algorithm, element_size, data


class _Typed:  # typed-array tags 64/69/70
    __slots__ = ("dtype", "payload")

    def __init__(self, dtype: str, payload: Any):  # payload: bytes or _Compressed
        self.dtype, self.payload = dtype, payload


class _MultiDim:  # tag 40
    __slots__ = ("dims", "array")

    def __init__(self, dims: tuple, array: Any):  # array: _Typed
        self.dims, self.array = dims, array


def _tag_hook(*args):
    """cbor2 >= 6 calls hook(tag, immutable), older versions hook(decoder, tag)."""
    tag = args[0] if isinstance(args[0], cbor2.CBORTag) else args[1]
    value = tag.value
    if tag.tag == 56500:
        if not (isinstance(value, list | tuple) and len(value) == 3):
            raise DecodeError("bad_payload", "tag 56500 is not [algorithm, size, data]")
        return _Compressed(str(value[0]), int(value[1]), value[2])
    if tag.tag in TYPED:
        return _Typed(TYPED[tag.tag], value)
    if tag.tag == 40:
        if not (isinstance(value, list | tuple) and len(value) == 2):
            raise DecodeError("bad_payload", "tag 40 is not [dims, array]")
        return _MultiDim(tuple(value[0]), value[1])
    if tag.tag == 55799:  # self-described CBOR
        return value
    return tag  # dates (0), others: left as they are


def _scan_shape(user: Any) -> tuple[int, int] | None:
    if isinstance(user, Mapping):
        s = user.get("scan_shape")
        if (
            isinstance(s, list | tuple)
            and len(s) == 2
            and all(type(n) is int and 0 < n <= 1 << 16 for n in s)
        ):
            return int(s[0]), int(s[1])
    return None


def _user_float(user: Any, key: str) -> float | None:
    v = user.get(key) if isinstance(user, Mapping) else None
    return float(v) if isinstance(v, int | float) and math.isfinite(v) and v > 0 else None


class _Series:
    """Decode state of one started series."""

    __slots__ = ("info", "channel", "announced", "images")

    def __init__(self, info: SeriesInfo, channel: str, announced: bool):
        self.info, self.channel, self.announced, self.images = info, channel, announced, 0


class DectrisV2Decoder(CollectsErrors):
    """State machine for one stream: series from `start`, frames checked against it.

    Several series are remembered (KNOWN_SERIES), each image decoded against the start of its
    own series id: a foreign or repeated `start` never costs the open series its images, and a
    `start` that changes the metadata of a known series is refused ('metadata_changed')."""

    protocol = "dectris-v2"

    def __init__(self, channel: str | None = None):
        self._init_errors()
        self.channel = channel  # None: the first announced channel
        # hand bslz4 images on undecoded (CompressedFrame), for in-kernel decompression
        self.defer_bslz4 = False
        self.series: SeriesInfo | None = None  # the latest series started
        self._known: dict[int, _Series] = {}  # oldest first

    def decode(self, parts: list[Any]) -> Event:
        if len(parts) != 1:
            raise DecodeError("bad_framing", f"expected 1 message part, got {len(parts)}")
        buf = memoryview(parts[0])
        if buf.nbytes > MAX_MESSAGE_BYTES:
            raise DecodeError("oversized", f"message of {buf.nbytes} bytes")
        try:
            m = cbor2.loads(buf, tag_hook=_tag_hook)
        except DecodeError:
            raise
        except Exception as exc:  # cbor2 raises several types for garbage, RecursionError too
            raise DecodeError("bad_header", f"not CBOR ({type(exc).__name__})") from None
        if not isinstance(m, Mapping):
            raise DecodeError("bad_header", "message is not a CBOR map")
        kind = m.get("type")
        if kind == "start":
            return self._start(m)
        if kind == "image":
            return self._image(m)
        if kind == "end":
            series = _int(m, "series_id", 0, 1 << 62)
            state = self._known.get(series)
            if state is None:
                raise DecodeError("wrong_series", f"end of series {series} never started here")
            return SeriesEnd(series, state.images)
        raise DecodeError("bad_header", f"unknown message type {kind!r}")

    def _start(self, m: dict) -> SeriesStart | list:
        width = _int(m, "image_size_x", 1, 1 << 16)
        height = _int(m, "image_size_y", 1, 1 << 16)
        if width * height > MAX_PIXELS:
            raise DecodeError("oversized", f"{height}x{width} detector")
        channels = m.get("channels") or ["threshold_1"]
        if not isinstance(channels, list | tuple) or not all(isinstance(c, str) for c in channels):
            raise DecodeError("bad_header", "channels must be a list of names")
        channel = self.channel or channels[0]
        if channel not in channels:
            raise DecodeError("bad_header", f"channel {channel!r} not in {list(channels)}")
        announced = m.get("image_dtype")
        if announced is not None and announced not in DTYPES:
            raise DecodeError("bad_dtype", f"image_dtype {announced!r}")
        # absent before firmware 2024.2: then the first image's typed array says it
        dtype = DTYPES.get(announced, "<u2")
        bits = np.dtype(dtype).itemsize * 8
        user = m.get("user_data")
        series_id = _int(m, "series_id", 0, 1 << 62)
        info = SeriesInfo(
            series_id=series_id,
            scan_shape=_scan_shape(user),
            detector_shape=(height, width),
            dtype=dtype,
            energy_eV=_user_float(user, "energy_eV"),
            step_A=_user_float(user, "step_A"),
            semiangle_mrad=_user_float(user, "semiangle_mrad"),
            angular_sampling_mrad=_user_float(user, "angular_sampling_mrad"),
            counts_per_electron=1.0,  # counting detector
            mask_value=(1 << bits) - 1,
            frames_expected=_int(m, "number_of_images", 1, MAX_IMAGES),
            dwell_s=m.get("frame_time") if isinstance(m.get("frame_time"), float) else None,
            ground_truth=dict(user["ground_truth"])
            if isinstance(user, Mapping) and isinstance(user.get("ground_truth"), Mapping)
            else None,
            pixel_mask=self._mask(m.get("pixel_mask"), channel, (height, width)),
        )
        known = self._known.get(series_id)
        if known is not None:  # the same start again: a repeat, or refused if it differs
            if announced is None:  # the pixel type came with the first image
                info = replace(info, dtype=known.info.dtype, mask_value=known.info.mask_value)
            if info != known.info or channel != known.channel:
                raise DecodeError("metadata_changed", f"start of series {series_id} "
                                  f"announces {describe_change(known.info, info)}: the first "
                                  "start holds")  # fmt: skip
            return SeriesStart(known.info, repeat=True) if known.announced else []
        self._known[series_id] = _Series(info, channel, announced is not None)
        while len(self._known) > KNOWN_SERIES:
            self._known.pop(next(iter(self._known)))
        self.series = info
        if announced is None:  # wait for the first image to know the pixel type
            return []
        return SeriesStart(info, repeat=False)

    def _mask(self, masks: Any, channel: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The channel's pixel mask (header_detail "all"). Anything but a tagged array, e.g.
        the 4-byte placeholders of an edited start, counts as absent; a malformed array is
        recorded and the series goes on with the masked-value rule only."""
        arr = masks.get(channel) if isinstance(masks, Mapping) else None
        if not isinstance(arr, _MultiDim):
            return None
        try:
            return defect_mask(_array(arr, shape, "<u4"), shape)
        except DecodeError as err:
            self._errors.append(err)
            return None

    def _image(self, m: dict) -> FrameBatch:
        series = _int(m, "series_id", 0, 1 << 62)
        state = known_series(self._known, series, "image")
        info = state.info
        image_id = _int(m, "image_id", 0, MAX_IMAGES)
        if image_id >= info.frames_expected:
            raise DecodeError("index_out_of_range", f"image {image_id} of {info.frames_expected}")
        data = m.get("data")
        if not isinstance(data, Mapping) or state.channel not in data:
            raise DecodeError("bad_payload", f"no {state.channel!r} data in the image")
        events: list[Event] = []
        if not state.announced:  # dtype from this image's typed array, then start the series
            arr = data[state.channel]
            if isinstance(arr, _MultiDim) and isinstance(arr.array, _Typed):
                bits = np.dtype(arr.array.dtype).itemsize * 8
                info = state.info = replace(info, dtype=arr.array.dtype,
                                            mask_value=(1 << bits) - 1)  # fmt: skip
                if self.series is not None and self.series.series_id == series:
                    self.series = info
            state.announced = True
            events.append(SeriesStart(info, repeat=False))
        try:
            events.append(self._frame(data[state.channel], info, image_id))
        except DecodeError:
            if not events:
                raise
            self._errors.append(DecodeError("bad_payload", "first image unusable"))
            return events  # the series start is not lost
        state.images += 1
        return events if len(events) > 1 else events[0]

    def _frame(self, arr: Any, info: SeriesInfo, image_id: int) -> FrameBatch | CompressedFrame:
        """The image, decoded, or (`defer_bslz4`) its bslz4 blob left for the kernel."""
        if self.defer_bslz4:
            payload = _payload(arr, info.detector_shape, info.dtype)
            if isinstance(payload, _Compressed) and payload.algorithm == "bslz4":
                size, shape = payload.element_size, info.detector_shape
                return CompressedFrame(info.series_id, image_id, payload.data, size, shape,
                                       info.dtype)  # fmt: skip

        frame = _array(arr, info.detector_shape, info.dtype)
        return FrameBatch(info.series_id, image_id, frame[None])


def _array(arr: Any, shape: tuple[int, int], dtype: str) -> np.ndarray:
    """A tagged multi-dimensional array (an image, a pixel mask) of this shape and dtype,
    decompressed if it is; DecodeError for anything else."""
    payload = _payload(arr, shape, dtype)
    nbytes = np.dtype(dtype).itemsize * shape[0] * shape[1]
    if isinstance(payload, _Compressed):
        raw = decompress(payload.algorithm, payload.element_size, payload.data, nbytes)
    else:
        raw = payload
    if len(raw) != nbytes:
        raise DecodeError("size_mismatch", f"decoded {len(raw)} bytes, frame is {nbytes}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _payload(arr: Any, shape: tuple[int, int], dtype: str) -> _Compressed | bytes:
    """The checked payload of a tagged array: compressed (with a byte string and the element
    size of `dtype` for bslz4) or raw bytes."""
    if not isinstance(arr, _MultiDim) or not isinstance(arr.array, _Typed):
        raise DecodeError("bad_payload", "frame is not a tagged multi-dimensional array")
    if tuple(arr.dims) != tuple(shape):
        raise DecodeError("size_mismatch", f"array {arr.dims} != {shape}")
    if arr.array.dtype != dtype:
        raise DecodeError("bad_dtype", f"array dtype {arr.array.dtype} != {dtype}")
    payload = arr.array.payload
    if isinstance(payload, _Compressed):
        size = np.dtype(dtype).itemsize
        if payload.algorithm == "bslz4" and payload.element_size != size:
            raise DecodeError("bad_payload", f"bslz4 element size {payload.element_size} "
                              f"for {size}-byte pixels")  # fmt: skip
        if not isinstance(payload.data, bytes | bytearray | memoryview):
            raise DecodeError("bad_payload", "compressed data is not a byte string")
        return payload
    if isinstance(payload, bytes | bytearray | memoryview):
        return payload
    raise DecodeError("bad_payload", "typed array holds no byte string")


# ------------------------------------------------------------------------------- encoder
def _dumps(obj: Any, prefix: bool = True) -> bytes:
    return (SELF_DESCRIBED if prefix else b"") + cbor2.dumps(obj)


def encode_start(info: SeriesInfo, unique_id: str = "", channels=("threshold_1",)) -> list[bytes]:
    """A V2 `start` (header_detail basic). Scan shape and optics go in user_data, as a
    SIMPLON header_appendix would carry them."""
    height, width = info.detector_shape
    user = {
        "scan_shape": list(info.scan_shape) if info.scan_shape else None,
        "energy_eV": info.energy_eV,
        "step_A": info.step_A,
        "semiangle_mrad": info.semiangle_mrad,
        "angular_sampling_mrad": info.angular_sampling_mrad,
        "ground_truth": info.ground_truth,
    }
    msg = {
        "type": "start",
        "series_id": int(info.series_id),
        "series_unique_id": unique_id or f"tcbf-{info.series_id}",
        "channels": list(channels),
        "image_size_x": int(width),
        "image_size_y": int(height),
        "image_dtype": {v: k for k, v in DTYPES.items()}[np.dtype(info.dtype).str],
        "number_of_images": int(info.frames_expected or 0),
        "frame_time": float(info.dwell_s or 0.0),
        "count_time": float(info.dwell_s or 0.0),
        "saturation_value": int((1 << (np.dtype(info.dtype).itemsize * 8)) - 2),
        "detector_description": "tcbf-live simulator (DECTRIS stream V2 format)",
        "user_data": {k: v for k, v in user.items() if v is not None},
    }
    if info.pixel_mask is not None:  # header_detail all; the frames keep raw values there
        flags = np.ascontiguousarray(info.pixel_mask, "<u4")
        array = cbor2.CBORTag(40, [[height, width], cbor2.CBORTag(TYPED_TAG["<u4"],
                                                                 flags.tobytes())])  # fmt: skip
        msg.update(pixel_mask={c: array for c in channels}, pixel_mask_enabled=False)
    return [_dumps(msg, prefix=False)]  # like the real capture: start without the prefix


def encode_image(
    series_id: int,
    image_id: int,
    frame: np.ndarray,
    compression: str = "bslz4",
    channel: str = "threshold_1",
    blob: bytes | None = None,
) -> list[bytes]:
    """One `image` message; compression "bslz4" (DECTRIS default) or "none". `blob`: an
    already bslz4-compressed frame (a stored file chunk), sent as it is; `frame` then only gives
    the shape and dtype."""
    frame = np.asarray(frame) if blob is not None else np.ascontiguousarray(frame)
    tag = TYPED_TAG[frame.dtype.str]
    if blob is not None:
        inner = cbor2.CBORTag(56500, ["bslz4", frame.itemsize, blob])
    elif compression == "bslz4":
        inner = cbor2.CBORTag(56500, ["bslz4", frame.itemsize, compress_bslz4(frame)])

    elif compression == "none":
        inner = frame.tobytes()
    else:
        raise ValueError(f"unsupported compression {compression!r}")
    array = cbor2.CBORTag(40, [list(frame.shape), cbor2.CBORTag(tag, inner)])
    msg = {"type": "image", "series_id": int(series_id), "series_unique_id": f"tcbf-{series_id}",
           "image_id": int(image_id), "data": {channel: array}}  # fmt: skip
    return [_dumps(msg)]


def encode_end(series_id: int) -> list[bytes]:
    return [_dumps({"type": "end", "series_id": int(series_id),
                    "series_unique_id": f"tcbf-{series_id}"})]  # fmt: skip
