"""DECTRIS SIMPLON stream V1 ("legacy"): pure decoder keyed on `htype`, and an encoder.

Wire format (detector-protocols.md sect. 2): JSON parts and binary blobs over ZeroMQ PUSH/PULL.
Multipart boundaries are not reliable in practice (simulators send header parts as separate
messages), so the decoder consumes *parts* one by one through a state machine:

- `dheader-1.0` (series, header_detail) then, for basic/all, the detector config dict; for `all`
  the flatfield / pixel-mask / count-rate pairs (header + blob) and an optional header appendix
  (JSON text: our `scan_shape` [rows, cols] and optics, as a SIMPLON header_appendix can carry).
  The pixel mask becomes `SeriesInfo.pixel_mask` (flagged pixels are excluded even when the
  detector did not set them to 2^bits - 1, i.e. `pixel_mask_applied` false); the flatfield and
  count-rate table describe corrections the detector itself applies, so they are not used;
- per image: `dimage-1.0` (series, frame), `dimage_d-1.0` (shape [x, y], type, encoding, size),
  the blob, `dconfig-1.0`, optionally an image appendix;
- `dseries_end-1.0`.

Encodings: `bs8/16/32-lz4<` (bitshuffle + LZ4, HDF5 framing; a zeroed 12-byte header, as
LiberTEM's mock writes, is replaced by shape x itemsize and 8192-byte blocks), `lz4<` (a bare
LZ4 block), `<` (raw). The decoded length is always checked against shape x itemsize. The
series starts (SeriesStart) when its first image arrives, once the whole header is known.
"""

from __future__ import annotations

import json
import math
from typing import Any

import lz4.block
import numpy as np

from .base import (
    CollectsErrors,
    CompressedFrame,
    DecodeError,
    Event,
    FrameBatch,
    SeriesEnd,
    SeriesInfo,
    SeriesStart,
    defect_mask,
)
from .base import (
    header_int as _int,
)
from .compression import BLOCK_BYTES, HEADER, decompress

TYPES = {"uint8": "|u1", "uint16": "<u2", "uint32": "<u4"}
MAX_JSON_BYTES = 1 << 20
MAX_PIXELS = 1 << 26
HEADER_BLOBS = {"dflatfield-1.0", "dpixelmask-1.0", "dcountrate_table-1.0"}


def _json(part: Any) -> dict | None:
    """The part as a JSON object, or None if it is not one (a blob or an appendix)."""
    buf = memoryview(part)
    if buf.nbytes > MAX_JSON_BYTES or buf.nbytes < 2 or bytes(buf[:1]) != b"{":
        return None
    try:
        obj = json.loads(bytes(buf))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None

    return obj if isinstance(obj, dict) else None


