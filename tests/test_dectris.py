"""Detector protocols (DECTRIS stream V1/V2, Merlin): real captures, byte-faithful encoders,
the whole pipeline per protocol, replays of recordings, fuzzing."""

import hashlib
import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cbor2
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcbf_live.detectors.base import (
    CompressedFrame,
    DecodeError,
    FrameBatch,
    SeriesEnd,
    SeriesStart,
)
from tcbf_live.detectors.compression import compress_bslz4, decompress, native_bslz4
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder
from tcbf_live.detectors.dectris_v2 import DectrisV2Decoder
from tcbf_live.detectors.dectris_v2_encoder import encode_end, encode_image, encode_start
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.simulators.sender import SendSettings, stream_series
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor

CAPTURES = next(
    (p for p in (Path(os.environ.get("TCBF_SHARED_DATA", "/nonexistent")) / "dectris-stream-v2",
                 Path(__file__).resolve().parents[2] / "shared" / "data" / "dectris-stream-v2",
                 Path("/work/shared/data/dectris-stream-v2")) if p.is_dir()),
    Path("/nonexistent"),
)  # the real captures live beside the repository (shared/data), not in it  # fmt: skip
needs_captures = pytest.mark.skipif(not CAPTURES.is_dir(), reason="shared captures not present")


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=(8, 12), bad_pixels=4))


@needs_captures
def test_real_eiger2_capture_decodes_to_the_published_statistics():
    dec = DectrisV2Decoder()
    # no d9d9f7 prefix, and no image_dtype (older firmware): the series starts with the first
    # image, whose typed array gives the pixel type
    assert dec.decode([(CAPTURES / "start.cbor").read_bytes()]) == []
    start, batch = dec.decode([(CAPTURES / "image.cbor").read_bytes()])  # with the prefix
    assert isinstance(start, SeriesStart)
    info = start.info
    assert info.series_id == 15614 and info.detector_shape == (4362, 4148)
    assert info.dtype == "<u2" and info.frames_expected == 1 and info.mask_value == 65535
    assert info.scan_shape is None  # DECTRIS does not send it
    assert info.pixel_mask is None  # the edited start's 4-byte placeholders count as absent

    assert isinstance(batch, FrameBatch) and batch.first == 0
    frame = batch.frames[0]
    assert frame.shape == (4362, 4148)
    digest = hashlib.sha256(np.ascontiguousarray(frame, "<u2").tobytes()).hexdigest()
    assert digest == "cf12323dbcdb88976a6e32f27a352d8a55b8561fc43409d87dab725dc98c0387"
    valid = frame != 65535
    assert (~valid).sum() == 1_253_075
    assert int(frame[valid].sum()) == 13_712 and (frame[valid] > 0).sum() == 18
    assert frame[valid].max() == 6504 and frame[1020, 3189] == 6504
    end = dec.decode([(CAPTURES / "end.cbor").read_bytes()])
    assert end == SeriesEnd(15614, 1)


def test_encoder_round_trip_and_blob_readable_by_dectris_compression(sim):
    dectris_decompress = pytest.importorskip("dectris.compression").decompress

    info = sim.series_info(5)
    frames = sim.frames(0, 6)
    dec = DectrisV2Decoder()
    start = dec.decode(encode_start(info))
    assert start.info.scan_shape == info.scan_shape and start.info.step_A == info.step_A
    for compression in ("bslz4", "none"):
        for i, f in enumerate(frames):
            got = dec.decode(encode_image(5, i, f, compression))
            np.testing.assert_array_equal(got.frames[0], f)
    blob = compress_bslz4(frames[0])
    assert dectris_decompress(blob, "bslz4", elem_size=2) == frames[0].tobytes()
    assert dec.decode(encode_end(5)) == SeriesEnd(5, 12)


