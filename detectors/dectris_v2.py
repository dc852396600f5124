"""DECTRIS SIMPLON stream V2 (CBOR): pure decoder (its byte-faithful encoder for the simulator:
`dectris_v2_encoder`).

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
from tcbf_live.detectors.compression import decompress
from tcbf_live.detectors.dectris_v2_lean import SELF_DESCRIBED as SELF_DESCRIBED  # encoder's
from tcbf_live.detectors.dectris_v2_lean import TYPED, ImageLayout, image_layout
from tcbf_live.detectors.errors import CollectsErrors

TYPED_TAG = {v: k for k, v in TYPED.items()}
DTYPES = {"uint8": "|u1", "uint16": "<u2", "uint32": "<u4"}
MAX_MESSAGE_BYTES = 1 << 30
MAX_PIXELS = 1 << 26  # 8192^2: larger than any DECTRIS detector
MAX_IMAGES = 1 << 31
KNOWN_SERIES = 8  # series whose start is remembered (images of any of them decode)


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

    def __init__(self, channel: str | None = None, defer_bslz4: bool = False, lean: bool = True):
        self._init_errors()
        self.channel = channel  # None: the first announced channel
        # hand bslz4 images on undecoded (CompressedFrame), for in-kernel decompression
        self.defer_bslz4 = defer_bslz4
        self.series: SeriesInfo | None = None  # the latest series started
        self._known: dict[int, _Series] = {}  # oldest first
        # read image messages of a learned layout without cbor2 (False: always the full parse)
        self.lean = lean
        self._lean: tuple[_Series, ImageLayout] | None = None
        self._learned: _Series | None = None  # the series a layout was last learned for

    def reset(self) -> list[Event]:
        """Forget every series (nothing to close: no events)."""
        self.series, self._lean, self._learned = None, None, None
        self._known.clear()
        return []

    def decode(self, parts: list[Any]) -> Event:
        if len(parts) != 1:
            raise DecodeError("bad_framing", f"expected 1 message part, got {len(parts)}")
        buf = memoryview(parts[0])
        if buf.nbytes > MAX_MESSAGE_BYTES:
            raise DecodeError("oversized", f"message of {buf.nbytes} bytes")
        if self._lean is not None and buf.format == "B":
            event = self._lean_image(buf)
            if event is not None:
                return event
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
            event = self._image(m)
            if self.lean and isinstance(_listed(event)[-1], FrameBatch | CompressedFrame):
                self._learn(buf, self._known[m["series_id"]])
            return event
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

    def _learn(self, buf: memoryview, state: _Series) -> None:
        """Learn the layout of this accepted image message (once per series)."""
        if state is not self._learned:
            self._learned = state
            layout = image_layout(buf, state.channel.encode(errors="surrogatepass"))
            self._lean = None if layout is None else (state, layout)

    def _lean_image(self, buf: memoryview) -> FrameBatch | CompressedFrame | None:
        """The frame of an image message of the learned layout, when the full parse gives the
        same event (the series still known as learned, the image id in range, a blob that
        decodes); None, nothing changed, for anything else: the full parse decides."""
        state, layout = self._lean
        read = layout.read(buf)
        info = state.info
        if (read is None or self._known.get(info.series_id) is not state
                or read[0] >= info.frames_expected):  # fmt: skip
            return None
        try:
            frame = _lean_frame(read[0], read[1], layout, info, self.defer_bslz4)
        except (DecodeError, ValueError):
            return None
        state.images += 1
        return frame

    def lane(self) -> tuple[SeriesInfo, tuple] | None:
        """The series, and the template of its image messages, whose bslz4 images a compiled
        ingest loop may read now (`stream.fast_lane`), reporting them with `lane_consumed`;
        None when not."""
        if self._lean is None or not self.defer_bslz4:
            return None
        state, layout = self._lean
        if self._known.get(state.info.series_id) is not state or layout.algorithm != "bslz4":
            return None
        return state.info, (layout.template,)

    def lane_consumed(self, n: int, last_frame: int) -> None:
        """`n` image messages of the lane's series were read elsewhere."""
        self._lean[0].images += n

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


def _lean_frame(image_id: int, blob: memoryview, layout: ImageLayout, info: SeriesInfo,
                defer_bslz4: bool) -> FrameBatch | CompressedFrame:  # fmt: skip
    """`DectrisV2Decoder._frame` of a learned layout's image (its payload checks passed when
    the layout was learned: shape, dtype, element size)."""
    algorithm, size, shape = layout.algorithm, layout.element_size, info.detector_shape
    if defer_bslz4 and algorithm == "bslz4":
        return CompressedFrame(info.series_id, image_id, blob, size, shape, info.dtype)
    nbytes = np.dtype(info.dtype).itemsize * shape[0] * shape[1]
    raw = blob if algorithm is None else decompress(algorithm, size, blob, nbytes)
    if len(raw) != nbytes:
        raise DecodeError("size_mismatch", f"decoded {len(raw)} bytes, frame is {nbytes}")
    return FrameBatch(info.series_id, image_id, np.frombuffer(raw, info.dtype)
                      .reshape(shape)[None])  # fmt: skip


def _listed(event: Event | list) -> list:
    return event if isinstance(event, list) else [event]


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
