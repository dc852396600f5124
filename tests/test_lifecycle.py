"""Series lifecycle under a live session's faults, over real sockets (native, DECTRIS stream V1
and V2, Merlin): a second series start, a stray or restarted sender, a start that changes the
metadata of an open series, foreign and bad headers mid-series, sizes beyond the memory budget,
non-finite float frames, a series whose processing raises. Each test builds its faulty stream;
every result is compared with the same frames processed offline."""

import socket
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import zmq

from conftest import free_port
from tcbf_live.detectors import dectris_v1_encoder as v1
from tcbf_live.detectors import dectris_v2_encoder as v2
from tcbf_live.detectors import merlin
from tcbf_live.detectors import native as nat
from tcbf_live.detectors.base import (
    CompressedFrame,
    DecodeError,
    FrameBatch,
    SeriesEnd,
    SeriesStart,
)
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream import budget
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor

GiB = 1 << 30
PROTOCOLS = ["native", "dectris-v1", "dectris-v2"]


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=(8, 12), bad_pixels=4))


@pytest.fixture(scope="module")
def frames(sim):
    return sim.frames(0, sim.n_frames)


def offline(info, frames, first=0):
    """The same frames through the same pipeline, without the fault."""
    proc = SeriesProcessor(info, ProcessingSettings())
    proc.add(FrameBatch(info.series_id, first, frames))
    return proc.result(final=True)


def assert_same_maps(live, ref):
    assert live.frames_received == ref.frames_received
    for name in ("incoherent_bf", "axial_bf", "total_counts", "hits"):
        np.testing.assert_array_equal(getattr(live, name), getattr(ref, name))


# ----------------------------------------------------------------------------- wire helpers
def start(protocol, info, repeat=False) -> list[list]:
    if protocol == "native":
        return [nat.encode_start(info, repeat)]
    if protocol == "dectris-v1":
        return v1.encode_header(info)
    return [v2.encode_start(info)]


def images(protocol, sid, first, frames, per_message=8) -> list[list]:
    if protocol == "native":
        return [nat.encode_frames(sid, first + k, frames[k : k + per_message])
                for k in range(0, len(frames), per_message)]  # fmt: skip
    encode = v1.encode_image if protocol == "dectris-v1" else v2.encode_image
    return [encode(sid, first + k, f) for k, f in enumerate(frames)]


def end(protocol, sid, sent) -> list[list]:
    if protocol == "native":
        return [nat.encode_end(sid, sent)]
    return [v1.encode_end(sid) if protocol == "dectris-v1" else v2.encode_end(sid)]


def live(endpoint, protocol="native", **kw):
    """An engine bound on `endpoint` (PULL) and the list its finished series go to."""
    results = []
    settings = EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        protocol=protocol, idle_timeout_s=kw.pop("idle_timeout_s", 5.0),
        max_series=kw.pop("max_series", 1), memory_budget_bytes=kw.pop("budget", 4 * GiB), **kw,
    )  # fmt: skip
    return Engine(settings, on_series_end=results.append).start(), results


def send(endpoint, messages) -> None:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    for m in messages:
        push.send_multipart(m)
    push.close(linger=5000)


def idle_engine(endpoint, **kw):
    """An engine that is fed decoded events directly (`Engine.process`), never started."""
    results = []
    settings = EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        max_series=None, memory_budget_bytes=kw.pop("budget", 4 * GiB), **kw,
    )  # fmt: skip
    return Engine(settings, on_series_end=results.append), results


# ----------------------------------------------------------------------------- lifecycle
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_restarted_sender_keeps_both_series(endpoint, sim, frames, protocol):
    """The sender dies after 40 frames of series 9 and starts over as series 10: the partial
    series ends as its own incomplete result, the new one is received in full (an incomplete
    series does not count against max_series=1), nothing replaces anything."""
    eng, results = live(endpoint, protocol)
    a, b = sim.series_info(9), sim.series_info(10)
    send(endpoint, [*start(protocol, a), *images(protocol, 9, 0, frames[:40]),
                    *start(protocol, b), *images(protocol, 10, 0, frames),
                    *end(protocol, 10, len(frames))])  # fmt: skip
    assert eng.join(timeout=30)
    assert [(r.info.series_id, r.frames_received, r.complete) for r in results] == [
        (10, 96, True), (9, 40, False)]  # fmt: skip
    full, partial = results
    assert_same_maps(full, offline(full.info, frames))
    assert_same_maps(partial, offline(partial.info, frames[:40]))
    assert (eng.tally.complete, eng.tally.incomplete, eng.tally.empty) == (1, 1, 0)
    assert eng.last_result is full  # an incomplete series never hides the complete one
    assert not eng.tally.refused and not eng.counters.rejected