@pytest.mark.parametrize("in_kernel", [True, False], ids=["bslz4 in kernel", "bslz4 in decoder"])
@pytest.mark.parametrize("protocol", ["dectris-v2", "dectris-v1"])
def test_pipeline_over_dectris_equals_the_native_result(sim, endpoint, protocol, in_kernel,
                                                        monkeypatch):  # fmt: skip
    """Per protocol, with bslz4 decompressed inside the accumulate kernel (the default where
    the library allows) or by the decoder: the same maps as the native run. A corrupt image
    in the stream is one counted rejection, its position stays empty, the rest is kept."""
    from tcbf_live.stream import staging

    assert native_bslz4()  # dectris-compression's C entry point, or the portable decoder
    monkeypatch.setattr("tcbf_live.stream.receiver.native_bslz4", lambda: in_kernel)
    fused_calls = []
    fused = staging.accumulate_compressed
    monkeypatch.setattr(staging, "accumulate_compressed",
                        lambda *a: (fused_calls.append(1), fused(*a))[1])  # fmt: skip
    engine = Engine(EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        protocol=protocol, idle_timeout_s=10.0, max_series=1,
    )).start()  # fmt: skip
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    frames = sim.frames(0, sim.n_frames)
    batches = ((f, frames[f : f + 8]) for f in range(0, len(frames), 8))
    corrupt = 70  # after the 64 calibration frames

    def compress(f):  # the simulator's encoder, with one image's LZ4 blocks damaged
        blob = compress_bslz4(f)
        return blob[:40] + bytes(24) + blob[64:] if np.array_equal(f, frames[corrupt]) else blob

    monkeypatch.setattr("tcbf_live.detectors.dectris_v1_encoder.compress_bslz4", compress)
    monkeypatch.setattr("tcbf_live.detectors.dectris_v2_encoder.compress_bslz4", compress)
    try:
        stream_series(push, sim, SendSettings(protocol=protocol, encoding="bslz4"), 9,
                      batches)  # fmt: skip
    finally:
        push.close(linger=2000)
    assert engine.join(timeout=20)
    live = engine.last_result
    kept = np.ones(len(frames), bool)
    kept[corrupt] = False
    proc = SeriesProcessor(sim.series_info(9), ProcessingSettings())
    proc.add_many([FrameBatch(9, i, frames[i : i + 1]) for i in np.flatnonzero(kept)])
    native = proc.result(final=True)
    assert live.complete  # the series ended; one frame is missing
    assert live.frames_received == sim.n_frames - 1 and live.hits.ravel()[corrupt] == 0

    assert engine.counters.rejected == {"bad_payload": 1}
    for name in ("incoherent_bf", "axial_bf", "total_counts", "hits"):
        np.testing.assert_array_equal(getattr(live, name), getattr(native, name))
    assert live.dose_e_per_A2 == pytest.approx(native.dose_e_per_A2)
    assert live.calibration.mask.sum() == 4  # the hot pixels, from 2^16 - 1
    assert bool(fused_calls) == in_kernel


def _decode_series(protocol: str, info, frames) -> list:
    """Every event of one series sent through the protocol's encoder and decoder."""
    from tcbf_live.detectors import dectris_v1_encoder as v1
    from tcbf_live.detectors import dectris_v2_encoder as v2

    if protocol == "dectris-v1":
        dec = DectrisV1Decoder()
        messages = [*v1.encode_header(info), *(v1.encode_image(info.series_id, i, f)
                                               for i, f in enumerate(frames))]  # fmt: skip
    else:
        dec = DectrisV2Decoder()
        messages = [v2.encode_start(info), *(v2.encode_image(info.series_id, i, f)
                                             for i, f in enumerate(frames))]  # fmt: skip
    events = []
    for m in messages:
        out = dec.decode(m)
        events.extend(out if isinstance(out, list) else [out])
    return events, dec.drain_errors()


