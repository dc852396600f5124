"""What the parts of a DECTRIS stream V1 message say: JSON parts, blob sizes, and the series
metadata of a collected header (detector config + header appendix). Pure functions for the
decoder's state machine (`dectris_v1`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tcbf_live.detectors.base import CompressedFrame, DecodeError, FrameBatch, SeriesInfo
from tcbf_live.detectors.base import header_int as _int
from tcbf_live.detectors.compression import (
    BLOCK_BYTES,
    HEADER,
    decompress,
    decompress_lz4_block,
)
from tcbf_live.detectors.json_template import MAX_JSON_BYTES, Template, learn

MAX_PIXELS = 1 << 26


def json_part(part: Any) -> dict | None:
    """The part as a JSON object, or None if it is not one (a blob or an appendix)."""
    buf = memoryview(part)
    if buf.nbytes > MAX_JSON_BYTES or buf.nbytes < 2 or bytes(buf[:1]) != b"{":
        return None
    try:
        obj = json.loads(bytes(buf))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None

    return obj if isinstance(obj, dict) else None


def header_info(series_id: int, c: dict, a: dict) -> SeriesInfo:
    """SeriesInfo of a header: `c` the detector config, `a` the header appendix (our scan shape
    and optics). DecodeError when the geometry or bit depth is unusable."""
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
    scan = a.get("scan_shape")
    scan = (tuple(int(n) for n in scan) if isinstance(scan, list) and len(scan) == 2
            and all(type(n) is int and 0 < n <= 1 << 16 for n in scan) else None)  # fmt: skip

    def opt(key):
        v = a.get(key)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) and v > 0 else None

    frame_time = c.get("frame_time")
    return SeriesInfo(
        series_id=series_id,
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
    )  # fmt: skip


def fits_blob(blob: Any, head: dict | None) -> bool:
    """The blob has the size its header (shape [x, y], type) says; any size if it says none."""
    shape, kind = (head or {}).get("shape"), (head or {}).get("type")
    itemsize = {"float32": 4, "uint32": 4, "uint16": 2, "uint8": 1, "float64": 8}.get(kind)
    if not (isinstance(shape, list) and shape and all(type(n) is int and n > 0 for n in shape)
            and itemsize):  # fmt: skip
        return json_part(blob) is None
    return memoryview(blob).nbytes == math.prod(shape) * itemsize


def fits_image(blob: Any, d: dict | None) -> bool:
    """The blob has the byte count its dimage_d `size` says (any blob when it says none)."""
    size = (d or {}).get("size")
    if type(size) is not int:
        return json_part(blob) is None
    return memoryview(blob).nbytes == size


# ------------------------------------------------------------------ lean image parts
# the fields of an image's JSON parts: (the same in every frame, read per frame)
LEAN_FIELDS = ((frozenset({"htype", "series"}), frozenset({"frame"})),
               (frozenset({"htype", "shape", "type", "encoding"}), frozenset({"size"})),
               (frozenset({"htype"}), frozenset()))  # fmt: skip


@dataclass(frozen=True)
class ImageLayout:
    """The layout of one series' image messages, learned from a fully parsed one: the
    templates (`json_template`) of its dimage (captures the frame id), dimage_d (the blob
    size) and dconfig parts, and that dimage_d's dict, whose shape, type and encoding every
    matching dimage_d repeats."""

    dimage: Template
    image_d: Template
    dconfig: Template
    image_d_dict: dict


def image_layout(parts: list[Any], image_d: dict | None) -> ImageLayout | None:
    """The layout of a 4-part image message (dimage, dimage_d, blob, dconfig) whose dimage_d
    parsed to `image_d`; None if a JSON part is not laid out as `json_template.learn` needs."""
    jsons = (parts[0], parts[1], parts[3])
    templates = [learn(p, *f) for p, f in zip(jsons, LEAN_FIELDS, strict=True)]
    if image_d is None or not all(t is not None for t in templates):
        return None
    return ImageLayout(*templates, image_d)


# ------------------------------------------------------------------ an image's pixels
TYPES = {"uint8": "|u1", "uint16": "<u2", "uint32": "<u4"}
BSLZ4 = {"|u1": "bs8-lz4<", "<u2": "bs16-lz4<", "<u4": "bs32-lz4<"}


def _check_image(info: SeriesInfo, d: dict, frame: int) -> None:
    shape = d.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and shape[::-1] ==
            list(info.detector_shape)):  # fmt: skip
        raise DecodeError("size_mismatch", f"frame shape [x, y] {shape} != detector")
    if TYPES.get(d.get("type")) != info.dtype:
        raise DecodeError("bad_dtype", f"frame type {d.get('type')!r} != {info.dtype}")
    if info.frames_expected is not None and frame >= info.frames_expected:
        raise DecodeError("index_out_of_range", f"frame {frame}")


def image_event(info: SeriesInfo, d: dict, frame: int, blob: Any,
                defer_bslz4: bool) -> FrameBatch | CompressedFrame:  # fmt: skip
    """The frame of an image (its dimage_d `d`, frame id, blob) of the series `info`: decoded,
    or a CompressedFrame for the kernel to decompress (bslz4 and `defer_bslz4`). DecodeError
    for a shape, type, index or encoding the series does not have, or bytes that do not
    decode to exactly one frame."""
    _check_image(info, d, frame)
    nbytes = info.frame_nbytes
    data = memoryview(blob).cast("B")
    encoding = d.get("encoding", "<")
    if encoding in BSLZ4.values():
        if data.nbytes >= HEADER.size and not any(bytes(data[: HEADER.size])):
            data = memoryview(HEADER.pack(nbytes, BLOCK_BYTES) + bytes(data[HEADER.size :]))
        size = np.dtype(info.dtype).itemsize
        if defer_bslz4:  # the kernel decompresses it (CompressedFrame)
            return CompressedFrame(info.series_id, frame, data, size, info.detector_shape,
                                   info.dtype)  # fmt: skip
        raw = decompress("bslz4", size, data, nbytes)
    elif encoding == "lz4<":
        raw = decompress_lz4_block(data, nbytes)
    elif encoding == "<":
        raw = data
    else:
        raise DecodeError("bad_encoding", f"unknown encoding {encoding!r}")
    size = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    if size != nbytes:
        raise DecodeError("size_mismatch", f"decoded {size} bytes, frame is {nbytes}")
    pixels = np.frombuffer(raw, dtype=info.dtype).reshape(info.detector_shape)
    return FrameBatch(info.series_id, frame, pixels[None])


def lane_ready(info: SeriesInfo, d: dict) -> bool:
    """Images described by the dimage_d `d` are bslz4 frames of this series' shape and type,
    so a compiled loop may fold them (it checks each one's frame id and blob)."""
    try:
        _check_image(info, d, 0)
    except DecodeError:
        return False
    return d.get("encoding") == BSLZ4.get(info.dtype)
