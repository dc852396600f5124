"""What the parts of a DECTRIS stream V1 message say: JSON parts, blob sizes, and the series
metadata of a collected header (detector config + header appendix). Pure functions for the
decoder's state machine (`dectris_v1`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from tcbf_live.detectors.base import DecodeError, SeriesInfo
from tcbf_live.detectors.base import header_int as _int

MAX_JSON_BYTES = 1 << 20
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
# A part that matches the pattern learned from an earlier, fully parsed part of the same kind is
# valid JSON with the same keys in the same order, the same values for every field the decoder
# reads (`literal`), a JSON integer where it reads a number that changes per frame (`captured`,
# the regex groups in key order) and any JSON scalar elsewhere (times, hash), so its fields are
# read without building a dict. Every repetition is bounded: a match is far below MAX_JSON_BYTES.
_WS = rb"[ \t\n\r]{0,16}"
_PLAIN = rb"[\x20\x21\x23-\x5b\x5d-\x7e]"  # printable ASCII but '"' and '\': no escapes
_INT = rb"(0|[1-9][0-9]{0,17})"
_SCALAR = (rb'(?:-?(?:0|[1-9][0-9]{0,30})(?:\.[0-9]{1,30})?(?:[eE][+-]?[0-9]{1,3})?|"'
           + _PLAIN + rb'{0,256}"|true|false|null)')  # fmt: skip
_PLAIN_TEXT = re.compile(_PLAIN + rb"{0,256}")


def _literal(value: Any) -> bytes | None:
    """A pattern matching exactly the JSON texts of `value` (an int, a plain string, a list
    of ints), or None for any other value."""
    if type(value) is int:
        return str(value).encode()
    if isinstance(value, str) and _PLAIN_TEXT.fullmatch(value.encode()):
        return b'"' + re.escape(value.encode()) + b'"'
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return rb"\[" + (rb",".join(_WS + str(v).encode() + _WS for v in value)) + rb"\]"
    return None


def part_pattern(part: Any, literal: frozenset, captured: frozenset) -> re.Pattern | None:
    """The pattern of JSON parts laid out as `part` (see above), or None if `part` is not a flat
    JSON object with plain keys, each once, and the kinds of values this needs."""
    try:
        pairs = json.loads(bytes(memoryview(part)), object_pairs_hook=list)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(pairs, list) or len({k for k, _ in pairs}) != len(pairs):
        return None
    items = []
    for key, value in pairs:
        if not _PLAIN_TEXT.fullmatch(key.encode()):
            return None
        if key in captured:
            pattern = _INT if type(value) is int else None
        elif key in literal:
            pattern = _literal(value)
        else:
            pattern = _SCALAR if value is None or isinstance(value, bool | int | float | str) \
                else None  # fmt: skip
        if pattern is None:
            return None
        items.append(_WS + b'"' + re.escape(key.encode()) + b'"' + _WS + b":" + _WS + pattern
                     + _WS)  # fmt: skip
    if not captured <= {k for k, _ in pairs}:
        return None
    return re.compile(rb"\{" + rb",".join(items) + rb"\}")


# the fields of an image's JSON parts: (the same in every frame, read per frame)
LEAN_FIELDS = ((frozenset({"htype", "series"}), frozenset({"frame"})),
               (frozenset({"htype", "shape", "type", "encoding"}), frozenset({"size"})),
               (frozenset({"htype"}), frozenset()))  # fmt: skip


@dataclass(frozen=True)
class ImageLayout:
    """The layout of one series' image messages, learned from a fully parsed one: the patterns
    of its dimage (group 1: the frame id), dimage_d (group 1: the blob size) and dconfig parts,
    and that dimage_d's dict, whose shape, type and encoding every matching dimage_d repeats."""

    dimage: re.Pattern
    image_d: re.Pattern
    dconfig: re.Pattern
    image_d_dict: dict


def image_layout(parts: list[Any], image_d: dict | None) -> ImageLayout | None:
    """The layout of a 4-part image message (dimage, dimage_d, blob, dconfig) whose dimage_d
    parsed to `image_d`; None if a part is not laid out as `part_pattern` needs."""
    jsons = (parts[0], parts[1], parts[3])
    patterns = [part_pattern(p, *f) for p, f in zip(jsons, LEAN_FIELDS, strict=True)]
    if image_d is None or not all(patterns):
        return None
    return ImageLayout(*patterns, image_d)