def test_a_restart_under_the_same_series_id_is_a_new_series(endpoint, sim, frames):
    """A native sender restarted with the same series id (a fresh, not repeated, start after
    frames came): the first run ends incomplete; its frames are never mixed into the second."""
    eng, results = live(endpoint)
    info = sim.series_info(9)
    bright = frames[:40] + 7  # the first run saw another sample: must not leak into the second
    send(endpoint, [*start("native", info), *images("native", 9, 0, bright),
                    *start("native", info), *images("native", 9, 0, frames),
                    *end("native", 9, 96)])  # fmt: skip
    assert eng.join(timeout=30)
    assert [(r.frames_received, r.complete) for r in results] == [(40, False), (96, True)]
    assert_same_maps(results[0], offline(info, bright))
    assert_same_maps(results[1], offline(info, frames))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stray_start_costs_the_open_series_nothing(endpoint, sim, frames, protocol):
    """One foreign `start` (another series id, same geometry) in the middle of a series: the
    good series keeps every frame; the stray one ends empty (no frames: nothing to write)."""
    eng, results = live(endpoint, protocol)
    info = sim.series_info(9)
    send(endpoint, [*start(protocol, info), *images(protocol, 9, 0, frames[:48]),
                    *start(protocol, sim.series_info(77)), *images(protocol, 9, 48, frames[48:]),
                    *end(protocol, 9, 96)])  # fmt: skip
    assert eng.join(timeout=30)
    stray = [] if protocol == "dectris-v1" else [(77, 0)]  # V1: a series starts with an image
    assert [(r.info.series_id, r.frames_received) for r in results] == [(9, 96), *stray]
    assert results[0].complete and results[0].frames_missing == 0
    assert_same_maps(results[0], offline(results[0].info, frames))
    assert (eng.tally.complete, eng.tally.empty) == (1, len(stray))


def test_a_quiet_series_ends_while_another_receives(endpoint, sim, frames):
    """A series that gets nothing for `stale_series_s` while another does ends (incomplete)
    at once, not at the end of the session; beyond `max_open_series` the quietest ends."""
    import time

    eng, results = idle_engine(endpoint, stale_series_s=0.2, max_open_series=2)
    eng.process([SeriesStart(sim.series_info(1), False), FrameBatch(1, 0, frames[:10])])
    eng.process([SeriesStart(sim.series_info(2), False), FrameBatch(2, 0, frames[:5])])
    time.sleep(0.3)
    eng.process([FrameBatch(2, 5, frames[5:20])])  # series 1 has been quiet for 0.3 s
    assert [(r.info.series_id, r.frames_received, r.complete) for r in results] == [
        (1, 10, False)]  # fmt: skip
    eng.process([SeriesStart(sim.series_info(3), False), FrameBatch(3, 0, frames[:3]),
                 SeriesStart(sim.series_info(4), False)])  # fmt: skip
    assert [r.info.series_id for r in results] == [1, 2]  # 2 was quieter than 3
    eng.close_series()
    assert [(r.info.series_id, r.frames_received) for r in results[2:]] == [(3, 3), (4, 0)]
    assert_same_maps(results[1], offline(results[1].info, frames[:20]))


