"""DECTRIS SIMPLON stream V1 ("legacy"): pure decoder keyed on `htype` (the encoder:
`dectris_v1_encoder`).

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

from dataclasses import replace
from typing import Any

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
)
from tcbf_live.detectors.base import header_int as _int
from tcbf_live.detectors.dectris_v1_fields import (
    MAX_PIXELS,
    ImageLayout,
    fits_blob,
    fits_image,
    header_info,
    image_event,
    image_layout,
    json_part,
    lane_ready,
)
from tcbf_live.detectors.errors import CollectsErrors
from tcbf_live.detectors.json_template import match_part

HEADER_BLOBS = {"dflatfield-1.0", "dpixelmask-1.0", "dcountrate_table-1.0"}
HTYPES = {"dheader-1.0", "dimage-1.0", "dimage_d-1.0", "dconfig-1.0", "dseries_end-1.0",
          *HEADER_BLOBS}  # fmt: skip
KNOWN_SERIES = 8  # series whose header is remembered (images of any of them decode)


class _Series:
    """Decode state of one started series."""

    __slots__ = ("info", "images")

    def __init__(self, info: SeriesInfo):
        self.info, self.images = info, 0


class DectrisV1Decoder(CollectsErrors):
    """Part-wise state machine. Every part is either used or counted: the parts of a header
    and of an image are consumed in their order, and a part that is not what its position
    needs (garbage) is recorded as an error without losing the state around it. Started
    series are remembered (KNOWN_SERIES), images decoded against their own series' header, so
    a foreign or bad header arriving mid-series never costs the open series its images."""

    protocol = "dectris-v1"

    def __init__(self, defer_bslz4: bool = False, lean: bool = True):
        self._init_errors()
        self.series: SeriesInfo | None = None  # the latest series started
        self._known: dict[int, _Series] = {}  # started series, oldest first
        self._state = "idle"  # idle | config | header_extra | header_blob | image_d | blob |
        #                       dconfig | after_image
        # the header being collected (its series id None when the dheader was unusable)
        self._series_id: int | None = None
        self._config: dict | None = None
        self._appendix: dict | None = None
        self._blob_header: dict | None = None  # the header of the blob that comes next
        self._pixel_mask: tuple[dict, bytes] | None = None  # (its header, the blob)
        self._header_used = False  # the collected header has started (or checked) a series
        # the image being read (its series None: the image is consumed and dropped)
        self._image_series: _Series | None = None
        self._frame: int | None = None
        self._image_d: dict | None = None
        self._candidate: memoryview | None = None  # a blob-like part of the wrong size
        self._message = 0  # decode() calls so far
        self._after_dconfig: tuple[int, int] | None = None  # (message, part) of the last dconfig
        # hand bslz4 images on undecoded (CompressedFrame), for in-kernel decompression
        self.defer_bslz4 = defer_bslz4
        # read image messages of a learned layout without json (False: always the full parse)
        self.lean = lean
        self._lean: tuple[_Series, ImageLayout] | None = None
        self._learned: _Series | None = None  # the series a layout was last learned for

    def reset(self) -> list[Event]:
        """Forget every series and the message being read (nothing to close: no events)."""
        self.__init__(self.defer_bslz4, self.lean)
        return []

    def decode(self, parts: list[Any]) -> list[Event]:
        """Events of these parts; a bad part is recorded and the rest still decoded, so a
        series start or frames before it are never lost (see `CollectsErrors`)."""
        self._message += 1
        if self._lean is not None and len(parts) == 4:
            events = self._lean_image(parts)
            if events is not None:
                return self._finish(events)
        events: list[Event] = []
        errors = len(self._errors)
        for index, part in enumerate(parts):
            try:
                event = self._part(part, index)
            except DecodeError as err:
                self._errors.append(err)
                continue
            except (RecursionError, TypeError, ValueError, OverflowError) as exc:
                if self._state in ("image_d", "blob"):
                    self._image_series = None  # the rest of this image is dropped
                self._errors.append(DecodeError("bad_header", f"{type(exc).__name__}: {exc}"))
                continue
            if event is not None:
                events.extend(event if isinstance(event, list) else [event])
        if (self.lean and len(parts) == 4 and len(self._errors) == errors and events
                and self._after_dconfig == (self._message, 3)
                and self._image_series not in (None, self._learned)):  # fmt: skip
            self._learn(parts)
        return self._finish(events)

    # ------------------------------------------------------------------ lean image path
    def _learn(self, parts: list[Any]) -> None:
        """Learn the layout of this fully parsed 4-part image message (once per series)."""
        self._learned = self._image_series
        layout = image_layout(parts, self._image_d)
        self._lean = None if layout is None else (self._image_series, layout)

    def _lean_image(self, parts: list[Any]) -> list[Event] | None:
        """The events of an image message that matches the learned layout, with the state
        changes of the full parse; None (nothing changed) for anything else."""
        series, lean = self._lean
        if self._lean_series() is None:
            return None
        frame, size = match_part(parts[0], lean.dimage), match_part(parts[1], lean.image_d)
        if frame < 0 or size < 0 or match_part(parts[3], lean.dconfig) < 0:
            return None
        if frame > 1 << 31 or memoryview(parts[2]).nbytes != size:
            return None  # a frame id out of range, a wrong-size blob: the full parse says
        self._image_series, self._frame, self._image_d = series, frame, lean.image_d_dict
        self._state = "blob"
        events = _listed(self._blob(parts[2]))  # an unusable image is recorded, as in `_part`
        self._state, self._after_dconfig = "after_image", (self._message, 3)
        return events

    def _lean_series(self) -> _Series | None:
        """The series whose images may take a lean path now: the decoder is between images,
        and that series' header is not being repeated (the full parse checks it)."""
        if self._lean is None or self._state not in ("idle", "after_image") \
                or self._candidate is not None:  # fmt: skip
            return None
        series = self._lean[0]
        sid = series.info.series_id
        if self._known.get(sid) is not series or (sid == self._series_id and
                                                  self._config is not None and
                                                  not self._header_used):  # fmt: skip
            return None
        return series

    @property
    def header_open(self) -> bool:
        """A header part is announced and not here yet (the config after dheader, a blob)."""
        return self._state in ("config", "header_blob")

    def lane(self) -> tuple[SeriesInfo, tuple] | None:
        """The series, and the templates of its image parts, whose bslz4 image messages a
        compiled ingest loop may read now (`stream.fast_lane`), reporting them with
        `lane_consumed`; None when not."""
        series = self._lean_series()
        if series is None or not self.defer_bslz4:
            return None
        lay = self._lean[1]
        ready = lane_ready(series.info, lay.image_d_dict)
        return (series.info, (lay.dimage, lay.image_d, lay.dconfig)) if ready else None

    def lane_consumed(self, n: int, last_frame: int) -> None:
        """`n` image messages of the lane's series were read elsewhere, the last one's frame id
        `last_frame`: the decoder's state as the lean path leaves it."""
        series, layout = self._lean
        self._message += n
        series.images += n
        self._image_series, self._frame, self._image_d = series, last_frame, layout.image_d_dict
        self._state, self._after_dconfig = "after_image", (self._message, 3)

    # ------------------------------------------------------------------ state machine
    def _blob(self, part: Any):
        """Take `part` as the blob the state expects (header blob or image)."""
        if self._state == "header_blob":
            self._state = "header_extra"
            if self._blob_header.get("htype") == "dpixelmask-1.0":
                if memoryview(part).nbytes > 4 * MAX_PIXELS:
                    raise DecodeError("oversized", "pixel mask larger than any detector")
                self._pixel_mask = (self._blob_header, bytes(part))
            return None
        self._state = "dconfig"
        if self._image_series is None:  # an image of an unknown series: dropped
            return None
        try:
            return self._image(part)
        except DecodeError as err:
            self._errors.append(err)
            return None

    def _part(self, part: Any, index: int):
        state = self._state
        if state in ("header_blob", "blob"):
            # a blob of the announced size is taken; another part that is no JSON part is
            # held (`_candidate`): it is the blob, damaged, if a JSON part follows, and
            # garbage if another blob-like part does. One part of look-ahead: a damaged blob
            # and a garbage part are each counted once, and neither costs the other its use
            header = state == "header_blob"
            fits = fits_blob(part, self._blob_header) if header else fits_image(part, self._image_d)
            if fits or json_part(part) is None:
                if self._candidate is not None:
                    held, self._candidate = self._candidate, None
                    self._errors.append(DecodeError("size_mismatch", f"{held.nbytes}-byte "
                                                    f"part where a blob belongs"))  # fmt: skip
                if not fits:
                    self._candidate = memoryview(part)
                    return None
                return self._blob(part)
            events = self._blob(self._candidate) if self._candidate is not None else None
            if self._candidate is None:
                self._errors.append(DecodeError("bad_framing", "a blob never came"))
                self._state = "header_extra" if header else "idle"
            self._candidate = None
            more = self._part(part, index)  # the part after the (damaged) blob
            return [*_listed(events), *_listed(more)] or None
        msg = json_part(part)
        htype = msg.get("htype") if msg is not None else None
        if state == "config":
            if msg is not None and htype is None:
                self._config = msg
                self._state = "header_extra"
                return None
            if htype not in HTYPES:
                raise DecodeError("bad_header", "expected the detector config after dheader")
            self._state = state = "idle"
            self._errors.append(DecodeError("bad_header", "dheader without its config"))
        if state == "image_d":
            if htype == "dimage_d-1.0":
                self._image_d = msg
                self._state = "blob"
                return None
            if htype not in HTYPES:
                raise DecodeError("bad_framing", "expected dimage_d-1.0 after dimage-1.0")
            self._state = state = "idle"
            self._errors.append(DecodeError("bad_framing", "image without its dimage_d"))
        if htype == "dheader-1.0":
            return self._header(msg)
        if htype == "dimage-1.0":
            return self._image_header(msg)
        if htype == "dseries_end-1.0":
            return self._end(msg)
        if htype in HEADER_BLOBS and state == "header_extra":
            self._state = "header_blob"
            self._blob_header = msg
            return None
        if htype == "dconfig-1.0" and state == "dconfig":
            self._state = "after_image"
            self._after_dconfig = (self._message, index)
            return None
        if htype is None and state == "header_extra":
            if msg is None or self._appendix is not None:
                raise DecodeError("bad_appendix", "header appendix is not one JSON object")
            self._appendix = msg
            return None
        if htype is None and state == "after_image" and self._image_appendix(part, index):
            return None  # an image appendix: not used
        where = "blob" if msg is None else repr(htype)
        raise DecodeError("bad_framing", f"unexpected part {where} in state {state}")

    def _image_appendix(self, part: Any, index: int) -> bool:
        """The part straight after an image's dconfig in the same message, as text, is that
        image's appendix (SIMPLON `image_appendix`); anything else there is garbage."""
        if self._after_dconfig != (self._message, index - 1):
            return False
        self._after_dconfig = None  # one appendix per image
        try:
            bytes(memoryview(part)).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def _header(self, msg: dict):
        self._state = "config"  # its parts are consumed (and checked) even if it is unusable
        self._config, self._appendix, self._pixel_mask = None, None, None
        self._header_used = False
        self._series_id = None
        series = _int(msg, "series")
        detail = msg.get("header_detail", "basic")
        if detail not in ("basic", "all"):
            self._state = "idle"  # header_detail none: nothing follows the dheader
            raise DecodeError("bad_header", f"header_detail {detail!r} carries no geometry: arm "
                              "with header_detail basic or all")  # fmt: skip
        self._series_id = series
        return None

    def _end(self, msg: dict):
        self._state = "idle"
        series = _int(msg, "series")
        known = self._known.get(series)
        if known is not None:
            return SeriesEnd(series, known.images)
        if series == self._series_id and self._config is not None and not self._header_used:
            try:  # disarmed before any image: start and end it empty
                return [self._start(), SeriesEnd(series, 0)]
            except DecodeError:
                return None
        raise DecodeError("wrong_series", f"end of series {series} never started here")

    def _start(self) -> SeriesStart:
        """Start the collected header's series (DecodeError if the header is unusable)."""
        info = self._info()
        self._header_used = True
        self._known[info.series_id] = _Series(info)
        while len(self._known) > KNOWN_SERIES:
            self._known.pop(next(iter(self._known)))
        self.series = info
        return SeriesStart(info, repeat=False)

    def _info(self) -> SeriesInfo:
        """The collected header's SeriesInfo (DecodeError if it is unusable)."""
        info = header_info(self._series_id, self._config or {}, self._appendix or {})
        return replace(info, pixel_mask=self._mask(info.detector_shape))

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
        """An image starts: its parts are consumed in order; decoded if its series started
        (or starts now, from the collected header), else dropped after one 'no_start'."""
        self._state = "image_d"
        self._image_series, self._image_d = None, None
        series = _int(msg, "series")
        self._frame = _int(msg, "frame", 0, 1 << 31)
        collected = series == self._series_id and self._config is not None
        known = self._known.get(series)
        if known is not None:
            self._image_series = known
            if collected and not self._header_used:  # a repeated header of a running series
                self._header_used = True
                info = self._info()
                if info != known.info:
                    raise DecodeError("metadata_changed", f"header of series {series} "
                                      f"announces {describe_change(known.info, info)}: the "
                                      "first header holds")  # fmt: skip
            return None
        if not collected or self._header_used:
            raise DecodeError("no_start", f"image of series {series} without its header")
        start = self._start()  # DecodeError: unusable header, this image is dropped
        self._image_series = self._known[series]
        return start

    def _image(self, blob: Any) -> FrameBatch | CompressedFrame:
        state = self._image_series
        event = image_event(state.info, self._image_d, self._frame, blob, self.defer_bslz4)
        state.images += 1
        return event


def _listed(events) -> list:
    return [] if events is None else events if isinstance(events, list) else [events]