class DectrisV1Decoder(CollectsErrors):
    protocol = "dectris-v1"

    def __init__(self):
        self._init_errors()
        self.series: SeriesInfo | None = None
        self._state = "idle"  # idle | config | header_extra | header_blob | image_d | blob | ...
        self._series_id: int | None = None
        self._config: dict | None = None
        self._appendix: dict = {}
        self._blob_header: dict | None = None  # the header of the blob that comes next
        self._pixel_mask: tuple[dict, bytes] | None = None  # (its header, the blob)
        self._started = False
        self._frame: int | None = None
        self._image_d: dict | None = None
        self._images = 0
        # hand bslz4 images on undecoded (CompressedFrame), for in-kernel decompression
        self.defer_bslz4 = False

    def decode(self, parts: list[Any]) -> list[Event]:
        """Events of these parts; a bad part is recorded and the rest still decoded, so a
        series start or frames before it are never lost (see `CollectsErrors`)."""
        events: list[Event] = []
        for part in parts:
            try:
                event = self._part(part)
            except DecodeError as err:
                self._errors.append(err)
                continue
            except (RecursionError, TypeError, ValueError, OverflowError) as exc:
                self._state = "skip_image" if self._state in ("image_d", "blob") else "idle"
                self._errors.append(DecodeError("bad_header", f"{type(exc).__name__}: {exc}"))
                continue
            if event is not None:
                events.extend(event if isinstance(event, list) else [event])
        return self._finish(events)

    # ------------------------------------------------------------------ state machine
    def _part(self, part: Any):
        state = self._state
        if state == "header_blob":  # the blob after a flatfield/mask/count-rate header
            self._state = "header_extra"
            if self._blob_header.get("htype") == "dpixelmask-1.0":
                if memoryview(part).nbytes > 4 * MAX_PIXELS:
                    raise DecodeError("oversized", "pixel mask larger than any detector")
                self._pixel_mask = (self._blob_header, bytes(part))
            return None
        if state == "blob":
            self._state = "dconfig"
            return self._image(part)
        msg = _json(part)
        htype = msg.get("htype") if msg is not None else None
        if state == "skip_image":  # rest of an image we could not use: skip to the next one
            if htype not in ("dheader-1.0", "dimage-1.0", "dseries_end-1.0"):
                return None
        if state == "config":
            if msg is None or htype is not None:
                raise self._fail("bad_header", "expected the detector config after dheader")
            self._config = msg
            self._state = "header_extra"
            return None
        if state == "image_d":
            if htype != "dimage_d-1.0":
                self._state = "skip_image"
                raise DecodeError("bad_framing", f"expected dimage_d-1.0, got {htype!r}")

            self._image_d = msg
            self._state = "blob"
            return None
        if htype == "dheader-1.0":
            return self._header(msg)
        if htype in HEADER_BLOBS and state == "header_extra":
            self._state = "header_blob"
            self._blob_header = msg
            return None
        if htype == "dimage-1.0":
            return self._image_header(msg)
        if htype == "dseries_end-1.0":
            series = _int(msg, "series")
            self._state = "idle"
            if series != self._series_id:
                raise DecodeError("wrong_series", f"end of series {series} never started here")
            if self.series is None:  # disarmed before any image: start and end it empty
                try:
                    return [self._start(), SeriesEnd(series, 0)]
                except DecodeError:
                    return None
            return SeriesEnd(series, self._images)
        if htype == "dconfig-1.0" and state == "dconfig":
            self._state = "after_image"
            return None
        if state == "header_extra" and htype is None:  # the header appendix
            appendix = _json(part) or {}  # size-capped, and never a recursion error
            self._appendix = appendix if isinstance(appendix, dict) else {}
            return None
        if state == "after_image" and htype is None:  # an image appendix: not used
            return None
        raise DecodeError("bad_framing", f"unexpected part {htype or 'blob'!r} in state {state}")

    def _fail(self, reason: str, detail: str) -> DecodeError:
        self._state = "idle"  # resynchronise on the next recognisable part
        return DecodeError(reason, detail)

    def _header(self, msg: dict):
        self._series_id = _int(msg, "series")
        detail = msg.get("header_detail", "basic")
        if detail not in ("basic", "all"):
            self._state = "idle"
            raise DecodeError("bad_header", f"header_detail {detail!r} carries no geometry: arm "
                              "with header_detail basic or all")  # fmt: skip
        self._config, self._appendix, self._started, self._images = None, {}, False, 0
        self._pixel_mask = None
        self.series = None
        self._state = "config"
        return None

    def _start(self) -> SeriesStart:
        c = self._config or {}
        width = _int(c, "x_pixels_in_detector", 1, 1 << 16)
        height = _int(c, "y_pixels_in_detector", 1, 1 << 16)
        if width * height > MAX_PIXELS:
            raise DecodeError("oversized", f"{height}x{width} detector")
        bits = c.get("bit_depth_image", 16)
        dtype = {8: "|u1", 16: "<u2", 32: "<u4"}.get(bits) if type(bits) is int else None
        if dtype is None:
            raise DecodeError("bad_header", f"bit_depth_image {bits!r}")
        nimages = _int(c, "nimages", 1, 1 << 31)
        ntrigger = _int(c, "ntrigger", 1, 1 << 31) if "ntrigger" in c else 1
        # exte/inte: one frame per trigger; exts/ints: nimages per trigger
        frames = ntrigger if c.get("trigger_mode") in ("exte", "inte") else nimages * ntrigger
        a = self._appendix
        scan = a.get("scan_shape")
        scan = (tuple(int(n) for n in scan) if isinstance(scan, list) and len(scan) == 2
                and all(type(n) is int and 0 < n <= 1 << 16 for n in scan) else None)  # fmt: skip

        def opt(key):
            v = a.get(key)
            return float(v) if isinstance(v, int | float) and math.isfinite(v) and v > 0 else None

        frame_time = c.get("frame_time")
        self.series = SeriesInfo(
            series_id=self._series_id,
            scan_shape=scan,
            detector_shape=(height, width),
            dtype=dtype,
            energy_eV=opt("energy_eV"),
            step_A=opt("step_A"),
            semiangle_mrad=opt("semiangle_mrad"),
            angular_sampling_mrad=opt("angular_sampling_mrad"),
            counts_per_electron=1.0,
            mask_value=(1 << bits) - 1,
            frames_expected=int(frames) if type(frames) is int else None,
            dwell_s=float(frame_time) if isinstance(frame_time, int | float) else None,
            ground_truth=a.get("ground_truth") if isinstance(a.get("ground_truth"), dict)
            else None,
            pixel_mask=self._mask((height, width)),
        )  # fmt: skip
        self._started = True
        return SeriesStart(self.series, repeat=False)

    def _mask(self, detector_shape: tuple[int, int]) -> np.ndarray | None:
        """The header's pixel mask, if it came and fits the detector; a bad one is recorded
        (and the series goes on with the masked-value rule only)."""
        if self._pixel_mask is None:
            return None
        head, blob = self._pixel_mask
        try:
            if head.get("shape") != list(detector_shape[::-1]) or head.get("type") != "uint32":
                raise DecodeError(
                    "bad_header",
                    f"pixel mask {head.get('shape')} {head.get('type')} for {detector_shape}",
                )

            return defect_mask(blob, detector_shape)
        except DecodeError as err:
            self._errors.append(err)
            return None

    def _image_header(self, msg: dict):
        series = _int(msg, "series")
        self._frame = _int(msg, "frame", 0, 1 << 31)
        self._state = "image_d"
        if self._series_id is None or series != self._series_id or self._config is None:
            self._state = "skip_image"
            raise DecodeError("no_start", f"image of series {series} without its header")
        if not self._started:
            try:
                return self._start()
            except DecodeError:
                self._state = "skip_image"  # unusable header: skip this image's parts
                raise
        return None

    def _image(self, blob: Any) -> FrameBatch | CompressedFrame:
        info, d = self.series, self._image_d
        shape = d.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and shape[::-1] ==
                list(info.detector_shape)):  # fmt: skip
            raise DecodeError("size_mismatch", f"frame shape [x, y] {shape} != detector")
        if TYPES.get(d.get("type")) != info.dtype:
            raise DecodeError("bad_dtype", f"frame type {d.get('type')!r} != {info.dtype}")
        nbytes = info.frame_nbytes
        if info.frames_expected is not None and self._frame >= info.frames_expected:
            raise DecodeError("index_out_of_range", f"frame {self._frame}")
        data = memoryview(blob).cast("B")
        encoding = d.get("encoding", "<")
        if encoding in ("bs8-lz4<", "bs16-lz4<", "bs32-lz4<"):
            if data.nbytes >= HEADER.size and not any(bytes(data[: HEADER.size])):
                data = memoryview(HEADER.pack(nbytes, BLOCK_BYTES) + bytes(data[HEADER.size :]))
            size = np.dtype(info.dtype).itemsize
            if self.defer_bslz4:  # the kernel decompresses it (CompressedFrame)
                self._images += 1
                return CompressedFrame(info.series_id, self._frame, data, size,
                                       info.detector_shape, info.dtype)  # fmt: skip
            raw = decompress("bslz4", size, data, nbytes)
        elif encoding == "lz4<":
            if data.nbytes > nbytes + nbytes // 255 + 64:
                raise DecodeError("size_mismatch", "lz4 blob larger than possible")
            try:
                raw = lz4.block.decompress(data, uncompressed_size=nbytes)
            except Exception as exc:
                raise DecodeError("bad_payload", f"lz4: {exc}") from None
        elif encoding == "<":
            raw = data
        else:
            raise DecodeError("bad_encoding", f"unknown encoding {encoding!r}")
        size = raw.nbytes if isinstance(raw, memoryview) else len(raw)
        if size != nbytes:
            raise DecodeError("size_mismatch", f"decoded {size} bytes, frame is {nbytes}")
        self._images += 1
        frame = np.frombuffer(raw, dtype=info.dtype).reshape(info.detector_shape)
        return FrameBatch(info.series_id, self._frame, frame[None])