# ----------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("per_message", [1, 8])
@pytest.mark.parametrize("change", [{"detector_shape": (64, 64)}, {"dtype": "<f4"}])
def test_a_changed_start_under_the_same_id_is_refused(endpoint, sim, frames, per_message,
                                                      change):  # fmt: skip
    """A repeat `start` of series 9 claiming a 64x64 detector (or float pixels), followed by
    frames that match the claim: refused and counted; the series keeps its geometry, ingest
    goes on, no 64x64 frame reaches the 128x128 kernel, the result is exact."""
    eng, results = live(endpoint)
    info = sim.series_info(9)
    other = replace(info, **change)
    small = np.ones((8, *other.detector_shape), other.dtype)
    send(endpoint, [
        *start("native", info), *images("native", 9, 0, frames[:32], per_message),
        *start("native", other, repeat=True), *images("native", 9, 32, small, per_message),
        *images("native", 9, 32, frames[32:], per_message), *end("native", 9, 96),
    ])  # fmt: skip
    assert eng.join(timeout=30)
    assert len(results) == 1 and results[0].complete and results[0].frames_missing == 0
    assert results[0].info.detector_shape == (128, 128) and results[0].info.dtype == "<u2"
    assert_same_maps(results[0], offline(results[0].info, frames))
    rejected = eng.counters.rejected
    assert rejected["metadata_changed"] == 1
    n_small = -(-len(small) // per_message)  # the claimed frames' messages: all counted
    assert sum(rejected.values()) == 1 + n_small


def test_frames_of_another_geometry_never_reach_a_kernel(endpoint, sim, frames):
    """At the processor boundary: a batch whose frames are not the series' shape or dtype, or a
    compressed frame claiming another shape, is counted ('wrong_geometry') and skipped."""
    eng, results = idle_engine(endpoint)
    info = sim.series_info(9)
    eng.process([
        SeriesStart(info, False), FrameBatch(9, 0, frames[:40]),
        FrameBatch(9, 40, np.zeros((8, 64, 64), np.uint16)),
        FrameBatch(9, 40, frames[40:48].astype(np.float32)),
        FrameBatch(9, 40, frames[40:48].reshape(8, 256, 64)),
        CompressedFrame(9, 41, b"\0" * 64, 2, (64, 64), "<u2"),
        CompressedFrame(9, 42, b"\0" * 64, 4, (128, 128), "<u4"),
        FrameBatch(9, 40, frames[40:]), SeriesEnd(9, 96),
    ])  # fmt: skip
    assert eng.counters.rejected == {"wrong_geometry": 5}
    assert len(results) == 1 and results[0].complete
    assert_same_maps(results[0], offline(info, frames))


# ----------------------------------------------------------------------------- bad headers
def _bad_headers(protocol, sim) -> list[list]:
    """Foreign and malformed headers of each protocol, to put in the middle of a series."""
    info = sim.series_info(9)
    if protocol == "native":
        acme = msgpack.packb({"proto": "acme-daq", "v": 3, "kind": "start", "series": 9,
                              "shape": [64, 64], "dtype": "<f8"})  # fmt: skip
        bad = msgpack.packb({"proto": nat.PROTOCOL, "v": nat.VERSION, "kind": "start",
                             "series": 9, "repeat": True, "scan_shape": [-1, 0],
                             "detector_shape": [128, 128], "dtype": "<c16"})  # fmt: skip
        return [
            [acme, b""],
            [bad, b""],
            [b"\x93garbage", b""],
            *start(protocol, replace(info, series_id=99, detector_shape=(64, 64))),
        ]
    if protocol == "dectris-v1":
        foreign = v1.encode_header(replace(info, series_id=99, detector_shape=(64, 64)))
        return [
            *foreign,  # another series' whole header (never followed by its images)
            [b'{"htype":"dheader-1.0","series":9,"header_detail":"none"}'],
            [b'{"htype":"dheader-1.0","series":98,"header_detail":"basic"}', b"\xff not json"],
            [b'{"htype":"dheader-1.0","series":"x"}'],
        ]
    foreign = v2.encode_start(replace(info, series_id=99, detector_shape=(64, 64)))
    broken = v2._dumps({"type": "start", "series_id": 98, "image_size_x": -1})
    changed = v2.encode_start(replace(info, detector_shape=(64, 64)))  # same id, other shape
    return [foreign, [broken], changed, [b"\xd9\xd9\xf7\xff garbage"]]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_foreign_and_bad_headers_mid_series_cost_no_frame(endpoint, sim, frames, protocol):
    eng, results = live(endpoint, protocol)
    info = sim.series_info(9)
    send(endpoint, [*start(protocol, info), *images(protocol, 9, 0, frames[:50]),
                    *_bad_headers(protocol, sim), *images(protocol, 9, 50, frames[50:]),
                    *end(protocol, 9, 96)])  # fmt: skip
    assert eng.join(timeout=30)
    good = [r for r in results if r.info.series_id == 9]
    assert len(good) == 1 and good[0].complete and good[0].frames_missing == 0
    assert_same_maps(good[0], offline(good[0].info, frames))
    assert all(r.frames_received == 0 for r in results if r.info.series_id != 9)
    assert sum(eng.counters.rejected.values()) >= 3  # the bad ones, each counted


def _merlin_acquisition(frames, scan_shape, first_seq=1) -> list[bytes]:
    return [merlin.encode_header(len(frames), scan_shape),
            *(merlin.encode_frame(first_seq + k, f) for k, f in enumerate(frames))]  # fmt: skip


def test_merlin_bad_and_stray_headers_mid_acquisition_cost_no_frame(endpoint, sim, frames):
    """Merlin has no series ids: a header that does not parse is counted and changes nothing;
    one that parses but is followed by the open acquisition's next frame (not frame 1) is
    counted ('foreign_header') and ignored. A header followed by frame 1 is a new
    acquisition (an abort): the open one ends there."""
    dec = merlin.MerlinDecoder()
    eng, results = idle_engine(endpoint, protocol="merlin")
    head, *body = _merlin_acquisition(frames, sim.cfg.scan_shape)
    bad = merlin.mpx(b"HDR,\nFrames in Acquisition (Number):\tmany\nEnd\t\n")
    stream = [head, *body[:30], bad, merlin.encode_header(5, (1, 5)), *body[30:]]
    events = dec.decode([b"".join(stream)])
    assert sorted(e.reason for e in dec.drain_errors()) == ["bad_header", "foreign_header"]
    eng.process(events)
    assert len(results) == 1 and results[0].complete and results[0].frames_missing == 0
    assert_same_maps(results[0], offline(results[0].info, frames))
    # an abort: a header, then frame 1 of the new acquisition
    events = dec.decode([b"".join([*_merlin_acquisition(frames[:20], (8, 12))[:11],
                                   *_merlin_acquisition(frames, (8, 12))])])  # fmt: skip
    assert not dec.drain_errors()
    eng.process(events)
    assert [(r.frames_received, r.frames_missing) for r in results[1:]] == [(10, 10), (96, 0)]


def test_v1_every_garbage_part_is_counted(sim, frames):
    """115 garbage parts put anywhere in a V1 series (between header parts, between an
    image's parts, before the end): each is counted exactly once, and every image is still
    decoded, whatever the message boundaries."""
    rng = np.random.default_rng(3)
    info = sim.series_info(4)
    parts = [p for m in v1.encode_header(info) for p in m]
    for k, f in enumerate(frames[:20]):
        parts += v1.encode_image(4, k, f)
    parts += v1.encode_end(4)
    garbage = [b"\xff" + rng.bytes(int(n)) for n in rng.integers(0, 300, 115)]
    where = np.sort(rng.integers(0, len(parts) + 1, len(garbage)))
    for k in where[::-1]:
        parts.insert(int(k), garbage.pop())
    for grouping in ("one part per message", "one message"):
        dec = DectrisV1Decoder()
        messages = [[p] for p in parts] if grouping != "one message" else [parts]
        events, errors = [], []
        for m in messages:
            try:
                events += dec.decode(m)
            except DecodeError as err:  # a message with nothing usable raises its error
                errors.append(err)
            errors += dec.drain_errors()
        assert len(errors) == 115, (grouping, [e.reason for e in errors])
        got = [e for e in events if isinstance(e, FrameBatch)]
        assert [b.first for b in got] == list(range(20))
        np.testing.assert_array_equal(np.concatenate([b.frames for b in got]), frames[:20])
        assert events[-1] == SeriesEnd(4, 20)


# ----------------------------------------------------------------------------- memory budget
def test_budget_from_flag_environment_and_machine(monkeypatch):
    monkeypatch.delenv(budget.ENV_VAR, raising=False)
    ram = budget.machine_memory_bytes()
    assert ram and budget.memory_budget_bytes() == int(ram * budget.RAM_FRACTION)
    monkeypatch.setenv(budget.ENV_VAR, "3GiB")
    assert budget.memory_budget_bytes() == 3 * GiB
    assert budget.memory_budget_bytes(5 << 20) == 5 << 20  # the flag wins
    assert [budget.parse_bytes(t) for t in ("8G", "512MiB", "2e9", "1048576")] == [
        8_000_000_000, 512 << 20, 2_000_000_000, 1 << 20]  # fmt: skip
    for text in ("lots", "-1G", "12 parsecs", "1k"):
        with pytest.raises(budget.BudgetError):
            budget.parse_bytes(text)
    monkeypatch.setenv(budget.ENV_VAR, "lots")
    with pytest.raises(budget.BudgetError, match=budget.ENV_VAR):
        budget.memory_budget_bytes()


def test_the_estimate_bounds_what_a_series_allocates(sim, frames):
    """Each component of the estimate against the arrays a calibrated series really holds."""
    proc = SeriesProcessor(sim.series_info(9), ProcessingSettings())
    proc.add(FrameBatch(9, 0, frames))
    acc, saa = proc.acc, proc.pipeline.shift_and_add
    fp = budget.series_footprint(sim.cfg.scan_shape, (128, 128), 2, acc.state.stack.shape[1],
                                 saa.factor, n_tiles=acc.state.tiles.shape[1])  # fmt: skip
    assert fp.stack == acc.state.stack.nbytes
    assert acc.state.tiles.nbytes <= fp.tile_sums <= 2 * acc.state.tiles.nbytes
    assert saa.num.nbytes + saa.den.nbytes <= fp.shift_and_add
    s = acc.state
    maps = (s.totals, s.bf_sum, s.axial_sum, s.hits, s.seen, saa.deposited)
    assert sum(a.nbytes for a in maps) <= fp.position_maps
    assert 64 * frames[0].nbytes <= fp.frame_buffers  # the calibration frames held
    assert budget.series_bytes((8, 12), (128, 128), 2, acc.state.stack.shape[1], saa.factor,
                               n_tiles=acc.state.tiles.shape[1]) == fp.total  # fmt: skip
    # an unknown BF count leaves the stack out (a lower bound), never the per-position maps
    low = budget.series_footprint((8, 12), (128, 128), 2, None, saa.factor)
    assert low.stack == low.tile_sums == 0 and low.position_maps == fp.position_maps
    reason = budget.check_series((100_000, 100_000), None, 2, 8 * GiB)
    assert reason.startswith("a 100000x100000 scan needs") and "over the memory budget" in reason
    assert budget.check_series((256, 256), (256, 256), 2, 8 * GiB) is None


@pytest.mark.parametrize("claim", ["native scan 16384^2", "native detector 10^6 px",
                                   "dectris-v2 scan 65536^2"])  # fmt: skip
def test_impossible_claims_on_the_wire_are_refused_and_the_next_series_runs(
    endpoint, sim, frames, claim
):
    """A start claiming a scan or detector that cannot fit the budget: refused with a reason
    (nothing allocated), its frames counted and skipped; the next series is processed."""
    protocol = claim.split()[0]
    protocol = "native" if protocol == "native" else "dectris-v2"
    eng, results = live(endpoint, protocol)
    info = sim.series_info(9)
    if "detector" in claim:  # the frames are sent as the stream does, at 128x128
        msg = msgpack.unpackb(nat.encode_start(info)[0])
        msg["detector_shape"] = [10**6, 10**6]
        huge = [[msgpack.packb(msg), b""]]
    else:
        side = 16384 if protocol == "native" else 65536
        huge = start(protocol, replace(info, scan_shape=(side, side)))
    send(endpoint, [*huge, *images(protocol, 9, 0, frames[:16]), *end(protocol, 9, 16),
                    *start(protocol, sim.series_info(10)), *images(protocol, 10, 0, frames),
                    *end(protocol, 10, 96)])  # fmt: skip
    assert eng.join(timeout=30)
    assert [r.info.series_id for r in results] == [10]
    assert_same_maps(results[0], offline(results[0].info, frames))
    rejected = eng.counters.rejected
    if "detector" in claim:  # refused by the decoder: more pixels than any detector has
        assert rejected["oversized"] == 1 and not eng.tally.refused
    else:
        assert eng.tally.refused == {"over_budget": 1} and rejected["over_budget"] == 1
        assert rejected["series_refused"] == len(images(protocol, 9, 0, frames[:16]))


def test_merlin_scan_claim_beyond_the_budget_over_tcp(sim, frames):
    """Merlin ScanX = ScanY = 10^6: refused from the first frame on, counted; the detector's
    next acquisition on the same connection is received in full."""
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))
    payload = b"".join([*_merlin_acquisition(frames[:8], (10**6, 10**6)),
                        *_merlin_acquisition(frames, sim.cfg.scan_shape)])  # fmt: skip

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.sendall(payload)
            threading.Event().wait(1.0)

    t = threading.Thread(target=serve)
    t.start()
    eng = Engine(EngineSettings(
        subscriber=SubscriberSettings(endpoint=f"tcp://127.0.0.1:{port}"), protocol="merlin",
        idle_timeout_s=5.0, max_series=1, memory_budget_bytes=4 * GiB,
    )).start()  # fmt: skip
    assert eng.join(timeout=30)
    t.join()
    server.close()
    assert eng.tally.refused == {"over_budget": 1}
    assert eng.counters.rejected["series_refused"] == 8  # every frame of the refused one
    r = eng.last_result
    assert r.info.scan_shape == (8, 12) and r.complete and r.frames_missing == 0
    assert_same_maps(r, offline(r.info, frames))