@pytest.mark.parametrize("protocol", ["dectris-v1", "dectris-v2"])
def test_detector_pixel_mask_excludes_flagged_pixels(sim, protocol):
    """A pixel mask sent with header_detail all, for frames that keep raw values (mask not
    applied on the detector), excludes its pixels from the BF disk and every sum, as the
    2^bits - 1 rule does for applied masks."""
    frames = sim.frames(0, sim.n_frames).copy()
    plain = SeriesProcessor(sim.series_info(4), ProcessingSettings())
    plain.add(FrameBatch(4, 0, frames))
    noisy = tuple(plain.calibration.bf_pixels[len(plain.calibration.bf_pixels) // 2])
    frames[:, noisy[0], noisy[1]] += 40  # a noisy BF pixel, raw values
    flags = np.zeros(sim.cfg.detector_shape, bool)
    flags[noisy] = flags[0, 1] = True  # and one dark-field pixel
    for mask in (None, flags):
        info = replace(sim.series_info(4), pixel_mask=mask)
        events, errors = _decode_series(protocol, info, frames)
        assert not errors and isinstance(events[0], SeriesStart)
        got = events[0].info.pixel_mask
        want = flags if mask is not None else np.zeros_like(flags)  # V1 always sends one
        assert np.array_equal(got, want) or (mask is None and got is None)

        proc = SeriesProcessor(events[0].info, ProcessingSettings())
        proc.add_many(events[1:])
        cal, r = proc.calibration, proc.result()
        in_bf = any(tuple(p) == noisy for p in cal.bf_pixels)
        excluded = cal.mask | (frames == 65535).any(axis=0)
        if mask is None:  # without the detector's mask, calibration finds the pixel hot itself
            assert not in_bf and cal.mask[noisy] and cal.hot_pixels == 1
            continue
        assert cal.hot_pixels == 0  # flagged by the detector: not counted again
        assert not in_bf and cal.mask[noisy] and cal.mask[0, 1]
        np.testing.assert_array_equal(cal.mask, excluded)  # flagged | 2^16 - 1 pixels
        expected = np.where(excluded, 0, frames).sum(axis=(1, 2), dtype=np.int64)
        np.testing.assert_array_equal(r.total_counts.ravel(), expected)


def test_bad_pixel_masks_are_counted_and_the_series_goes_on(sim):
    from tcbf_live.detectors import dectris_v1_encoder as v1

    frames = sim.frames(0, 2)
    info = replace(sim.series_info(7), pixel_mask=np.ones(sim.cfg.detector_shape, bool))
    header = v1.encode_header(info)
    header[1][4] = header[1][4][:-4]  # one pixel short
    dec = DectrisV1Decoder()
    events = [e for m in [*header, v1.encode_image(7, 0, frames[0])] for e in dec.decode(m)]
    assert isinstance(events[0], SeriesStart) and events[0].info.pixel_mask is None
    assert isinstance(events[1], FrameBatch)
    assert [e.reason for e in dec.drain_errors()] == ["size_mismatch"]
    # V2: a mask of the wrong shape is recorded; the series starts without it
    msg = cbor2.loads(encode_start(info)[0])
    msg["pixel_mask"]["threshold_1"] = cbor2.CBORTag(
        40, [[2, 2], cbor2.CBORTag(70, bytes(16))]
    )  # fmt: skip
    dec2 = DectrisV2Decoder()
    start = dec2.decode([cbor2.dumps(msg)])
    assert isinstance(start, SeriesStart) and start.info.pixel_mask is None
    assert [e.reason for e in dec2.drain_errors()] == ["size_mismatch"]


def test_series_without_a_scan_shape_is_refused_unless_given(sim, endpoint):

    info = replace(sim.series_info(3), scan_shape=None)
    frames = sim.frames(0, 4)

    def run(scan, endpoint):
        engine = Engine(EngineSettings(
            subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
            processing=ProcessingSettings(metadata={"scan_shape": scan}),
            protocol="dectris-v2", idle_timeout_s=2.0, max_series=1,
        )).start()  # fmt: skip
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(endpoint)
        push.send_multipart(encode_start(replace(info, frames_expected=4)))
        for i, f in enumerate(frames):
            push.send_multipart(encode_image(3, i, f))
        push.send_multipart(encode_end(3))
        push.close(linger=2000)
        engine.join(timeout=10)
        return engine

    from conftest import free_port

    refused = run(None, endpoint)
    assert refused.last_result is None and refused.counters.rejected["unusable_series"] == 1
    given = run((2, 2), f"tcp://127.0.0.1:{free_port()}")  # a closed socket unbinds later
    assert given.last_result is not None and given.last_result.frames_received == 4


def test_oversized_lz4_claims_are_rejected_before_decompressing():
    f = np.arange(96 * 96, dtype=np.uint16).reshape(96, 96)
    blob = bytearray(compress_bslz4(f))
    struct.pack_into(">Q", blob, 0, 1 << 40)  # claims 1 TB
    with pytest.raises(DecodeError) as err:
        decompress("bslz4", 2, bytes(blob), f.nbytes)
    assert err.value.reason == "size_mismatch"
    with pytest.raises(DecodeError):
        decompress("bslz4", 2, bytes(blob[:20]), f.nbytes)
    with pytest.raises(DecodeError):
        decompress("zstd-of-doom", 2, bytes(blob), f.nbytes)
    # a short blob whose header claims a whole (large) frame: more than LZ4 can expand to,
    # refused before the frame's buffer is allocated
    big = np.zeros((4096, 4096), np.uint32)
    head = bytes(compress_bslz4(np.zeros((96, 96), np.uint16)))
    short = struct.pack(">QI", big.nbytes, 8192) + head[12:]
    with pytest.raises(DecodeError, match="cannot hold"):
        decompress("bslz4", 4, short, big.nbytes)


def _messages(sim):
    info = sim.series_info(4)
    frames = sim.frames(0, 2)
    return [encode_start(info)[0], encode_image(4, 0, frames[0])[0],
            encode_image(4, 1, frames[1], "none")[0], encode_end(4)[0]]  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_v2_messages_only_ever_raise_decode_errors(sim, data):
    """Truncated, corrupted and random messages: a counted DecodeError, never anything else."""
    msgs = _messages(sim)
    dec = DectrisV2Decoder()
    dec.defer_bslz4 = data.draw(st.booleans())  # the engine's in-kernel path too
    dec.decode([msgs[0]])
    which = data.draw(st.integers(0, 3))
    msg = bytearray(msgs[which])
    action = data.draw(st.sampled_from(["truncate", "flip", "random", "splice"]))
    if action == "truncate":
        msg = msg[: data.draw(st.integers(0, len(msg)))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(msg) - 1))
            msg[i] = data.draw(st.integers(0, 255))
    elif action == "random":
        msg = bytearray(data.draw(st.binary(max_size=512)))
    else:  # a valid image whose declared frame shape is huge
        image = cbor2.loads(msgs[1][3:])
        image["data"]["threshold_1"] = cbor2.CBORTag(40, [[60000, 60000], cbor2.CBORTag(
            69, cbor2.CBORTag(56500, ["bslz4", 2, b"\x00" * 64]))])  # fmt: skip
        msg = bytearray(cbor2.dumps(image))
    try:
        out = dec.decode([bytes(msg)])
    except DecodeError:
        return
    _check_events(out if isinstance(out, list) else [out])


def _check_events(events: list) -> None:
    """Only events; a frame left compressed decodes, or fails with a DecodeError."""
    assert all(isinstance(e, SeriesStart | FrameBatch | CompressedFrame | SeriesEnd)
               for e in events)  # fmt: skip
    for e in events:
        if isinstance(e, CompressedFrame):
            try:
                assert e.decoded().frames.shape == (1, *e.shape)
            except DecodeError:
                pass


# ------------------------------------------------------------------------------ stream V1
def test_v1_round_trip_every_encoding_and_any_part_boundaries(sim):
    from tcbf_live.detectors import dectris_v1_encoder as v1

    info = sim.series_info(6)
    frames = sim.frames(0, 3)
    header = v1.encode_header(info)
    images = [v1.encode_image(6, i, f, enc) for i, (f, enc) in
              enumerate(zip(frames, ("bslz4", "lz4", "raw"), strict=True))]  # fmt: skip
    parts = [p for m in header for p in m] + [p for m in images for p in m] + v1.encode_end(6)
    for grouping in ("as sent", "one part per message", "all in one message"):
        dec = DectrisV1Decoder()
        if grouping == "as sent":
            messages = [*header, *images, v1.encode_end(6)]
        elif grouping == "one part per message":
            messages = [[p] for p in parts]
        else:
            messages = [parts]
        events = [e for m in messages for e in dec.decode(m)]
        assert isinstance(events[0], SeriesStart) and events[0].info.scan_shape == (8, 12)
        assert events[0].info.mask_value == 65535 and events[0].info.step_A == info.step_A
        got = [e for e in events if isinstance(e, FrameBatch)]
        assert [b.first for b in got] == [0, 1, 2]
        for b, f in zip(got, frames, strict=True):
            np.testing.assert_array_equal(b.frames[0], f)
        assert events[-1] == SeriesEnd(6, 3)
    for image in images:  # as a DCU: dimage's hash is the MD5 of the data part (LiberTEM's
        #                    receiver refuses an empty one)
        assert json.loads(image[0])["hash"] == hashlib.md5(image[2]).hexdigest()


def test_v1_zeroed_bslz4_header_and_bad_input(sim):
    from tcbf_live.detectors import dectris_v1_encoder as v1

    info = sim.series_info(2)
    frame = sim.frames(0, 1)[0]
    dec = DectrisV1Decoder()
    for m in v1.encode_header(info):
        dec.decode(m)
    image = v1.encode_image(2, 0, frame)
    image[2] = bytes(12) + image[2][12:]  # LiberTEM's mock writes 12 zero header bytes
    np.testing.assert_array_equal(dec.decode(image)[1].frames[0], frame)
    # a frame of the wrong size is rejected and the stream goes on with the next image
    bad = v1.encode_image(2, 1, frame[:64])
    with pytest.raises(DecodeError):
        dec.decode(bad)
    assert dec.decode(v1.encode_image(2, 2, frame))[0].first == 2
    # header_detail none carries no geometry: refused with a clear reason
    with pytest.raises(DecodeError, match="header_detail"):
        DectrisV1Decoder().decode([b'{"htype":"dheader-1.0","series":1,"header_detail":"none"}'])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_fuzzed_v1_parts_only_ever_raise_decode_errors(sim, data):
    from tcbf_live.detectors import dectris_v1_encoder as v1

    info = sim.series_info(3)
    frame = sim.frames(0, 1)[0]
    dec = DectrisV1Decoder()
    dec.defer_bslz4 = data.draw(st.booleans())
    for m in v1.encode_header(info):
        dec.decode(m)
    parts = v1.encode_image(3, 0, frame) + v1.encode_end(3)
    i = data.draw(st.integers(0, len(parts) - 1))
    part = bytearray(parts[i])
    action = data.draw(st.sampled_from(["truncate", "flip", "random", "huge"]))
    if action == "truncate":
        part = part[: data.draw(st.integers(0, len(part)))]
    elif action == "flip" and part:
        for _ in range(data.draw(st.integers(1, 8))):
            part[data.draw(st.integers(0, len(part) - 1))] = data.draw(st.integers(0, 255))
    elif action == "random":
        part = bytearray(data.draw(st.binary(max_size=256)))
    else:
        part = bytearray(b'{"htype":"dimage_d-1.0","shape":[60000,60000],"type":"uint16",'
                         b'"encoding":"bs16-lz4<","size":64}')  # fmt: skip
    parts[i] = bytes(part)
    for p in parts:
        try:
            events = dec.decode([p])
        except DecodeError:
            continue
        _check_events(events)


# ------------------------------------------------------------------------------ Merlin
def test_merlin_stream_split_anywhere_decodes_the_same(sim):
    from tcbf_live.detectors import merlin

    frames = sim.frames(0, 5).astype(np.uint16)
    stream = merlin.encode_header(5, (1, 5)) + b"".join(
        merlin.encode_frame(i + 1, f) for i, f in enumerate(frames)
    )
    rng = np.random.default_rng(0)
    for _ in range(5):  # TCP may split or coalesce anywhere
        cuts = np.sort(rng.choice(len(stream), 12, replace=False))
        dec = merlin.MerlinDecoder()
        events = [e for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)
                  for e in dec.decode([stream[a:b]])]  # fmt: skip
        assert isinstance(events[0], SeriesStart) and events[0].info.scan_shape == (1, 5)
        assert events[0].info.dtype == "<u2" and events[0].info.frames_expected == 5
        assert events[0].info.dwell_s == pytest.approx(1e-4)  # MQ1 shutter time

        got = [e for e in events if isinstance(e, FrameBatch)]
        assert [b.first for b in got] == [0, 1, 2, 3, 4]
        for b, f in zip(got, frames, strict=True):
            np.testing.assert_array_equal(b.frames[0], f)  # big-endian on the wire
        assert events[-1] == SeriesEnd(1, 5)  # no end message: the announced count ends it