# ------------------------------------------------------------------------------- encoder
def _j(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def encode_header(info: SeriesInfo) -> list[list[bytes]]:
    """The header as two messages (dheader alone, then the rest), as LiberTEM's simulator
    sends it: receivers must not rely on multipart boundaries."""
    height, width = info.detector_shape
    bits = np.dtype(info.dtype).itemsize * 8
    config = {
        "x_pixels_in_detector": width, "y_pixels_in_detector": height,
        "bit_depth_image": bits, "bit_depth_readout": bits,
        "nimages": 1, "ntrigger": int(info.frames_expected or 1), "trigger_mode": "exte",

        "count_time": info.dwell_s or 0.0, "frame_time": info.dwell_s or 0.0,
        "compression": "bslz4", "description": "tcbf-live simulator (DECTRIS stream V1 format)",
    }  # fmt: skip
    appendix = {
        "scan_shape": list(info.scan_shape) if info.scan_shape else None,
        "energy_eV": info.energy_eV, "step_A": info.step_A,
        "semiangle_mrad": info.semiangle_mrad,
        "angular_sampling_mrad": info.angular_sampling_mrad, "ground_truth": info.ground_truth,
    }  # fmt: skip
    shape = [width, height]
    # the detector's flags: sent with pixel_mask_applied false when the frames keep raw values
    flagged = info.pixel_mask is not None
    mask = (info.pixel_mask if flagged else np.zeros((height, width))).astype("<u4")
    config["pixel_mask_applied"] = not flagged
    return [
        [_j({"htype": "dheader-1.0", "series": int(info.series_id), "header_detail": "all"})],
        [
            _j(config),
            _j({"htype": "dflatfield-1.0", "shape": shape, "type": "float32"}),
            np.ones((height, width), np.float32).tobytes(),
            _j({"htype": "dpixelmask-1.0", "shape": shape, "type": "uint32"}),
            mask.tobytes(),
            _j({"htype": "dcountrate_table-1.0", "shape": [2, 1], "type": "float32"}),
            np.zeros(2, np.float32).tobytes(),
            _j({k: v for k, v in appendix.items() if v is not None}),
        ],
    ]


def encode_image(series_id: int, frame_id: int, frame: np.ndarray, encoding: str = "bslz4",
                 time_ns: int = 0, blob: bytes | None = None) -> list[bytes]:  # fmt: skip
    """One image as its 4 parts; encoding "bslz4" (bsNN-lz4<), "lz4" (lz4<) or "raw" (<).
    `blob`: an already bslz4-compressed frame (a stored file chunk), sent as it is."""
    from .compression import compress_bslz4

    frame = np.asarray(frame) if blob is not None else np.ascontiguousarray(frame)
    bits = frame.itemsize * 8
    if blob is not None:
        enc = f"bs{bits}-lz4<"
    elif encoding == "bslz4":
        blob, enc = compress_bslz4(frame), f"bs{bits}-lz4<"
    elif encoding == "lz4":
        blob, enc = lz4.block.compress(frame.tobytes(), store_size=False), "lz4<"
    else:
        blob, enc = frame.tobytes(), "<"
    rows, cols = frame.shape
    return [
        _j({"htype": "dimage-1.0", "series": int(series_id), "frame": int(frame_id), "hash": ""}),
        _j(
            {
                "htype": "dimage_d-1.0",
                "shape": [cols, rows],
                "type": f"uint{bits}",
                "encoding": enc,
                "size": len(blob),
            }
        ),  # fmt: skip
        blob,
        _j(
            {"htype": "dconfig-1.0", "start_time": time_ns, "stop_time": time_ns, "real_time": 0}
        ),  # fmt: skip
    ]


def encode_end(series_id: int) -> list[bytes]:
    return [_j({"htype": "dseries_end-1.0", "series": int(series_id)})]