def test_a_series_over_budget_once_calibrated_is_refused_then(endpoint, sim, frames):
    """The BF pixel count is only known at calibration: a series that fits before (its lower
    bound) but whose stack would not is refused then, before the stack is allocated; a
    smaller series afterwards runs."""
    info = sim.series_info(9)
    small = Simulator(tutorial_config(scan_shape=(2, 4), bad_pixels=4))
    f = budget.upsampling_bound(info)
    lower = budget.series_footprint((8, 12), (128, 128), 2, None, f).total
    allowed = lower + 50_000  # the stack alone (96 x ~2000 BF px x 2 B) is ~400 kB
    assert budget.series_footprint((2, 4), (128, 128), 2, 2500, f).total < allowed
    eng, results = idle_engine(endpoint, budget=allowed)
    eng.process([SeriesStart(info, False), FrameBatch(9, 0, frames[:70])])  # calibrates
    assert eng.tally.refused == {"over_budget": 1} and not results
    assert eng.counters.rejected["series_refused"] == 1  # the batch it calibrated on
    eng.process([FrameBatch(9, 70, frames[70:]), SeriesEnd(9, 96)])
    assert eng.counters.rejected["series_refused"] == 2 and not results
    sinfo = small.series_info(10)
    eng.process([SeriesStart(sinfo, False), FrameBatch(10, 0, small.frames(0, 8)),
                 SeriesEnd(10, 8)])  # fmt: skip
    assert len(results) == 1 and results[0].complete
    assert_same_maps(results[0], offline(sinfo, small.frames(0, 8)))


