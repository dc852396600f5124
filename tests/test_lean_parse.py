"""The lean image paths of the DECTRIS decoders (issue 14): an image message of a learned
layout is read without json / cbor2 and gives exactly the events of the full parse; anything
else falls back to the full parse, whose errors stay what they were."""

import gc
import hashlib
import json
import os
import re
from pathlib import Path

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcbf_live.detectors import dectris_v1, dectris_v2
from tcbf_live.detectors.base import CompressedFrame, DecodeError, FrameBatch, SeriesInfo
from tcbf_live.detectors.compression import compress_bslz4
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder
from tcbf_live.detectors.dectris_v1_encoder import encode_end as v1_end
from tcbf_live.detectors.dectris_v1_encoder import encode_header, encode_image
from tcbf_live.detectors.dectris_v2 import DectrisV2Decoder
from tcbf_live.detectors.dectris_v2_encoder import encode_end as v2_end
from tcbf_live.detectors.dectris_v2_encoder import encode_image as v2_image
from tcbf_live.detectors.dectris_v2_encoder import encode_start

CAPTURES = next(
    (p for p in (Path(os.environ.get("TCBF_SHARED_DATA", "/nonexistent")) / "dectris-stream-v2",
                 Path(__file__).resolve().parents[2] / "shared" / "data" / "dectris-stream-v2",
                 Path("/work/shared/data/dectris-stream-v2")) if p.is_dir()),
    Path("/nonexistent"),
)  # fmt: skip
INFO = SeriesInfo(3, (8, 8), (24, 20), "<u2", frames_expected=64, mask_value=65535)
FRAMES = np.random.default_rng(1).poisson(2.0, (64, 24, 20)).astype("<u2")


def norm(event):
    """An event as plain comparable values (blobs and frames as bytes)."""
    if isinstance(event, FrameBatch):
        return ("F", event.series_id, event.first, event.frames.shape, event.frames.dtype.str,
                event.frames.tobytes())  # fmt: skip
    if isinstance(event, CompressedFrame):
        return ("C", event.series_id, event.first, bytes(memoryview(event.blob)),
                event.element_size, event.shape, event.dtype)  # fmt: skip
    return repr(event)


def outcome(dec, parts):
    """The events (normalized), the DecodeError raised and the errors recorded, by reason."""
    try:
        out = dec.decode([memoryview(p) for p in parts])
        raised = None
    except DecodeError as err:
        out, raised = [], err.reason
    out = out if isinstance(out, list) else [out]
    drained = [e.reason for e in dec.drain_errors()] if hasattr(dec, "drain_errors") else []
    return [norm(e) for e in out], raised, drained


