"""Detector stream decoders: wire messages in, series metadata and frame batches out."""

from .base import DecodeError, Event, FrameBatch, SeriesEnd, SeriesInfo, SeriesStart
from .native import NativeDecoder

__all__ = [
    "DecodeError",
    "Event",
    "FrameBatch",
    "NativeDecoder",
    "SeriesEnd",
    "SeriesInfo",
    "SeriesStart",
]