# ----------------------------------------------------------------------------- failures
def test_a_series_whose_processing_raises_is_refused_and_ingest_goes_on(
    endpoint, sim, frames, monkeypatch
):
    """Any exception while processing a series (here injected) refuses that series only:
    counted ('series_failed'), the frames in hand and its later ones counted and skipped;
    the ingest thread goes on and the next series is exact."""
    original = SeriesProcessor.add_many

    def failing(self, batches):
        if self.info.series_id == 9 and any(b.first >= 48 for b in batches):
            raise FloatingPointError("injected")
        return original(self, batches)

    monkeypatch.setattr(SeriesProcessor, "add_many", failing)
    batches = [FrameBatch(9, k, frames[k : k + 8]) for k in range(0, 96, 8)]
    eng, results = idle_engine(endpoint)
    eng.process([SeriesStart(sim.series_info(9), False), *batches[:6]])
    eng.process([batches[6]])  # raises inside
    assert eng.tally.refused == {"series_failed": 1}
    eng.process([*batches[7:], SeriesEnd(9, 96)])
    assert eng.counters.rejected == {"series_failed": 1, "series_refused": 6} and not results
    # on the ingest thread, over a socket
    where = f"tcp://127.0.0.1:{free_port()}"
    eng, results = live(where)
    send(where, [*start("native", sim.series_info(9)), *images("native", 9, 0, frames),
                 *end("native", 9, 96), *start("native", sim.series_info(10)),
                 *images("native", 10, 0, frames), *end("native", 10, 96)])  # fmt: skip
    assert eng.join(timeout=30)
    assert eng.tally.refused == {"series_failed": 1}
    # the frame messages that went to the kernel with the failing one, and all later ones
    assert 6 <= eng.counters.rejected["series_refused"] <= 12
    assert [r.info.series_id for r in results] == [10]
    assert_same_maps(results[0], offline(results[0].info, frames))