class Counting:
    """Counts calls of a decoder module's full-parse function (json_part / cbor2.loads)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def v1_messages(encoding="bslz4", n=64):
    return [*encode_header(INFO), *(encode_image(3, i, FRAMES[i], encoding) for i in range(n)),
            v1_end(3)]  # fmt: skip


def v2_messages(compression="bslz4", n=64):
    return [encode_start(INFO), *(v2_image(3, i, FRAMES[i], compression) for i in range(n)),
            v2_end(3)]  # fmt: skip


def assert_same(make, messages):
    lean, full = make(True), make(False)
    for parts in messages:
        assert outcome(lean, parts) == outcome(full, parts)


@pytest.mark.parametrize("encoding", ["bslz4", "lz4", "raw"])
@pytest.mark.parametrize("defer", [False, True])
def test_v1_lean_equals_full_and_skips_json(monkeypatch, encoding, defer):
    counter = Counting(dectris_v1.json_part)
    monkeypatch.setattr(dectris_v1, "json_part", counter)
    messages = v1_messages(encoding)
    lean, full = DectrisV1Decoder(defer, lean=True), DectrisV1Decoder(defer, lean=False)
    for parts in messages:
        assert outcome(lean, parts) == outcome(full, parts)
    before = counter.calls
    for parts in messages[2:-1]:  # the images again (a repeat pass of the same series)
        assert outcome(lean, parts) == outcome(full, parts)
    assert counter.calls - before == 3 * 64  # the full decoder's parts only
    assert outcome(lean, messages[-1])[0] == ["SeriesEnd(series_id=3, frames_sent=128)"]


def test_v1_other_senders_layouts_are_learned():
    """Sorted keys, no spaces, an md5 hash and float times (as DECTRIS recordings replayed
    by other simulators send them): learned, read lean, equal to the full parse."""
    messages = encode_header(INFO)
    for i in range(8):
        blob = compress_bslz4(FRAMES[i])
        messages.append([
            b'{"frame":%d,"hash":"%s","htype":"dimage-1.0","series":3}'
            % (i, hashlib.md5(blob).hexdigest().encode()),
            b'{"encoding":"bs16-lz4<","htype":"dimage_d-1.0","shape":[20,24],"size":%d,'
            b'"type":"uint16"}' % len(blob),
            blob,
            b'{"htype":"dconfig-1.0","real_time":%f,"start_time":%f,"stop_time":%f}'
            % (1e6, i * 1e6, i * 1e6 + 5e5),
        ])  # fmt: skip
    lean = DectrisV1Decoder(lean=True)
    assert_same(lambda on: DectrisV1Decoder(lean=on), messages)
    for parts in messages:
        lean.decode(parts)
    assert lean._lean is not None
    assert lean._lean_image([memoryview(p) for p in messages[-1]]) is not None


@pytest.mark.parametrize("compression", ["bslz4", "none"])
@pytest.mark.parametrize("defer", [False, True])
def test_v2_lean_equals_full_and_skips_cbor2(monkeypatch, compression, defer):
    counter = Counting(cbor2.loads)
    monkeypatch.setattr(dectris_v2.cbor2, "loads", counter)
    messages = v2_messages(compression)
    lean = DectrisV2Decoder(defer_bslz4=defer, lean=True)
    full = DectrisV2Decoder(defer_bslz4=defer, lean=False)
    for parts in messages:
        assert outcome(lean, parts) == outcome(full, parts)
    assert counter.calls == 3 + 66  # lean: start, first image, end; full: every message
    if defer and compression == "bslz4":  # the blob is a view of the message: no copy
        event = lean.decode([memoryview(messages[5][0])])
        assert isinstance(event.blob, memoryview) and event.blob.obj is messages[5][0]


@pytest.mark.skipif(not CAPTURES.is_dir(), reason="shared captures not present")
@pytest.mark.parametrize("defer", [False, True])
def test_v2_real_capture_read_lean(defer):
    """The EIGER2 capture (times as arrays, a date tag, no image_dtype in its start): the
    first image is parsed fully and teaches the layout, the same image again is read lean."""
    start, image = ((CAPTURES / f"{n}.cbor").read_bytes() for n in ("start", "image"))
    lean = DectrisV2Decoder(defer_bslz4=defer, lean=True)
    full = DectrisV2Decoder(defer_bslz4=defer, lean=False)
    for parts in ([start], [image], [image], [image[:-1] + b"\x00"]):
        assert outcome(lean, parts) == outcome(full, parts)
    event = lean._lean_image(memoryview(image))
    assert event is not None and event.first == 0
    if not defer:
        frame = event.frames[0]
        assert frame.shape == (4362, 4148) and int(frame[frame != 65535].sum()) == 13_712
    # the next image of the series: other times and id, read lean (id 1 is out of range: the
    # full parse's error; within range for a longer series)
    edited = image.replace(b"image_id\x00", b"image_id\x01")
    edited = edited.replace(b"\x1a\x00\x03KA", b"\x19\x01\x00")
    assert lean._lean[1].read(memoryview(edited))[0] == 1
    assert outcome(lean, [edited]) == outcome(full, [edited])
    assert outcome(lean, [edited])[1] == "index_out_of_range"


def test_v1_lean_path_keeps_the_full_checks():
    """Out-of-range frame ids, a blob of another size, a repeated header, another series, a
    changed shape: the lean path gives way and the full parse's errors come out."""
    messages = v1_messages("bslz4", 4)
    big = encode_image(3, 64, FRAMES[0])
    other = encode_image(4, 1, FRAMES[1])
    wide = encode_image(3, 2, np.zeros((24, 21), "<u2"))
    short = encode_image(3, 3, FRAMES[3])
    short[2] = short[2][:-1]
    lean, full = DectrisV1Decoder(lean=True), DectrisV1Decoder(lean=False)
    results = []
    for parts in [*messages[:-1], big, other, wide, short, *encode_header(INFO),
                  encode_image(3, 5, FRAMES[5]), encode_image(3, 6, FRAMES[6])]:  # fmt: skip
        results.append(outcome(lean, parts))
        assert results[-1] == outcome(full, parts)
    reasons = [r[1] for r in results]
    assert reasons[6:10] == ["index_out_of_range", "no_start", "size_mismatch", "bad_payload"]
    assert [len(r[0]) for r in results[-2:]] == [1, 1] and results[-1][0][0][2] == 6