def test_merlin_corrupt_prefix_is_skipped_and_the_stream_goes_on(sim):
    from tcbf_live.detectors import merlin

    f = sim.frames(0, 2).astype(np.uint16)
    dec = merlin.MerlinDecoder()
    dec.decode([merlin.encode_header(2, None)])
    with pytest.raises(DecodeError):
        dec.decode([b"garbage!" * 3])

    events = dec.decode([merlin.encode_frame(1, f[0]) + merlin.encode_frame(2, f[1])])
    dec.drain_errors()  # what was left of the garbage: counted by the receiver
    assert [type(e).__name__ for e in events] == ["SeriesStart", "FrameBatch", "FrameBatch",
                                                  "SeriesEnd"]  # fmt: skip
    with pytest.raises(DecodeError, match="oversized"):
        merlin.MerlinDecoder().decode([b"MPX,9999999999," + b"x" * 20])


def test_pipeline_over_merlin_tcp_equals_the_native_result(sim):
    import threading

    from conftest import free_port
    from tcbf_live.stream.cli.sending import LinkSettings, serve

    port = free_port()
    engine = Engine(EngineSettings(
        subscriber=SubscriberSettings(endpoint=f"tcp://127.0.0.1:{port}"),
        protocol="merlin", idle_timeout_s=10.0, max_series=1,
    )).start()  # fmt: skip
    sender = threading.Thread(target=serve, args=(
        sim, SendSettings(protocol="merlin", batch=16), LinkSettings(f"tcp://127.0.0.1:{port}"),
        __import__("io").StringIO()), kwargs={"show_progress": False})  # fmt: skip
    sender.start()
    sender.join(30)
    assert engine.join(timeout=20)
    live = engine.last_result
    frames = sim.frames(0, sim.n_frames)
    proc = SeriesProcessor(replace(sim.series_info(1), mask_value=None), ProcessingSettings())
    proc.add(FrameBatch(1, 0, frames))
    native = proc.result(final=True)
    assert live.complete and live.frames_received == sim.n_frames
    assert live.info.scan_shape == sim.cfg.scan_shape  # from ScanX / ScanY
    for name in ("incoherent_bf", "axial_bf", "hits"):
        np.testing.assert_array_equal(getattr(live, name), getattr(native, name))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_fuzzed_merlin_bytes_only_ever_raise_decode_errors(sim, data):
    from tcbf_live.detectors import merlin

    f = sim.frames(0, 1)[0]
    stream = bytearray(merlin.encode_header(1, (1, 1)) + merlin.encode_frame(1, f))
    for _ in range(data.draw(st.integers(1, 6))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    stream = stream[: data.draw(st.integers(0, len(stream)))]
    dec = merlin.MerlinDecoder()
    feed = [bytes(stream)]
    for _ in range(200):
        try:
            events = dec.decode(feed)
            assert all(isinstance(e, SeriesStart | FrameBatch | SeriesEnd) for e in events)
            break
        except DecodeError:
            feed = []


# ------------------------------------------------------------------------------ replays
def write_dectris_series(tmp_path, frames, per_file=5, filter_values=(0, 2)):
    """A FileWriter-like series: data files with one bslz4 chunk per frame, a master file
    linking them, detectorSpecific metadata. `filter_values`: the bitshuffle filter's stored
    values ((block size, compression) or the plugin's 5-value form).

    With the bitshuffle HDF5 plugin registered in this process (`tests/test_record.py`
    imports it), HDF5 would complete the values as it creates the dataset ((block,
    compression) -> (0, 5, itemsize, block, compression); a 5-value form gets three more in
    front), so the files are then written by a fresh interpreter, as a FileWriter writes them."""
    import h5py

    if h5py.h5z.filter_avail(32008):
        np.save(tmp_path / "frames.npy", frames)
        script = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); "
                  "from test_dectris import write_dectris_series as w; from pathlib import Path; "
                  "w(Path(sys.argv[2]), np.load(sys.argv[3]), int(sys.argv[4]), "
                  "tuple(map(int, sys.argv[5:])))")  # fmt: skip
        subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path),
                        str(tmp_path / "frames.npy"), str(per_file), *map(str, filter_values)],
                       check=True, timeout=120)  # fmt: skip
        return tmp_path / "series_7_master.h5"
    master = tmp_path / "series_7_master.h5"
    n, h, w = frames.shape
    with h5py.File(master, "w") as m:
        for k, start in enumerate(range(0, n, per_file)):
            name = f"series_7_data_{k + 1:06d}.h5"
            with h5py.File(tmp_path / name, "w") as d:
                chunk = frames[start : start + per_file]
                ds = d.create_dataset(
                    "entry/data/data", shape=chunk.shape, dtype=frames.dtype, chunks=(1, h, w),
                    compression=32008, compression_opts=filter_values,
                    allow_unknown_filter=True,
                )  # fmt: skip
                for i, f in enumerate(chunk):
                    ds.id.write_direct_chunk((i, 0, 0), compress_bslz4(f))
            m[f"entry/data/data_{k + 1:06d}"] = h5py.ExternalLink(name, "entry/data/data")
        spec = m.create_group("entry/instrument/detector/detectorSpecific")
        spec["nimages"], spec["ntrigger"], spec["frame_time"] = 1, n, 1e-4
    return master