@pytest.mark.parametrize("bad", [np.inf, np.nan, -np.inf])
def test_non_finite_pixels_in_a_float_stream_never_stop_ingest(endpoint, sim, frames, bad):
    """One +inf / NaN pixel in a float stream's calibration frames: the ingest thread survives
    and the series after it is exact; the faulty series is either written with finite maps or
    refused with a reason, never lost silently."""
    eng, results = live(endpoint, max_series=2)
    info = replace(sim.series_info(9), dtype="<f4", mask_value=None)
    faulty = frames.astype(np.float32)
    faulty[3, 64, 64] = bad  # inside the BF disk, in the calibration frames
    good = replace(sim.series_info(10), dtype="<f4", mask_value=None)
    send(endpoint, [*start("native", info), *images("native", 9, 0, faulty),
                    *end("native", 9, 96), *start("native", good),
                    *images("native", 10, 0, frames.astype(np.float32)),
                    *end("native", 10, 96)])  # fmt: skip
    assert eng.join(timeout=30)
    by_id = {r.info.series_id: r for r in results}
    assert_same_maps(by_id[10], offline(good, frames.astype(np.float32)))
    if 9 in by_id:
        r = by_id[9]
        for name in ("incoherent_bf", "axial_bf", "total_counts"):
            assert np.isfinite(getattr(r, name)).all(), name
    else:
        assert sum(eng.tally.refused.values()) == 1


