"""Quantum Detectors Merlin data stream (TCP 6342): MPX framing, HDR and MQ1 frames.

Wire format (detector-protocols.md sect. 5): plain TCP; every message is `MPX,` + 10 ASCII
digits + `,` + payload, the number counting the payload *plus one* (the "+1 quirk"). The
acquisition header payload starts `HDR,` (latin-1 `Key:<TAB>value` lines, `End`); each frame
payload is an ASCII MQ1 header (comma-separated, space-padded to its `data offset`) followed by
big-endian pixels (U08/U16/U32, already in image layout, quads with gaps included). There is no
end message: the series ends after `Frames in Acquisition` frames (0: continuous, until the next
HDR). The scan shape comes from the header's ScanX/ScanY when present, else `--scan`. An HDR
during an open acquisition is held until the next frame: one numbered 1 starts the new
acquisition (ending the open one), any other continues the open one and the header is counted
('foreign_header') and ignored; a header that does not parse is counted and changes nothing.

The decoder is fed raw TCP chunks (`decode([chunk])`): it re-frames the byte stream itself, so
messages split or coalesced by TCP are handled; a corrupt prefix is skipped to the next `MPX,`.
Raw R64 readout is not decoded (rejected with a clear reason).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tcbf_live.detectors.base import (
    DecodeError,
    Event,
    FrameBatch,
    Message,
    Replay,
    SeriesEnd,
    SeriesInfo,
    SeriesStart,
)
from tcbf_live.detectors.errors import CollectsErrors

PREFIX = b"MPX,"
PREFIX_LEN = 15  # "MPX," + 10 digits + ","
MAX_MESSAGE_BYTES = 64 << 20
PIXEL_TYPES = {"U08": ">u1", "U16": ">u2", "U32": ">u4"}
MAX_PIXELS = 1 << 24


def _header_fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


class MerlinDecoder(CollectsErrors):
    """Byte-stream decoder: MPX framing -> HDR (series start) / MQ1 (frames) -> series end."""

    protocol = "merlin"

    def __init__(self):
        self._init_errors()
        self._buf = bytearray()
        self._series_id = 0
        self.series: SeriesInfo | None = None
        self._frames = 0
        self._expected = 0
        self._hdr: dict | None = None
        self._next_hdr: dict | None = None  # a header that came during an open acquisition

    def reset(self) -> list[Event]:
        """A new TCP connection: stale bytes are dropped and an open acquisition ends here
        (the detector does not resume one across connections)."""
        self._buf.clear()
        events: list[Event] = []
        if self.series is not None:
            events.append(SeriesEnd(self.series.series_id, self._frames))
        self.series, self._hdr, self._next_hdr = None, None, None
        return events

    def decode(self, parts: list[Any]) -> list[Event]:
        """Feed raw bytes; returns every event completed so far. Bad messages are recorded
        (`drain_errors`) and skipped; parsing goes on with the rest of the buffer."""
        for p in parts:
            self._buf += memoryview(p).cast("B")
        events: list[Event] = []
        while True:
            try:
                payload = self._next_payload()
                if payload is None:
                    break
                events.extend(self._message(payload))
            except DecodeError as err:
                self._errors.append(err)
        return self._finish(events)

    def _next_payload(self) -> bytes | None:
        buf = self._buf
        if len(buf) < PREFIX_LEN:
            return None
        if not buf.startswith(PREFIX):
            skip = buf.find(PREFIX, 1)
            drop = skip if skip > 0 else max(len(buf) - len(PREFIX) + 1, 1)
            del buf[:drop]
            raise DecodeError("bad_framing", f"skipped {drop} bytes to the next MPX prefix")
        digits = bytes(buf[4:14])
        if not digits.isdigit() or buf[14:15] != b",":
            del buf[:4]
            raise DecodeError("bad_framing", "MPX length is not 10 digits")
        length = int(digits) - 1  # the +1 quirk: the count includes the second comma
        if not 0 < length <= MAX_MESSAGE_BYTES:
            del buf[:4]
            raise DecodeError("oversized", f"MPX message of {length} bytes")
        if len(buf) < PREFIX_LEN + length:
            return None
        payload = bytes(buf[PREFIX_LEN : PREFIX_LEN + length])
        del buf[: PREFIX_LEN + length]
        return payload

    def _message(self, payload: bytes) -> list[Event]:
        if payload.startswith(b"HDR,"):
            return self._header(payload)
        if payload.startswith(b"MQ1,"):
            return self._frame(payload)
        raise DecodeError("bad_header", f"unknown Merlin message {payload[:4]!r}")

    def _header(self, payload: bytes) -> list[Event]:
        """An acquisition header: checked first (a bad one is counted and changes nothing).
        While an acquisition is open it is held: the next frame decides (see `_frame`)."""
        fields = _header_fields(payload[4:].decode("latin-1"))
        try:
            expected = int(fields.get("Frames in Acquisition (Number)", "0"))
            scan_x = int(fields["ScanX"]) if "ScanX" in fields else None
            scan_y = int(fields["ScanY"]) if "ScanY" in fields else None
        except ValueError:
            raise DecodeError("bad_header", "non-numeric frame count or scan size") from None
        if not 0 <= expected <= 1 << 31 or (scan_x or 0) < 0 or (scan_y or 0) < 0:
            raise DecodeError("bad_header", f"frame count {expected} / scan size out of range")
        scan = (scan_y, scan_x) if scan_x and scan_y else None  # rows = ScanY
        hdr = {"scan": scan, "expected": expected or None}
        if self.series is not None:
            if self._next_hdr is not None:
                self._errors.append(DecodeError("foreign_header", "acquisition header never "
                                                "followed by its frames"))  # fmt: skip
            self._next_hdr = hdr
            return []
        self._begin(hdr)
        return []

    def _begin(self, hdr: dict) -> None:
        self._series_id += 1
        self._frames = 0
        self._expected = hdr["expected"] or 0
        self._hdr = hdr
        self._next_hdr = None
        self.series = None  # geometry comes with the first frame's MQ1 header

    def _frame(self, payload: bytes) -> list[Event]:
        head = payload[:128].split(b",")
        try:
            seq = int(head[1])
            offset = int(head[2])
            width, height = int(head[4]), int(head[5])
            ptype = head[6].decode("ascii")
        except (IndexError, ValueError, UnicodeDecodeError):
            raise DecodeError("bad_header", "unreadable MQ1 header") from None
        if seq < 1:
            raise DecodeError("index_out_of_range", f"MQ1 sequence number {seq}")
        if ptype not in PIXEL_TYPES:
            raise DecodeError("bad_encoding", f"pixel type {ptype!r} (raw R64 is not decoded)")
        if not (0 < width * height <= MAX_PIXELS) or not 0 < offset < len(payload):
            raise DecodeError("size_mismatch", f"MQ1 {width}x{height}, offset {offset}")
        dtype = PIXEL_TYPES[ptype]
        nbytes = width * height * np.dtype(dtype).itemsize
        if len(payload) - offset != nbytes:
            raise DecodeError("size_mismatch", f"{len(payload) - offset} pixel bytes for "
                              f"{width}x{height} {ptype}")  # fmt: skip
        events: list[Event] = []
        if self._next_hdr is not None:  # a header came while an acquisition was open
            if seq == 1:  # a new acquisition (continuous mode, an abort): the open one ends
                events.append(SeriesEnd(self.series.series_id, self._frames))
                self._begin(self._next_hdr)
            else:  # the open acquisition goes on: that header was not the detector's
                self._next_hdr = None
                self._errors.append(DecodeError("foreign_header", "acquisition header in the "
                                                f"middle of acquisition {self._series_id}, "
                                                "whose frames go on: ignored"))  # fmt: skip
        if self._hdr is None:
            raise DecodeError("no_start", "frame before any acquisition header")
        if self.series is None:
            self.series = SeriesInfo(
                series_id=self._series_id,
                scan_shape=self._hdr["scan"],
                detector_shape=(height, width),
                dtype=np.dtype(dtype).newbyteorder("<").str,
                counts_per_electron=1.0,
                mask_value=None,  # Medipix has no NODATA value
                frames_expected=self._hdr["expected"],
                dwell_s=_shutter_s(head),  # the frame's shutter time: beam current in the dose
            )

            events.append(SeriesStart(self.series, repeat=False))
        elif (height, width) != self.series.detector_shape:
            self._errors.append(DecodeError("size_mismatch", "frame size changed within the "
                                            "acquisition"))  # fmt: skip
            return events
        frame = np.frombuffer(payload, dtype=dtype, count=width * height, offset=offset)
        frame = frame.astype(self.series.dtype).reshape(height, width)  # to little-endian
        events.append(FrameBatch(self.series.series_id, seq - 1, frame[None]))
        self._frames += 1
        if self._expected and self._frames >= self._expected:
            events.append(SeriesEnd(self.series.series_id, self._frames))
            self.series = None
            self._hdr = None
        return events


# ------------------------------------------------------------------------------- encoder
def mpx(payload: bytes) -> bytes:
    return PREFIX + f"{len(payload) + 1:010d},".encode() + payload


def encode_header(frames: int, scan_shape: tuple[int, int] | None, depth: int = 12) -> bytes:
    lines = [
        "HDR,",
        "Time and Date Stamp (day, mnth, yr, hr, min, s):\t24/11/2026 01:00:00",
        "Chip ID:\tW530_H5,-,-,-",
        "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX",
        "Assembly Size (NX1, 2X2):\t   1x1",
        "Chip Mode  (SPM, CSM, CM, CSCM):\tSPM",
        "Counter Depth (number):\t" + str(depth),
        f"Frames in Acquisition (Number):\t{frames}",
        "Frames per Trigger (Number):\t" + str(scan_shape[1] if scan_shape else frames),
        "Trigger Start (Positive, Negative, Internal):\tRising Edge",
        "Readout System:\tMerlin Quad",
    ]
    if scan_shape:
        lines += [f"ScanX:\t{scan_shape[1]}", f"ScanY:\t{scan_shape[0]}"]
    text = "\n".join(lines + ["End\t"]) + "\n"
    return mpx(text.encode("latin-1").ljust(2048, b" "))


def encode_frame(seq: int, frame: np.ndarray) -> bytes:
    """One MQ1 frame message (sequence number 1-based), big-endian pixels."""
    height, width = frame.shape
    ptype = {1: "U08", 2: "U16", 4: "U32"}[frame.dtype.itemsize]
    fields = [
        "MQ1",
        f"{seq:06d}",
        "00384",
        "01",
        f"{width:04d}",
        f"{height:04d}",
        ptype,
        "   1x1",
        "01",
        "2026-11-24 01:00:00.000000",
        "0.000100",
        "0",
        "0",
        "0",
    ]
    header = ",".join(fields).encode("ascii").ljust(384, b" ")
    return mpx(header + frame.astype(frame.dtype.newbyteorder(">")).tobytes())


class MerlinEncoder:
    """The Merlin data port for the sender: HDR, then MQ1 frames (one message per batch), no
    end message. A .mib recording's own header and frames go out unchanged."""

    def start(self, info: SeriesInfo, repeat: bool = False) -> list[Message]:
        return [[encode_header(info.frames_expected or 0, info.scan_shape)]]

    def frames(self, series_id: int, first: int, frames: np.ndarray, seq: int,
               encoding: str) -> list[Message]:  # fmt: skip
        return [[b"".join(encode_frame(first + k + 1, f) for k, f in enumerate(frames))]]

    def end(self, series_id: int, frames_sent: int) -> list[Message]:
        return []

    def replay(self, source: Any, info: SeriesInfo, encoding: str) -> Replay | None:
        """A .mib recording (`raw_frame(i)`: its MQ1 messages; `header_text`: its .hdr)."""
        raw = getattr(source, "raw_frame", None)
        if raw is None:
            return None
        text = getattr(source, "header_text", None)
        start = [[mpx(b"HDR," + text.encode("latin-1"))]] if text else self.start(info)
        return Replay(start, ([mpx(raw(i))] for i in range(info.frames_expected or 0)))


def _shutter_s(head: list[bytes]) -> float | None:
    """MQ1 field 10, the shutter (exposure) time in seconds, if readable and positive."""
    try:
        value = float(head[10])
    except (IndexError, ValueError):
        return None
    return value if 0 < value < 1e3 else None