def test_replay_of_dectris_files_streams_the_stored_chunks(sim, tmp_path):
    from tcbf_live.detectors.vendor_files import DectrisMaster

    frames = sim.frames(0, 12)
    master = write_dectris_series(tmp_path, frames)
    data = DectrisMaster(master, {"scan_shape": (3, 4)})
    np.testing.assert_array_equal(data.frames(0, 12), frames)  # decoded without a plugin
    blobs = list(data.iter_compressed())
    assert [i for i, _ in blobs] == list(range(12))

    class Sink:  # captures what the sender puts on the wire
        parts: list = []

        def send_multipart(self, parts, **kw):
            Sink.parts.append(parts)

    for protocol in ("dectris-v2", "dectris-v1"):
        Sink.parts = []
        stream_series(Sink(), data, SendSettings(protocol=protocol, encoding="bslz4"), 7)
        wire = b"".join(p for m in Sink.parts for p in m)
        assert all(blob in wire for _, blob in blobs)  # the stored chunks, byte for byte
        dec = DectrisV2Decoder() if protocol == "dectris-v2" else DectrisV1Decoder()
        events = []
        for m in Sink.parts:
            out = dec.decode(m)
            events.extend(out if isinstance(out, list) else [out])
        got = np.concatenate([e.frames for e in events if isinstance(e, FrameBatch)])
        np.testing.assert_array_equal(got, frames)
    data.close()