# ------------------------------------------------- stray starts never cost a receiving series
def engine_for(**kw):
    """An engine fed events directly (`Engine.process`), and the list its series end in."""
    results = []
    settings = EngineSettings(
        subscriber=SubscriberSettings(endpoint=f"tcp://127.0.0.1:{free_port()}",
                                      socket_type="pull", bind=True),
        align_interval_s=None, **kw)  # fmt: skip
    return Engine(settings, on_series_end=results.append), results


def test_stray_starts_never_evict_the_series_receiving(sim, frames):
    eng, results = engine_for(max_series=None)
    eng.process([SeriesStart(sim.series_info(9), False)]
                + [FrameBatch(9, i, frames[i : i + 8]) for i in range(0, 40, 8)])  # fmt: skip
    eng.process([SeriesStart(sim.series_info(s), False) for s in (20, 21, 22)])  # 3 strays
    eng.process([FrameBatch(9, i, frames[i : i + 8]) for i in range(40, 96, 8)]
                + [SeriesEnd(9, 96)])  # fmt: skip
    eng.close_series()
    done = {r.info.series_id: r for r in results}
    assert done[9].complete and done[9].frames_received == 96 and not done[9].frames_missing
    assert not eng.counters.rejected  # not one frame of series 9 lost


def test_a_frameless_start_takes_no_budget_from_a_series_receiving():
    sim = Simulator(tutorial_config(scan_shape=(64, 64)))
    frames = sim.frames(0, 128)
    total = 2 * GiB
    eng, results = engine_for(max_series=None, memory_budget_bytes=total)
    info = sim.series_info(9)
    eng.process([SeriesStart(info, False), FrameBatch(9, 0, frames[:32])])
    # a stray start whose scan claims nearly everything the good series leaves
    left = total - eng.table.reserved[9]
    side = 1400
    while budget.check_info(replace(info, scan_shape=(side + 10,) * 2, frames_expected=None),
                            left - 5_000_000, frame_limit=(side + 10) ** 2) is None:  # fmt: skip
        side += 10
    eng.process([SeriesStart(replace(info, series_id=20, scan_shape=(side, side),
                                     frames_expected=None), False)])  # fmt: skip
    eng.process([FrameBatch(9, 32, frames[32:128])])  # the good series calibrates now
    assert not eng.tally.refused and eng.table.open[9].acc is not None


