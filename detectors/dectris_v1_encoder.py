"""DECTRIS SIMPLON stream V1 encoder: the simulator's side of `dectris_v1` (the decoder).

A header as two messages (dheader, then the config, flatfield / pixel-mask / count-rate pairs
and our appendix with scan shape and optics), one 4-part message per image, a dseries_end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import lz4.block
import numpy as np

from tcbf_live.detectors.base import Message, Replay, SeriesInfo
from tcbf_live.detectors.compression import compress_bslz4


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
        _j({"htype": "dimage-1.0", "series": int(series_id), "frame": int(frame_id),
            "hash": hashlib.md5(blob, usedforsecurity=False).hexdigest()}),  # fmt: skip
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


class ImagePerMessage:
    """A DECTRIS stream for the sender: a header, one message per image, an end; no `start`
    repeats; a DECTRIS file's bslz4 chunks go out unchanged. Subclasses name their format's
    `header`, `image` and `end_message` encoders."""

    header: Any  # (info) -> list[Message]
    image: Any  # (series_id, index, frame, encoding="bslz4", blob=None) -> Message
    end_message: Any  # (series_id) -> Message

    def start(self, info: SeriesInfo, repeat: bool = False) -> list[Message]:
        return self.header(info)

    def frames(self, series_id: int, first: int, frames: np.ndarray, seq: int,
               encoding: str) -> list[Message]:  # fmt: skip
        return [self.image(series_id, first + k, f, encoding) for k, f in enumerate(frames)]

    def end(self, series_id: int, frames_sent: int) -> list[Message]:
        return [self.end_message(series_id)]

    def replay(self, source: Any, info: SeriesInfo, encoding: str) -> Replay | None:
        chunks = stored_chunks(source, encoding)
        if chunks is None:
            return None
        like = np.empty(info.detector_shape, info.dtype)  # shape and dtype only
        images = (self.image(info.series_id, i, like, blob=blob) for i, blob in chunks)
        return Replay(self.start(info), images)


class DectrisV1Encoder(ImagePerMessage):
    """Stream V1: the header as two messages, 4-part image messages."""

    header = staticmethod(encode_header)
    image = staticmethod(encode_image)
    end_message = staticmethod(encode_end)


def stored_chunks(source: Any, encoding: str) -> Iterator[tuple[int, bytes]] | None:
    """(frame index, bslz4 blob) of a recording that stores DECTRIS bslz4 chunks
    (`iter_compressed`, e.g. a DECTRIS master file), when bslz4 is asked for; else None."""
    if encoding != "bslz4":
        return None
    return getattr(source, "iter_compressed", lambda: None)()