def test_dectris_files_replay_stored_chunks_only_when_they_are_bslz4(sim, tmp_path):
    import h5py

    from tcbf_live.detectors.vendor_files import DatasetError, DectrisMaster

    frames = sim.frames(0, 4)
    for values, direct in (
        ((0, 2, 2, 0, 2), True),
        ((0, 3), False),
        ((0, 2, 2, 0, 3), False),
        ((0, 2, 4, 0, 2), False),
    ):  # LZ4; zstd; zstd; wrong element size
        folder = tmp_path / "_".join(map(str, values))
        folder.mkdir()
        data = DectrisMaster(write_dectris_series(folder, frames, filter_values=values),
                             {"scan_shape": (2, 2)})  # fmt: skip
        assert (data.iter_compressed() is not None) == direct
        if direct:
            np.testing.assert_array_equal(data.frames(0, 4), frames)
        elif not h5py.h5z.filter_avail(32008):  # never sent as bslz4; HDF5 cannot read it
            with pytest.raises(DatasetError, match="cannot read frame 0"):
                data.frames(0, 1)

        data.close()


def test_dectris_files_with_unfiltered_chunks_or_extra_filters(sim, tmp_path):
    """A chunk HDF5 stored without the filter (filter mask set) is read raw and recompressed
    for the stream; a filter pipeline beyond bitshuffle is never sent as stored."""
    import h5py

    from tcbf_live.detectors.vendor_files import DectrisMaster

    frames = sim.frames(0, 4)
    master = write_dectris_series(tmp_path, frames, per_file=4)
    with h5py.File(tmp_path / "series_7_data_000001.h5", "r+") as f:
        f["entry/data/data"].id.write_direct_chunk((2, 0, 0), frames[2].tobytes(), filter_mask=1)
    data = DectrisMaster(master, {"scan_shape": (2, 2)})
    np.testing.assert_array_equal(data.frames(0, 4), frames)
    blobs = dict(data.iter_compressed())
    assert decompress("bslz4", 2, blobs[2], frames[2].nbytes) == frames[2].tobytes()
    data.close()
    with h5py.File(tmp_path / "two_filters.h5", "w") as f:
        ds = f.create_dataset(
            "entry/data/data", shape=frames.shape, dtype=frames.dtype,
            chunks=(1, *frames.shape[1:]), compression=32008, compression_opts=(0, 2),
            fletcher32=True, allow_unknown_filter=True,
        )  # fmt: skip

        assert ds.id.get_create_plist().get_nfilters() == 2
    with h5py.File(tmp_path / "two_master.h5", "w") as m:
        m["entry/data/data_000001"] = h5py.ExternalLink("two_filters.h5", "entry/data/data")
    assert (
        DectrisMaster(tmp_path / "two_master.h5", {"scan_shape": (2, 2)}).iter_compressed() is None
    )


