"""What the parts of a DECTRIS stream V1 message say: JSON parts, blob sizes, and the series
metadata of a collected header (detector config + header appendix). Pure functions for the
decoder's state machine (`dectris_v1`).
"""

from __future__ import annotations

import json
import math
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
