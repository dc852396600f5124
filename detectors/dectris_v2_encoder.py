"""DECTRIS SIMPLON stream V2 encoder: the simulator's side of `dectris_v2` (the decoder).

One CBOR map per message: `start` (scan shape and optics in user_data, the pixel mask when
the series has one), one `image` per frame (bslz4 or uncompressed), `end`.
"""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np

from tcbf_live.detectors.base import Message, SeriesInfo
from tcbf_live.detectors.compression import compress_bslz4
from tcbf_live.detectors.dectris_v1_encoder import ImagePerMessage
from tcbf_live.detectors.dectris_v2 import DTYPES, SELF_DESCRIBED, TYPED_TAG


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


class DectrisV2Encoder(ImagePerMessage):
    """Stream V2: CBOR messages (start, image, end)."""

    image = staticmethod(encode_image)
    end_message = staticmethod(encode_end)

    @staticmethod
    def header(info: SeriesInfo) -> list[Message]:
        return [encode_start(info)]