def test_replay_of_a_mib_recording_over_merlin(sim, tmp_path):
    from tcbf_live.detectors import merlin
    from tcbf_live.detectors.vendor_files import MibFile

    frames = sim.frames(0, 6).astype(np.uint16)
    mib = tmp_path / "scan.mib"
    mib.write_bytes(b"".join(merlin.encode_frame(i + 1, f)[15:] for i, f in enumerate(frames)))
    (tmp_path / "scan.hdr").write_text(
        "Frames in Acquisition (Number):\t6\nScanX:\t3\nScanY:\t2\nEnd\t\n", "latin-1"
    )
    rec = MibFile(mib)
    assert rec.scan_shape == (2, 3) and rec.n_frames == 6
    np.testing.assert_array_equal(rec.frames(0, 6), frames)
    from tcbf_live.simulators.sender import ByteStream

    class Conn:
        data = b""

        def sendall(self, b):
            Conn.data += b

    stream_series(ByteStream(Conn()), rec, SendSettings(protocol="merlin"), 1)
    events = merlin.MerlinDecoder().decode([Conn.data])
    assert events[0].info.scan_shape == (2, 3)
    got = np.concatenate([e.frames for e in events if isinstance(e, FrameBatch)])
    np.testing.assert_array_equal(got, frames)
    assert events[-1] == SeriesEnd(1, 6)
    with pytest.raises(Exception, match="whole number"):
        (tmp_path / "bad.mib").write_bytes(mib.read_bytes()[:-10])
        MibFile(tmp_path / "bad.mib", {"scan_shape": (2, 3)})


def test_v2_threshold_channel_choice(sim):
    info = sim.series_info(8)
    frames = sim.frames(0, 2)
    start = encode_start(info, channels=("threshold_1", "threshold_2"))
    image = cbor2.loads(encode_image(8, 0, frames[0])[0][3:])
    second = cbor2.loads(encode_image(8, 0, frames[1], channel="threshold_2")[0][3:])
    image["data"] = {"threshold_1": image["data"]["threshold_1"],
                     "threshold_2": second["data"]["threshold_2"]}  # fmt: skip
    message = [cbor2.dumps(image)]
    for channel, expected in ((None, frames[0]), ("threshold_2", frames[1])):
        dec = DectrisV2Decoder(channel)
        dec.decode(start)
        np.testing.assert_array_equal(dec.decode(message).frames[0], expected)
    with pytest.raises(DecodeError, match="not in"):
        DectrisV2Decoder("difference").decode(start)