def test_no_python_object_retained_per_frame():
    cases = ((DectrisV1Decoder(True), v1_messages()),
             (DectrisV2Decoder(defer_bslz4=True), v2_messages()))  # fmt: skip
    for dec, messages in cases:
        for parts in messages[:-1]:
            dec.decode(parts)
        gc.collect()
        count = len(gc.get_objects())
        for _ in range(5):
            for parts in messages[3:-1]:
                dec.decode(parts)
        gc.collect()
        assert len(gc.get_objects()) - count < 10


NUMBER_EDITS = [lambda n: b"0" + n, lambda n: b"-" + n, lambda n: n + b".0", lambda n: n + b"e0",
                lambda n: b" " + n + b"\t", lambda n: b"\x0c" + n, lambda n: b"9" * 20,
                lambda n: b"2147483649",
                lambda n: b'"' + n + b'"', lambda n: b"true", lambda n: n * 2]  # fmt: skip


def _mutate(data, raw: bytes) -> bytes:
    """A byte flip, insertion, deletion or truncation of `raw`, or an edit of one of its
    digit runs (JSON numbers: leading zeros, signs, floats, strings, out of range...)."""
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "number",
                                      "number"]))  # fmt: skip
    at = data.draw(st.integers(0, max(0, len(raw) - 1)))
    if kind == "flip":
        return raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
    if kind == "insert":
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    if kind == "delete":
        return raw[:at] + raw[at + 1 :]
    if kind == "truncate":
        return raw[:at]
    runs = list(re.finditer(rb"[0-9]+", raw[:300]))
    if not runs:
        return raw
    run = data.draw(st.sampled_from(runs))
    edit = data.draw(st.sampled_from(NUMBER_EDITS))
    return raw[: run.start()] + edit(run.group()) + raw[run.end() :]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_v1_mutated_messages_agree_or_fall_back(data):
    messages = v1_messages(data.draw(st.sampled_from(["bslz4", "raw"])), 6)
    lean, full = DectrisV1Decoder(lean=True), DectrisV1Decoder(lean=False)
    for parts in messages[:4]:  # header and two images: the layout is learned
        assert outcome(lean, parts) == outcome(full, parts)
    target = list(messages[4])
    which = data.draw(st.sampled_from([0, 1, 1, 2, 3]))
    target[which] = _mutate(data, target[which])
    if data.draw(st.booleans()):
        target = target[: data.draw(st.integers(1, 4))] + target[4:]
    for parts in (target, *messages[5:]):  # the message, then the state it leaves
        assert outcome(lean, parts) == outcome(full, parts)


@pytest.mark.parametrize("encoding", ["bslz4", "raw"])
def test_v1_every_number_edit_agrees_or_falls_back(encoding):
    """Each digit run of each JSON part of an image of the learned layout, edited each way
    (leading zero, sign, float, string, out of range...), then the next image."""
    messages = v1_messages(encoding, 6)
    cases = 0
    for which in (0, 1, 3):
        raw = messages[4][which]
        for run in re.finditer(rb"[0-9]+", raw):
            for edit in NUMBER_EDITS:
                target = list(messages[4])
                target[which] = raw[: run.start()] + edit(run.group()) + raw[run.end() :]
                lean, full = DectrisV1Decoder(lean=True), DectrisV1Decoder(lean=False)
                for parts in (*messages[:4], target, messages[5]):
                    assert outcome(lean, parts) == outcome(full, parts)
                cases += 1
    assert cases >= 100


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_v2_mutated_messages_agree_or_fall_back(data):
    messages = v2_messages(data.draw(st.sampled_from(["bslz4", "none"])), 6)
    defer = data.draw(st.booleans())
    lean = DectrisV2Decoder(defer_bslz4=defer, lean=True)
    full = DectrisV2Decoder(defer_bslz4=defer, lean=False)
    for parts in messages[:3]:
        assert outcome(lean, parts) == outcome(full, parts)
    raw = messages[3][0]
    head = data.draw(st.booleans())  # mutate the metadata (first 120 bytes) or anywhere
    mutated = _mutate(data, raw[:120]) + raw[120:] if head else _mutate(data, raw)
    for parts in ([mutated], *messages[4:]):
        assert outcome(lean, parts) == outcome(full, parts)