def test_a_run_that_took_its_last_pass_opens_no_stub_of_the_next():
    sim = Simulator(tutorial_config(scan_shape=(8, 12)))
    frames = sim.frames(0, sim.n_frames)
    n = sim.n_frames
    eng, results = engine_for(processing=ProcessingSettings(repeat_scans="new-series"),
                              max_series=1)  # fmt: skip
    info = replace(sim.series_info(5), frames_expected=2 * n)
    eng.process([SeriesStart(info, False)]
                + [FrameBatch(5, i, frames[i : i + 8]) for i in range(0, n, 8)]
                + [FrameBatch(5, n + i, frames[i : i + 8]) for i in range(0, 16, 8)])  # fmt: skip
    eng.close_series()
    assert [(r.frames_received, r.complete) for r in results] == [(n, True)]


def test_no_live_update_runs_after_the_final_solve_it_waited_for(endpoint):
    """The series ended (its final solve ran) while a live update waited for the alignment
    lock: that update must not replace the final result with a live one."""

    class EndedSeries:
        solvable, rows = True, 0
        pipeline = SimpleNamespace(last=SimpleNamespace(final=True))

        def progress(self):
            self.rows += 1
            return self.rows, 0

        def inputs(self):
            return None

        def solve(self, inputs):
            solves.append(inputs)

    solves: list = []
    eng, _ = idle_engine(endpoint, align_interval_s=0.02)
    series = EndedSeries()
    eng._current = series
    aligner = threading.Thread(target=eng._align_loop, daemon=True)
    aligner.start()
    until = time.monotonic() + 10
    while series.rows < 3 and time.monotonic() < until:  # it woke up with new rows, 3 times
        time.sleep(0.01)
    assert series.rows >= 3 and not solves  # and solved none: the final result stands
    series.pipeline.last.final = False  # a live series: it aligns
    while not solves and time.monotonic() < until:
        time.sleep(0.01)
    eng.stop()
    aligner.join(2.0)
    eng.receiver.close()
    assert solves


def test_a_slow_alignment_update_waits_as_long_before_the_next(endpoint, caplog):
    """An update that takes longer than --align-interval is followed by as long a rest, so live
    alignment takes at most about half a core (docs/engine.md), and the log says so once."""

    class SlowSeries:  # what the alignment thread reads of the current series
        solvable, rows, pipeline = True, 0, None

        def progress(self):
            self.rows += 1  # a new row every time: every wake-up aligns
            return self.rows, 0

        def inputs(self):
            return None

        def solve(self, inputs):
            solves.append(time.monotonic())
            time.sleep(0.3)

    solves: list[float] = []
    eng, _ = idle_engine(endpoint, align_interval_s=0.05)
    eng._current = SlowSeries()
    aligner = threading.Thread(target=eng._align_loop, daemon=True)
    with caplog.at_level("INFO", logger="tcbf_live.stream.engine"):
        aligner.start()
        time.sleep(1.5)
        eng.stop()
        aligner.join(2.0)
    eng.receiver.close()
    gaps = np.diff(solves)  # without the rest: 0.35 s apart; with it: >= 0.6 s
    assert len(gaps) >= 1 and gaps.min() >= 0.55, gaps
    assert sum("the next waits as long" in r.message for r in caplog.records) == 1