def test_review_regressions_start_kept_reset_and_dtype(sim):
    """A bad first image keeps the series start (V1, V2, Merlin); a reconnect ends the open
    Merlin acquisition; V2 takes the dtype from the first image when start lacks it."""
    from tcbf_live.detectors import dectris_v1_encoder as v1
    from tcbf_live.detectors import merlin

    info = sim.series_info(5)
    frame = sim.frames(0, 1)[0]
    dec = DectrisV1Decoder()
    for m in v1.encode_header(info):
        dec.decode(m)
    bad = v1.encode_image(5, 0, frame)
    bad[2] = bad[2][:40]  # a truncated first blob
    events = dec.decode(bad)
    assert isinstance(events[0], SeriesStart) and len(dec.drain_errors()) == 1
    mdec = merlin.MerlinDecoder()
    mdec.decode([merlin.encode_header(3, None)])
    events = mdec.decode([merlin.encode_frame(0, frame), merlin.encode_frame(1, frame)])
    assert [type(e).__name__ for e in events] == ["SeriesStart", "FrameBatch"]
    assert mdec.drain_errors()[0].reason == "index_out_of_range"  # seq 0 rejected, start kept
    assert mdec.reset() == [SeriesEnd(1, 1)] and mdec.decode([]) == []
    start = cbor2.loads(encode_start(replace(info, dtype="<u2"))[0])
    del start["image_dtype"]
    v2 = DectrisV2Decoder()
    assert v2.decode([cbor2.dumps(start)]) == []
    first = v2.decode(encode_image(5, 0, frame.astype(np.uint32)))
    assert first[0].info.dtype == "<u4" and first[0].info.mask_value == 2**32 - 1
    wrong = cbor2.CBORTag(
        40,
        [
            list(frame.shape),
            cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 1, compress_bslz4(frame)])),
        ],
    )  # element size 1 for uint16 pixels
    message = {"type": "image", "series_id": 5, "image_id": 1, "data": {"threshold_1": wrong}}
    d = DectrisV2Decoder()
    d.decode(encode_start(info))
    with pytest.raises(DecodeError, match="element size"):
        d.decode([cbor2.dumps(message)])


def test_v2_foreign_and_changed_starts_mid_series(sim):
    """Images decode against the start of their own series: a foreign `start` mid-series
    costs the open series nothing; a `start` of the same id with another geometry is refused
    (the series keeps its own); the same start again is a repeat."""
    info, frame = sim.series_info(5), sim.frames(0, 1)[0]
    dec = DectrisV2Decoder()
    dec.decode(encode_start(info))
    foreign = dec.decode(encode_start(replace(info, series_id=6, detector_shape=(64, 64))))
    assert isinstance(foreign, SeriesStart) and foreign.info.series_id == 6
    np.testing.assert_array_equal(dec.decode(encode_image(5, 0, frame)).frames[0], frame)
    for change in ({"detector_shape": (64, 64)}, {"dtype": "<u4"}, {"scan_shape": (4, 24)}):
        with pytest.raises(DecodeError) as err:
            dec.decode(encode_start(replace(info, **change)))
        assert err.value.reason == "metadata_changed" and next(iter(change)) in str(err.value)
    again = dec.decode(encode_start(info))
    assert isinstance(again, SeriesStart) and again.repeat and again.info.series_id == 5
    assert dec.decode(encode_image(5, 1, frame)).first == 1
    assert dec.decode(encode_image(6, 0, np.ones((64, 64), np.uint16))).frames.shape == (1, 64, 64)
    assert dec.decode(encode_end(5)) == SeriesEnd(5, 2)
    assert dec.decode(encode_end(6)) == SeriesEnd(6, 1)


def test_v1_headers_mid_series(sim):
    """A foreign header (another series), a header that cannot be used and a repeated header
    of the open series with other metadata, all between two images: each counted once (the
    foreign one not at all: it is a good header of a series that never sends images), and the
    open series' images keep decoding against its first header."""
    from tcbf_live.detectors import dectris_v1_encoder as v1

    info, frames = sim.series_info(5), sim.frames(0, 3)
    dec = DectrisV1Decoder()
    messages = [*v1.encode_header(info), v1.encode_image(5, 0, frames[0]),
                *v1.encode_header(replace(info, series_id=6, detector_shape=(64, 64))),
                [b'{"htype":"dheader-1.0","series":7,"header_detail":"none"}'],
                v1.encode_image(5, 1, frames[1]),
                *v1.encode_header(replace(info, detector_shape=(64, 64))),
                v1.encode_image(5, 2, frames[2]), v1.encode_end(5)]  # fmt: skip
    events, errors = [], []
    for m in messages:
        try:
            events += dec.decode(m)
        except DecodeError as err:
            errors.append(err)
        errors += dec.drain_errors()
    assert sorted(e.reason for e in errors) == ["bad_header", "metadata_changed"]
    assert [type(e).__name__ for e in events] == ["SeriesStart", *["FrameBatch"] * 3,
                                                  "SeriesEnd"]  # fmt: skip
    got = np.concatenate([e.frames for e in events if isinstance(e, FrameBatch)])
    np.testing.assert_array_equal(got, frames)
    assert events[-1] == SeriesEnd(5, 3)