def test_v2_layout_changes_and_other_types_fall_back():
    """A message with another key order, an extra key, a second channel, a start or an end:
    the full parse, with the same events."""
    base = cbor2.loads(v2_image(3, 5, FRAMES[5])[0])
    reordered = {k: base[k] for k in reversed(list(base))}
    extra = {**base, "user_data": {"x": [1, 2.5, None, "é"]}}
    two = {**base, "data": {**base["data"], "threshold_2": base["data"]["threshold_1"]}}
    messages = [*v2_messages("bslz4", 4)[:-1],
                *([cbor2.dumps({**m, "image_id": 7 + i})] for i, m in
                  enumerate((reordered, extra, two))),
                [json.dumps({"type": "image"}).encode()], v2_end(3)]  # fmt: skip
    assert_same(lambda on: DectrisV2Decoder(lean=on), messages)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(image_id=st.integers(0, 2**64 - 1), series_id=st.sampled_from([3, 4, 2**63]),
       dims=st.sampled_from([[24, 20], [20, 24], [24, 20, 1]]),
       tag=st.sampled_from([64, 69, 70]), algorithm=st.sampled_from(["bslz4", "lz4", "x"]),
       element_size=st.sampled_from([1, 2, 4]), cut=st.integers(0, 3), defer=st.booleans())
def test_v2_edited_fields_agree_or_fall_back(image_id, series_id, dims, tag, algorithm,
                                              element_size, cut, defer):  # fmt: skip
    """Every field the decoder checks, edited in a message of the learned layout."""
    blob = compress_bslz4(FRAMES[4])
    blob = blob[: len(blob) - cut]
    array = cbor2.CBORTag(40, [dims, cbor2.CBORTag(tag, cbor2.CBORTag(
        56500, [algorithm, element_size, blob]))])  # fmt: skip
    edited = dectris_v2.SELF_DESCRIBED + cbor2.dumps(
        {"type": "image", "series_id": series_id, "series_unique_id": "tcbf-3",
         "image_id": image_id, "data": {"threshold_1": array}})  # fmt: skip
    messages = v2_messages("bslz4", 3)
    lean = DectrisV2Decoder(defer_bslz4=defer, lean=True)
    full = DectrisV2Decoder(defer_bslz4=defer, lean=False)
    for parts in (*messages[:3], [edited], messages[3], [edited]):
        assert outcome(lean, parts) == outcome(full, parts)
    assert lean._lean is not None


def _recoded(parts, old: bytes, new: bytes) -> list[bytes]:
    raw = bytes(parts[0])
    assert raw.count(old) == 1
    return [raw.replace(old, new)]


def test_v2_keys_compared_as_cbor2_compares_them():
    """cbor2 reads a key decoded (a text key in a longer head is the same key) and keeps a
    repeated key's last value; the template compares bytes. A series learned from images with
    such keys is read by the full parse: an image of another series is not folded into it,
    and a repeated image id is read as cbor2 reads it."""
    longer = [_recoded(v2_image(s, i, FRAMES[i]), b"\x69series_id", b"\x78\x09series_id")
              for s, i in ((3, 0), (3, 1), (9, 2), (3, 3))]  # fmt: skip
    assert_same(lambda on: DectrisV2Decoder(lean=on), [encode_start(INFO), *longer, v2_end(3)])
    twice = []
    for i in range(4):  # a second image id, in a longer head, appended to the map: the last
        raw = bytes(v2_image(3, i, FRAMES[i])[0])
        at = len(dectris_v2.SELF_DESCRIBED)
        assert raw[at] == 0xA5  # a map of 5
        twice.append([raw[:at] + b"\xa6" + raw[at + 1 :] + b"\x78\x08image_id" + bytes([9 + i])])
    lean = DectrisV2Decoder(lean=True)
    full = DectrisV2Decoder(lean=False)
    got = [outcome(lean, parts) for parts in (encode_start(INFO), *twice, v2_end(3))]
    assert got == [outcome(full, parts) for parts in (encode_start(INFO), *twice, v2_end(3))]
    assert [e[2] for events, _, _ in got[1:-1] for e in events] == [9, 10, 11, 12]
