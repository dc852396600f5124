"""Detector stream decoders: wire messages in, series metadata and frame batches out."""

from tcbf_live.detectors.base import (
    DecodeError,
    Event,
    FrameBatch,
    SeriesEnd,
    SeriesInfo,
    SeriesStart,
)
from tcbf_live.detectors.native import NativeDecoder

__all__ = [
    "DecodeError",
    "Event",
    "FrameBatch",
    "NativeDecoder",
    "SeriesEnd",
    "SeriesInfo",
    "SeriesStart",
]
