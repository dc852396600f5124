"""Several receiving processes (`run --workers N`, `tcbf-live worker`): the same result as one
process on the same stream, whichever worker gets a series' header, config or end; a worker
that dies or stalls never blocks the run, which says what is missing; a worker joining over
TCP (CURVE-authenticated) from another process."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from tcbf_live.detectors.base import FrameBatch, SeriesEnd
from tcbf_live.detectors.registry import protocol
from tcbf_live.detectors.routing import DETAIL, END, START
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream import shared_segments
from tcbf_live.stream.coordinator import Coordinator, WorkerPlan
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings
from tcbf_live.stream.worker_link import (
    LinkError,
    WorkerConfig,
    pack,
    settings_from_dict,
    settings_to_dict,
    unpack,
)
from tcbf_live.stream.worker_process import KEPT_BYTES
from tcbf_live.stream.worker_series import Copies, Ends, PendingEnd

SCAN = (16, 24)
PASSES = 2  # every test stream scans twice: repeat passes add up at the coordinator


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=SCAN, bad_pixels=4))


def messages(sim, name: str, series_id: int = 5) -> list[list]:
    """One series of PASSES passes in `name`'s wire format, 4 frames per batch."""
    wire = protocol(name)
    one = sim.frames(0, sim.n_frames)
    frames = np.concatenate([one] * PASSES)
    info = replace(sim.series_info(series_id), frames_expected=len(frames))
    out = list(wire.encoder.start(info))
    for i in range(0, len(frames), 4):
        out += wire.encoder.frames(series_id, i, frames[i : i + 4], i // 4 + 1,
                                   wire.encodings[0])  # fmt: skip
    return out + list(wire.encoder.end(series_id, len(frames)))


def receive(engine_of, name: str, stream: list, socket_type: str = "pull",
            pace_s: float = 0.0, during=None, idle_timeout_s: float = 20.0,
            max_series: int = 1, lane: bool = True):  # fmt: skip
    """Send `stream` from a bound PUSH/PUB socket into the engine `engine_of(settings)`."""
    ctx = zmq.Context()
    sender = ctx.socket(zmq.PUSH if socket_type == "pull" else zmq.PUB)
    sender.setsockopt(zmq.SNDHWM, 0)
    port = sender.bind_to_random_port("tcp://127.0.0.1")
    sub = SubscriberSettings(endpoint=f"tcp://127.0.0.1:{port}", socket_type=socket_type,
                             detector=protocol(name).detector)  # fmt: skip
    settings = EngineSettings(subscriber=sub, protocol=name, idle_timeout_s=idle_timeout_s,
                              max_series=max_series, align_interval_s=0.3,
                              compiled_lane=lane)  # fmt: skip
    eng = engine_of(settings).start()
    peers = getattr(getattr(eng, "receiver", None), "peers", None)  # (workers: the run's)
    until = time.monotonic() + 30
    while peers and not all(p.cpu_s for p in peers.values()) and time.monotonic() < until:
        time.sleep(0.05)  # each worker's run loop has beaten: its detector socket is open
    time.sleep(1.0)  # every worker's detector socket connected (PUSH shares among them; a
    # PUB drops what a late subscriber misses: on a loaded machine a worker could start late)
    for k, m in enumerate(stream):
        sender.send_multipart(m)
        if pace_s:
            time.sleep(pace_s)
        if during is not None:
            during(eng, k)
    assert eng.join(timeout=60)
    sender.close(linger=0)
    ctx.term()
    return eng


def workers(n: int, **kw):
    return lambda s: Coordinator(s, WorkerPlan(local=n, **kw))


def assert_same(a, b) -> None:
    """Counts, maps, shifts, aberrations and image identical."""
    assert (a.frames_received, a.duplicates, a.complete) == (b.frames_received, b.duplicates,
                                                             b.complete)  # fmt: skip
    for name in ("total_counts", "incoherent_bf", "axial_bf", "hits"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.tcbf.shifts_px, b.tcbf.shifts_px)
    np.testing.assert_array_equal(a.tcbf.image, b.tcbf.image)
    assert repr(a.tcbf.aberrations) == repr(b.tcbf.aberrations)


@pytest.mark.parametrize("name", ["native", "dectris-v1", "dectris-v2"])
def test_one_and_two_workers_give_what_one_process_gives(sim, name):
    """With two workers on a PUSH stream each control message (V1: dheader and its config
    part, sent as two messages; the end) reaches one worker only: the coordinator relays it."""
    stream = messages(sim, name)
    one = receive(Engine, name, stream).last_result
    assert one.frames_received == PASSES * sim.n_frames
    for n in (1, 2):
        eng = receive(workers(n), name, stream)
        assert_same(eng.last_result, one)
        assert not eng.lost and not eng.counters.rejected
        folded = [p.frames for p in eng.receiver.peers.values()]
        assert sum(folded) == PASSES * sim.n_frames and all(folded), folded
        read = [seg.bytes_read for seg in eng.receiver.segments.values()]  # (local workers)
        shared = shared_segments.free_bytes() >= 4 * n * KEPT_BYTES  # (else over the link)
        assert len(read) == (n if shared else 0) and all(read), read  # deltas read in place


@pytest.mark.parametrize("name", ["native", "dectris-v2"])
def test_workers_whose_row_blocks_fill_between_deltas_give_what_one_process_gives(sim, name):
    """Row blocks of 48 rows (`RowBlock`; a scan of 384 positions) and deltas every 10 s:
    each worker's block fills again and again, a delta is taken whenever it is full and
    nothing is received meanwhile. The first 150 messages are paced (the series calibrates
    while they arrive), the rest come at once: native's 4-frame batches are cut to the rows
    free; V2's compiled lane reads no more messages than there are rows free."""

    def burst(eng, k):
        if k < 150:
            time.sleep(0.002)

    stream = messages(sim, name)
    one = receive(Engine, name, stream).last_result
    eng = receive(workers(2, row_block_rows=48, sync_interval_s=10.0), name, stream,
                  during=burst)  # fmt: skip
    assert_same(eng.last_result, one)
    assert not eng.lost and not eng.counters.rejected
    peers = eng.receiver.peers.values()
    assert all(p.row_waits[0] >= 2 for p in peers)  # each block was full several times
    assert name != "dectris-v2" or all(p.lane > 100 for p in peers)


def test_frames_that_find_no_rows_while_the_coordinator_takes_no_deltas_are_counted(
    sim, monkeypatch
):
    """A worker whose link has no room (no coordinator) cannot free its rows: it waits a
    bounded time for the link (`ROOM_WAIT_S`, here 1 s), then counts the frames that did not
    fit as lost."""
    from tcbf_live.stream import worker
    from tcbf_live.stream.series import SeriesProcessor
    from tcbf_live.stream.worker import Worker
    from tcbf_live.stream.worker_link import WorkerConfig, settings_to_dict

    proc = SeriesProcessor(sim.series_info(5), ProcessingSettings())
    proc.add(FrameBatch(5, 0, sim.frames(0, 64)))
    ctx = zmq.Context()
    link = ctx.socket(zmq.DEALER)
    link.setsockopt(zmq.IMMEDIATE, 1)  # no peer, no room: sends are not queued
    link.connect(f"tcp://127.0.0.1:{_free_port()}")
    data = SubscriberSettings(endpoint=f"tcp://127.0.0.1:{_free_port()}", socket_type="pull")
    config = WorkerConfig(0, "native", data.endpoint, "pull", 1000, 1 << 20, None, None, 0.5,
                          1 << 20, settings_to_dict(ProcessingSettings()),
                          row_block_rows=4)  # fmt: skip
    w = Worker(link, config, data)
    monkeypatch.setattr(worker, "ROOM_WAIT_S", 1.0)
    try:
        w.on_start(sim.series_info(5), repeat=False)
        w.calibrated(5, 1, proc.raw_calibration)
        t0 = time.monotonic()
        w.fold([FrameBatch(5, 0, sim.frames(0, 10))])
        assert 0.9 < time.monotonic() - t0 < 5.0  # waited for the link, boundedly
        assert w.series[5].proc.acc.rows.used == 4 and w.series[5].proc.acc.frames_accepted == 4
        assert w.counters.rejected == {"no_room": 6} and w.row_waits[0] == 1
    finally:
        w.sock.close(linger=0)
        link.close(linger=0)
        ctx.term()


def test_a_series_end_reads_what_is_queued_even_with_a_full_row_block(sim):
    """The end of a series makes a worker read what is still queued (sent before the end).
    With its row block full, the compiled lane reads nothing: the worker takes a delta first
    (the drain stopped at once and the queued frames were lost)."""
    from tcbf_live.stream.series import SeriesProcessor
    from tcbf_live.stream.worker import Worker
    from tcbf_live.stream.worker_link import WorkerConfig, settings_to_dict

    wire = protocol("dectris-v2")
    info = sim.series_info(5)
    proc = SeriesProcessor(info, ProcessingSettings())
    proc.add(FrameBatch(5, 0, sim.frames(0, 64)))
    ctx = zmq.Context()
    coordinator, detector = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUSH)
    link = ctx.socket(zmq.DEALER)
    link.connect(f"tcp://127.0.0.1:{coordinator.bind_to_random_port('tcp://127.0.0.1')}")
    data = SubscriberSettings(endpoint=f"tcp://127.0.0.1:{detector.bind_to_random_port('tcp://127.0.0.1')}",
                              socket_type="pull")  # fmt: skip
    config = WorkerConfig(0, "dectris-v2", data.endpoint, "pull", 1000, 1 << 20, None, None, 60.0,
                          1 << 20, settings_to_dict(ProcessingSettings()),
                          row_block_rows=8)  # fmt: skip
    w = Worker(link, config, data)
    try:
        (start,) = wire.encoder.start(info)
        w.fold(w.decode(start, from_detector=False))  # as the coordinator relays it
        w.calibrated(5, 1, proc.raw_calibration)
        images = [wire.encoder.frames(5, i, sim.frames(i, 1), i + 1, "bslz4") for i in range(13)]
        detector.send_multipart(images[0][0])  # read by the decoder, which learns the layout
        for _ in range(50):
            if w.sock.poll(100) and w.on_data():
                break
        for m in images[1:]:
            detector.send_multipart(m[0])
        for _ in range(50):  # the lane reads 7 of the 12 (the rows free), 5 stay queued
            if w.series[5].proc.acc.rows.free == 0:
                break
            w.sock.poll(100)
            w.on_data()
        assert w.counters.lane == 7 and w.series[5].proc.acc.rows.free == 0
        assert w.counters.frames == 0  # no delta yet
        # the relayed end comes at least the coordinator's settle window after the detector's
        # end, which followed these frames: they are queued here by then (on a loaded CI
        # machine the last five had once not arrived yet when the end was folded)
        assert w.sock.poll(5000)
        time.sleep(0.3)
        w.fold(w.decode(wire.encoder.end(5, 13)[0], from_detector=False))  # the relayed end
        assert w.counters.frames == 13 and 5 not in w.series
    finally:
        w.sock.close(linger=0)
        ctx.destroy(linger=0)


def with_faults(name: str, stream: list) -> list:
    """`stream` with messages the compiled lane must hand to the decoder: a damaged blob, a
    message with one part too many, a stray control message (V1 also: a zeroed bslz4 header,
    which the decoder restores)."""
    first = next(k for k, m in enumerate(stream) if protocol(name).rank(m) is None)
    if name == "dectris-v1":
        image = list(stream[first + 100])
        image[2] = bytes(image[2][:40]) + bytes(24) + bytes(image[2][64:])  # damaged blocks
        stream[first + 100] = image
        image = list(stream[first + 120])
        stream[first + 120] = [*image[:2], bytes(12) + bytes(image[2][12:]), image[3]]
        extra = b'{"htype": "dimage_appendix"}'
    else:
        message = bytes(stream[first + 100][0])
        at = len(message) // 2  # inside the blob, which is most of the message
        stream[first + 100] = [message[:at] + b"\xff" * 8 + message[at + 8 :]]
        extra = b"\xa0"
    stream[first + 130] = [*stream[first + 130], extra]  # one part too many
    stream[first + 140 : first + 140] = list(protocol(name).encoder.end(77, 0))  # stray
    return stream


@pytest.mark.parametrize("name", ["dectris-v1", "dectris-v2"])
def test_the_compiled_lane_gives_what_the_decoder_gives(sim, name):
    """Images read by the compiled lane (`stream.fast_lane`), in one process and in a worker:
    the same result as the decoder alone, with the messages the lane cannot take
    (`with_faults`) handed to the decoder and counted as it counts them."""
    stream = with_faults(name, messages(sim, name))
    one = receive(Engine, name, stream, lane=False)  # the decoder only
    assert one.counters.lane == 0 and one.counters.rejected
    for engine_of in (Engine, workers(1)):  # the lane in one process, in a worker
        for lane in (False, True):
            eng = receive(engine_of, name, stream, pace_s=0.0005, lane=lane)
            assert_same(eng.last_result, one.last_result)
            assert eng.counters.rejected == one.counters.rejected
            read = (eng.counters.lane if engine_of is Engine
                    else sum(p.lane for p in eng.receiver.peers.values()))  # fmt: skip
            assert read > len(stream) // 2 if lane else read == 0, read


def test_a_pub_stream_is_shared_by_frame_index(sim):
    stream = messages(sim, "native")
    one = receive(Engine, "native", stream, "sub", pace_s=0.0005).last_result
    eng = receive(workers(2), "native", stream, "sub", pace_s=0.0005)
    assert_same(eng.last_result, one)
    folded = sorted(p.frames for p in eng.receiver.peers.values())
    assert folded == [PASSES * sim.n_frames // 2] * 2  # each keeps every other batch
    assert not eng.lost, eng.lost  # (each worker's "ended" counted, also before the relay)


def test_an_answer_before_its_end_is_pending_is_kept_for_it():
    """PUB: a worker decodes its own copy of the end and answers before the coordinator's
    window has settled; the answer counts once the end is pending (else the end waited its
    whole wait and named the worker as having lost frames). Bounded."""
    ends = Ends()
    ends.answer((4, 1), b"w0", "ended")
    ends.answer((4, 1), b"w1", "ending")
    ends.answer((4, 2), b"w1", "ended")  # (another run of the id)
    end = PendingEnd(SeriesEnd(4, None), {b"w0", b"w1"}, 0.0, 1)
    ends.open(end)
    assert end.waiting == {b"w1"} and end.offered == {b"w0", b"w1"}
    ends.answer((4, 1), b"w1", "ended")
    assert not end.waiting and list(ends.early) == [(4, 2)]
    for sid in range(100):
        ends.answer((sid, 9), b"w0", "ended")
    assert len(ends.early) == Ends.EARLY_KEPT


def test_a_worker_killed_mid_series_never_blocks_the_run(sim):
    stream = messages(sim, "dectris-v2")
    n_total = PASSES * sim.n_frames

    def kill(eng, k):
        if k == len(stream) // 2:
            eng.receiver.processes[b"w1"].kill()

    t0 = time.monotonic()
    eng = receive(
        workers(2, end_wait_s=3.0),
        "dectris-v2",
        stream,
        pace_s=0.0003,
        during=kill,
        idle_timeout_s=4.0,
    )
    r = eng.last_result
    assert time.monotonic() - t0 < 30
    assert r is not None and r.frames_received < n_total
    assert r.frames_received > n_total // 2  # worker 0's share and worker 1's sent deltas
    assert any("worker 1" in line and "died" in line for line in eng.lost)
    assert eng.tally.incomplete == 1 or r.frames_missing


def test_a_stalled_worker_is_not_waited_for(sim):
    stream = messages(sim, "dectris-v1")
    stopped = []

    def stop(eng, k):
        if k == len(stream) // 2:
            pid = eng.receiver.processes[b"w0"].pid
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    try:
        eng = receive(workers(2, end_wait_s=2.0, worker_timeout_s=1.0), "dectris-v1", stream,
                      pace_s=0.0003, during=stop, idle_timeout_s=4.0)  # fmt: skip
    finally:
        for pid in stopped:  # killed at the run's end if it never answered
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    r = eng.last_result
    assert r is not None and 0 < r.frames_received < PASSES * sim.n_frames
    assert any("stalled" in line or "without the last frames" in line for line in eng.lost)


def test_a_worker_on_another_host_joins_over_curve(sim, tmp_path):
    """`tcbf-live worker` in its own process joins a run's worker link over TCP, CURVE
    authenticated (as beyond loopback), and gives the one-process result."""
    import zmq.auth

    from tcbf_live.stream.transport import CurveKeys

    zmq.auth.create_certificates(tmp_path, "run")
    zmq.auth.create_certificates(tmp_path, "worker")
    keys = CurveKeys.load(str(tmp_path / "run.key_secret"))
    stream = messages(sim, "dectris-v2")
    one = receive(Engine, "dectris-v2", stream).last_result
    link = f"tcp://127.0.0.1:{_free_port()}"
    procs = []

    def coordinator(settings):
        eng = Coordinator(settings, WorkerPlan(local=0, remote=1, link=link, curve=keys))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tcbf_live", "worker", "--coordinator", link,
             "--curve-secret", str(tmp_path / "worker.key_secret"),
             "--curve-server-key", str(tmp_path / "run.key")],
            cwd=tmp_path, stderr=subprocess.PIPE, text=True))  # fmt: skip
        return eng

    eng = receive(coordinator, "dectris-v2", stream)
    assert procs[0].wait(timeout=20) == 0, procs[0].stderr.read()
    assert_same(eng.last_result, one)
    assert len(eng.receiver.peers) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_control_messages_are_told_from_frames_without_decoding(sim):
    for name in ("native", "dectris-v1", "dectris-v2"):
        wire = protocol(name)
        info = sim.series_info(3)
        ranks = [wire.rank(m) for m in wire.encoder.start(info)]
        assert ranks[0] == START and all(r == DETAIL for r in ranks[1:]), (name, ranks)
        frames = wire.encoder.frames(3, 0, sim.frames(0, 2), 1, wire.encodings[0])
        assert all(wire.rank(m) is None for m in frames), name
        assert [wire.rank(m) for m in wire.encoder.end(3, 2)] == [END], name
        if name == "dectris-v1":  # an image with the appendix a detector may add: a frame
            assert all(wire.rank([*m, b'{"user": 1}']) is None for m in frames)
    assert protocol("merlin").rank is None  # a byte stream has one reader


def test_a_steady_flow_of_control_messages_is_still_relayed(monkeypatch):
    """The control window settles after SETTLE_S without one, and also when its oldest has
    waited WINDOW_MAX_S or WINDOW_MAX wait: a sender whose every message ranks as control
    (or a foreign one) cannot hold every start and end back and grow the window for ever."""
    from tcbf_live.stream import worker_pool

    link = f"tcp://127.0.0.1:{_free_port()}"
    sub = SubscriberSettings(endpoint=f"tcp://127.0.0.1:{_free_port()}", socket_type="pull")
    pool = Coordinator(EngineSettings(subscriber=sub, protocol="native"),
                       WorkerPlan(local=0, remote=1, link=link)).receiver  # fmt: skip
    relayed = []
    monkeypatch.setattr(pool, "tell_all", relayed.append)
    try:
        t0 = 100.0
        for k in range(40):  # one every 5 ms: never 10 ms quiet
            now = t0 + 0.005 * k
            pool.window.append((k, now, [zmq.Frame(b"x")], True, False))
            pool.last_ctl = now
            pool.settled(now)
        assert relayed and len(pool.window) < 21, len(pool.window)
        for k in range(worker_pool.WINDOW_MAX):  # all at once
            pool.window.append((k, t0 + 1.0, [zmq.Frame(b"x")], True, False))
        pool.last_ctl = t0 + 1.0
        pool.settled(t0 + 1.0)
        assert not pool.window
    finally:
        pool.close()


def test_link_messages_are_checked_before_use():
    parts = pack("delta", {"sid": 1}, {"rows": np.arange(3, dtype=np.int64)})
    kind, head, arrays, raw = unpack(parts)
    assert kind == "delta" and head == {"sid": 1} and list(arrays["rows"]) == [0, 1, 2]
    bad = [
        [b"\xc1"],  # not msgpack
        [pack("x")[0][:-2]],  # truncated
        [parts[0], b"\x00" * 23],  # 23 bytes for 3 int64
        pack("delta", {}, {"a": np.zeros(2, np.complex64)}),  # dtype not allowed
        [parts[0]],  # a described array missing
    ]
    for b in bad:
        with pytest.raises(LinkError):
            unpack(b)
    with pytest.raises(LinkError):
        WorkerConfig.from_json('{"index": 0}')


def test_processing_settings_travel_to_workers_unchanged():
    mask = np.zeros((8, 8), bool)
    mask[2, 3] = True
    p = ProcessingSettings(metadata={"scan_shape": (4, 5), "step_A": 2.0}, mask=mask,
                           calibration_frames=16, bins=(8, 4), axial_radius_px=3.0)  # fmt: skip
    q = settings_from_dict(settings_to_dict(p), None)
    assert q.metadata == p.metadata and q.bins == p.bins and q.calibration_frames == 16
    np.testing.assert_array_equal(q.mask, mask)
    assert q.axial_radius_px == 3.0 and q.repeat_scans == p.repeat_scans


@pytest.mark.parametrize("argv", [
    ["--workers", "2", "--bind", "tcp://127.0.0.1:5999"],
    ["--workers", "many"],
    ["--workers", "2", "--protocol", "merlin", "--connect", "tcp://127.0.0.1:6342"],
    ["--workers", "2", "--repeat", "new-series"],
    ["--workers", "1", "--worker-link", "tcp://0.0.0.0:7000"],
])  # fmt: skip
def test_run_refuses_workers_it_cannot_use(argv, expect_usage_error, tmp_path):
    expect_usage_error(["run", "--headless", "--output", str(tmp_path / "r.h5"), *argv])


def test_worker_command_refuses_an_unauthenticated_remote_coordinator(expect_usage_error):
    expect_usage_error(["worker", "--coordinator", "tcp://10.1.2.3:7000"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise: Linux")
def test_a_worker_gives_back_the_memory_of_what_it_sent():
    """After a delta a worker's state is all zeros: its pages go back to the OS and read as
    zeros again, so a worker holds about the frames since its last delta."""
    from tcbf_live.stream.pages import release

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    a = np.zeros((4096, 8192), np.uint16)  # 64 MiB
    a[:] = 3
    before = rss_mb()
    a[:] = 0
    assert release(a) > 63 * 2**20
    assert rss_mb() < before - 60 and not a.any()
    a[7, 7] = 1
    assert a.sum() == 1


def ended(engine_of, results):
    """`engine_of` with every finished series collected in `results`."""
    return lambda s: engine_of(s, on_series_end=results.append)


def test_series_back_to_back_end_as_in_one_process(sim):
    """Each end reaches the engine before the next start, as in one process, with the
    series sent back to back at full speed."""
    ids = (5, 6, 7)
    stream = [m for sid in ids for m in messages(sim, "native", sid)]
    summary = []
    for engine_of in (Engine, lambda s, **kw: Coordinator(s, WorkerPlan(local=2), **kw)):
        results = []
        receive(ended(engine_of, results), "native", stream, max_series=len(ids),
                idle_timeout_s=5.0)  # fmt: skip
        summary.append([(r.info.series_id, r.frames_received, r.complete) for r in results])
    assert summary[1] == summary[0] == [(i, PASSES * sim.n_frames, True) for i in ids]


def test_a_series_without_frames_does_not_hold_up_the_next(sim):
    """The empty series' end is due at once: it never waits out `end_wait_s` (20 s here, so a
    wait stands far above the run's own start-up and processing time)."""
    wire = protocol("dectris-v2")
    empty = [*wire.encoder.start(sim.series_info(9)), *wire.encoder.end(9, 0)]
    results, ended_at, sent_at = [], {}, []

    def on_end(result):
        ended_at[result.info.series_id] = time.monotonic()
        results.append(result)

    def first_sent(eng, k):
        if k == 0:
            sent_at.append(time.monotonic())

    plan = WorkerPlan(local=2, end_wait_s=20.0)
    eng = receive(lambda s: Coordinator(s, plan, on_series_end=on_end), "dectris-v2",
                  empty + messages(sim, "dectris-v2"), max_series=2, idle_timeout_s=5.0,
                  during=first_sent)  # fmt: skip
    assert [(r.info.series_id, r.frames_received) for r in results][-1] == (
        5, PASSES * sim.n_frames)  # fmt: skip
    assert not eng.lost
    assert ended_at[9] - sent_at[0] < 8.0, ended_at


HOSTILE_ARRAYS = [  # array descriptions that numpy, not the link's checks, used to refuse
    [msgpack.packb({"t": "beat", "arrays": [["x", ["<f8"], [1]]]}), b"\0" * 8],  # (unhashable)
    [msgpack.packb({"t": "beat", "arrays": [["x", "<f8", [1] * 65]]}), b"\0" * 8],
    [msgpack.packb({"t": "beat", "arrays": [["x", "<f8", [0, 2**62]]]}), b""],
]


@pytest.mark.parametrize("message", HOSTILE_ARRAYS)
def test_a_link_message_numpy_cannot_read_is_a_link_error(message):
    """Only LinkError leaves `unpack` (the coordinator counts it and goes on; anything else
    had ended the run's ingest)."""
    with pytest.raises(LinkError):
        unpack(message)


def test_hostile_link_messages_are_counted_and_the_coordinator_goes_on(sim):
    """A joined peer that sends nonsense: every message counted, none stops ingest."""
    from tcbf_live.stream.worker_link import LINK_VERSION

    link = f"tcp://127.0.0.1:{_free_port()}"
    settings = EngineSettings(subscriber=SubscriberSettings(endpoint=link.replace(
        link.rsplit(":", 1)[1], str(_free_port())), socket_type="pull"), protocol="dectris-v2",
        idle_timeout_s=30.0)  # fmt: skip
    eng = Coordinator(settings, WorkerPlan(local=0, remote=1, link=link)).start()
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.connect(link)
    peer.send_multipart(pack("hello", {"version": LINK_VERSION}))
    assert peer.poll(10000) and unpack(peer.recv_multipart())[0] == "welcome"
    stats = np.zeros(5)  # float64: not a delta's int64
    hostile = [
        [b"\xc1"], pack("cal", {}), pack("beat", {"messages": "x"}),
        pack("ctl", {"ts": "abc"}, raw=[b"x"]), pack("ended", {"sid": []}),
        [msgpack.packb({"t": "delta", "arrays": [[["a"], "<i8", [1]]]}), b"\0" * 8],
        pack("delta", {"sid": 1}, {"rows": np.zeros(1, np.int64),
                                   "seen": np.zeros(1, np.int64), "stats": stats}),
        pack("cal", {"sid": 1, "first": 0}, {"frames": np.zeros((2, 3), np.uint16)}),
        *HOSTILE_ARRAYS,
    ]  # fmt: skip
    for m in hostile:
        peer.send_multipart(m)
    deadline = time.monotonic() + 10
    while eng.counters.rejected["bad_link_message"] < 9 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eng._thread.is_alive(), "the ingest thread died"
    assert eng.counters.rejected["bad_link_message"] >= 9, eng.counters.rejected
    stranger = ctx.socket(zmq.DEALER)  # a worker of an earlier run on this link: told to stop
    stranger.connect(link)
    stranger.send_multipart(pack("beat", {"sent": 0}))
    assert stranger.poll(10000) and unpack(stranger.recv_multipart())[0] == "stop"
    stranger.close(linger=0)
    eng.stop()
    assert eng.join(timeout=20)
    peer.close(linger=0)
    ctx.term()


def test_the_runs_delta_credit_is_shared_among_its_workers():
    """Each worker's credit is its share of the run's (`WorkerPlan.delta_credit_bytes`), so
    the deltas waiting at the coordinator stay within it (plus a share) however many workers
    join, planned or not; capped at DELTA_CREDIT_BYTES, never zero (one delta at a time)."""
    from tcbf_live.stream.worker_link import (
        DELTA_CREDIT_BYTES,
        LINK_VERSION,
        WorkerConfig,
        credit_share,
    )

    assert credit_share(256 << 20, 16) == 16 << 20
    assert credit_share(256 << 20, 1) == DELTA_CREDIT_BYTES
    assert credit_share(1, 2) == 1
    shares = [credit_share(256 << 20, 2, n) for n in range(40)]  # 38 join beyond the plan
    assert shares[:4] == [128 << 20, 128 << 20, 64 << 20, 32 << 20]
    assert sum(shares) <= (256 << 20) + (128 << 20) + len(shares) and min(shares) == 1
    link = f"tcp://127.0.0.1:{_free_port()}"
    settings = EngineSettings(subscriber=SubscriberSettings(endpoint=link.replace(
        link.rsplit(":", 1)[1], str(_free_port())), socket_type="pull"), protocol="dectris-v2",
        idle_timeout_s=30.0)  # fmt: skip
    plan = WorkerPlan(local=0, remote=4, link=link, delta_credit_bytes=64 << 20)
    eng = Coordinator(settings, plan).start()
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    try:
        peer.connect(link)
        peer.send_multipart(pack("hello", {"version": LINK_VERSION}))
        assert peer.poll(10000)
        kind, head, _, _ = unpack(peer.recv_multipart())
        assert kind == "welcome"
        assert WorkerConfig.from_json(head["config"]).delta_credit_bytes == 16 << 20
    finally:
        eng.stop()
        assert eng.join(timeout=20)
        peer.close(linger=0)
        ctx.term()


@pytest.mark.parametrize(
    ("cores", "socket_type", "expect"),
    [(2, "pull", 0), (4, "pull", 4), (16, "pull", 16), (16, "sub", 0)],
)
def test_auto_uses_workers_only_where_they_beat_one_process(monkeypatch, cores, socket_type,
                                                            expect):  # fmt: skip
    """On 2 cores one process (with the V1 compiled lane) out-receives workers (docs/engine.md):
    `--workers auto` starts them from 4 cores on, for a stream that can be shared."""
    import argparse

    from tcbf_live.stream.cli.workers import worker_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    args = argparse.Namespace(workers="auto", record=None, repeat="accumulate",
                              compensate_descan=False)  # fmt: skip
    sub = SubscriberSettings(endpoint="tcp://127.0.0.1:9999", socket_type=socket_type)
    settings = EngineSettings(subscriber=sub, protocol="dectris-v1")
    assert worker_count(args, settings) == expect
    args.compensate_descan = True  # descan compensation receives in one process
    assert worker_count(args, settings) == 0


def test_a_header_is_relayed_whole(sim):
    """A V1 dheader whose config part is still on its way (it reached another worker, which
    forwarded it later) is not relayed alone: a worker would decode a frame between the two
    parts, take it for the config and never start the series (seen with two workers on a busy
    2-core machine). After HEADER_WAIT_S it goes anyway."""
    from tcbf_live.detectors.registry import DecoderOptions
    from tcbf_live.stream import worker_pool

    head = list(protocol("dectris-v1").encoder.start(sim.series_info(5)))
    assert [len(m) for m in head[:2]] == [1, len(head[1])] and len(head) == 2
    for waited_s, expect in ((0.5, [[1, len(head[1])]]), (worker_pool.HEADER_WAIT_S + 0.1,
                                                          [[1], [len(head[1])]])):  # fmt: skip
        pool = worker_pool.WorkerPool.__new__(worker_pool.WorkerPool)
        pool.decoder = protocol("dectris-v1").decoder(DecoderOptions())
        pool.unrelayed, pool.unrelayed_since, sent = [], 0.0, []
        pool.tell_all = lambda parts, sent=sent: sent.append(unpack(parts)[1]["sizes"])
        for k, message in enumerate(head):
            pool.decoder.decode(message)
            pool.unrelayed.append(message)
            pool.relay(waited_s if k == 0 else waited_s + 0.01)
        assert sent == expect


def test_a_calibration_before_its_series_start_is_kept_for_it(sim):
    """The coordinator calibrates on another worker's frames while this worker's first image
    of the series is still on its way: the calibration arrives before the start here. It was
    dropped, and the worker then held every frame of the series until the end (a third of a
    65,536-frame V1 series missing in 1 of 5 two-worker runs on 2 cores). It is kept and
    applied at the start of the run it belongs to, and only to that run."""
    from tcbf_live.stream.series import SeriesProcessor
    from tcbf_live.stream.worker import Worker
    from tcbf_live.stream.worker_link import WorkerConfig, settings_to_dict

    proc = SeriesProcessor(sim.series_info(5), ProcessingSettings())
    proc.add(FrameBatch(5, 0, sim.frames(0, 64)))
    cal = proc.raw_calibration
    ctx = zmq.Context()
    link = ctx.socket(zmq.DEALER)
    link.connect(f"tcp://127.0.0.1:{_free_port()}")
    data = SubscriberSettings(endpoint=f"tcp://127.0.0.1:{_free_port()}", socket_type="pull")
    config = WorkerConfig(0, "native", data.endpoint, "pull", 1000, 1 << 20, None, None, 0.5,
                          1 << 20, settings_to_dict(ProcessingSettings()))  # fmt: skip
    w = Worker(link, config, data)
    try:
        w.calibrated(5, 1, cal)  # before series 5 started here
        w.on_start(sim.series_info(5), repeat=False)
        assert w.series[5].proc is not None  # calibrated: its frames accumulate
        w.calibrated(6, 1, cal)
        w.on_start(sim.series_info(7), repeat=False)  # another series: not for it
        assert w.series[7].proc is None and w.early_cal is None
        w.drop(5, "ended")
        w.calibrated(5, 1, cal)  # run 1's, late; run 2 starts next: not for it
        w.on_start(sim.series_info(5), repeat=False)
        assert w.series[5].gen == 2 and w.series[5].proc is None
        w.calibrated(5, 3, cal)  # run 3's, while run 2 is still open here: kept for run 3
        assert w.series[5].proc is None
        w.on_start(sim.series_info(5), repeat=False)
        assert w.series[5].gen == 3 and w.series[5].proc is not None
    finally:
        w.sock.close(linger=0)
        link.close(linger=0)
        ctx.term()


def test_the_coordinator_takes_the_prepared_memory_with_the_one_process_result(sim, caplog):
    """Memory prepared before the coordinator starts (as `run` does,
    `test_run_prepares_the_coordinators_memory_before_it_starts`) is taken by its series:
    the workers' deltas are merged into it, and the result is one process's."""
    import logging

    from tcbf_live.stream import memory_reserve

    stream = messages(sim, "dectris-v2")
    one = receive(Engine, "dectris-v2", stream).last_result
    info = sim.series_info(5)
    flags = {"scan_shape": info.scan_shape, "semiangle_mrad": info.semiangle_mrad,
             "angular_sampling_mrad": info.angular_sampling_mrad}  # fmt: skip
    try:
        memory_reserve.prepare_expected(flags, budget_bytes=1 << 30)
        assert memory_reserve.prepared_bytes() > 0
        with caplog.at_level(logging.INFO, logger="tcbf_live.stream.memory_reserve"):
            eng = receive(workers(1), "dectris-v2", stream)
    finally:
        memory_reserve.release()
    assert any("in the memory prepared at start-up" in r.getMessage() for r in caplog.records)
    assert_same(eng.last_result, one)


def test_start_up_objects_are_out_of_the_collectors_reach():
    """What a worker process does before its detector socket opens and after its first delta
    (`worker_process.serve`, `Worker.freeze_after_first_delta`): every object alive goes to
    the collector's permanent generation, so its full collections no longer walk them."""
    import gc

    from tcbf_live.stream.priority import freeze_startup_objects

    tracked = len(gc.get_objects())
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > tracked // 2 and len(gc.get_objects()) < tracked // 100
    finally:
        gc.unfreeze()


def test_run_prepares_the_coordinators_memory_before_it_starts(monkeypatch, tmp_path):
    """`run --workers N` touches the accumulators' memory before the coordinator starts, as
    `run` in one process does (the coordinator merges the deltas into it)."""
    from tcbf_live.stream import memory_reserve
    from tcbf_live.stream.cli import run as run_cli
    from tcbf_live.stream.cli.common import UsageError
    from tcbf_live.stream.cli.main import main
    from tcbf_live.stream.tcbf.accumulators import AccumulatorState

    seen = []

    def coordinator_not_started(*_args):
        seen.append(memory_reserve.prepared_bytes())
        raise UsageError("stopped before the coordinator starts")

    monkeypatch.setattr(run_cli, "start_coordinator", coordinator_not_started)
    try:
        code = main(["run", "--protocol", "dectris-v2", "--connect",
                     f"tcp://127.0.0.1:{_free_port()}", "--workers", "1", "--scan", "32x32",
                     "--semiangle", "20", "--angular-sampling", "1", "--headless",
                     "--output", str(tmp_path / "r.h5")])  # fmt: skip
    finally:
        memory_reserve.release()
    layout = memory_reserve.expected_layout({"scan_shape": (32, 32), "semiangle_mrad": 20.0,
                                             "angular_sampling_mrad": 1.0})  # fmt: skip
    assert code == 2 and seen == [AccumulatorState.block_bytes(layout)]


def test_a_stray_delta_counts_its_frames_and_an_empty_one_nothing(caplog):
    """A worker's delta for a series the coordinator has no open run of: its frames are
    counted as rejected and logged; an empty one (a last delta after the end, as a 2-worker
    run on a loaded CI machine sent) loses nothing and is neither counted nor logged."""
    import logging

    from tcbf_live.stream.tcbf.accumulators import StateDelta

    settings = EngineSettings(
        subscriber=SubscriberSettings(
            endpoint=f"tcp://127.0.0.1:{_free_port()}", socket_type="pull"
        ),
        protocol="dectris-v2",
    )
    eng = Coordinator(settings, WorkerPlan(local=0, remote=1,
                                           link=f"tcp://127.0.0.1:{_free_port()}"))  # fmt: skip
    none = np.zeros(0, np.int64)
    try:
        with caplog.at_level(logging.WARNING, logger="tcbf_live.stream.coordinator"):
            eng.merge_delta(5, StateDelta(none, {}, none, np.zeros(5, np.int64)))
            assert not eng.counters.rejected and not caplog.records
            eng.merge_delta(5, StateDelta(none, {}, none, np.array([3, 0, 0, 0, 3])))
        assert eng.counters.rejected == {"no_series": 3} and len(caplog.records) == 1
    finally:
        eng.receiver.close()


def test_local_workers_take_the_runs_memory_budget(monkeypatch):
    """`run --memory-budget` reaches the workers it spawns: each is started with the run's
    budget and prepares its kept memory (2 x KEPT_BYTES) only within half of it, as one
    process does; `tcbf-live worker --memory-budget` sets a remote worker's."""
    from tcbf_live.stream import memory_reserve, worker_pool, worker_process

    started = []

    class Spawn:
        def Process(self, target, name, daemon, args):  # noqa: N802 (multiprocessing's name)
            started.append((target, args))
            return type("P", (), {"start": lambda self: None, "join": lambda self, t: None,
                                  "is_alive": lambda self: False, "pid": 1 << 30})()  # fmt: skip

    monkeypatch.setattr(worker_pool.mp, "get_context", lambda how: Spawn())
    link = f"tcp://127.0.0.1:{_free_port()}"
    sub = SubscriberSettings(endpoint=f"tcp://127.0.0.1:{_free_port()}", socket_type="pull")
    settings = EngineSettings(subscriber=sub, protocol="dectris-v2", memory_budget_bytes=300 << 20)
    pool = Coordinator(settings, WorkerPlan(local=2, link=link)).receiver
    try:
        pool.start_local()
    finally:
        pool.close()
    want = (worker_process.spawned, 300 << 20, worker_process.KEPT_BYTES)  # (no flags: least)
    assert [(t, *a[-4:-2], a[-1]) for t, a in started] == [(*want, os.getpid())] * 2
    tags = [a[-2] for _, a in started]  # each its own segment names (or none: no room)
    assert tags == [None] * 2 or len(set(tags)) == 2 and all(len(t) == 16 for t in tags)
    nobody, least = f"tcp://127.0.0.1:{_free_port()}", 4 * worker_process.KEPT_BYTES
    try:
        for budget, kept in ((least - 1, 0), (least, 2)):
            assert worker_process.serve(nobody, budget_bytes=budget, join_timeout_s=0.1) == 1
            assert len(memory_reserve._kept) == kept, budget
    finally:
        memory_reserve._kept.clear()


def test_a_worker_stops_when_its_coordinator_is_gone(monkeypatch):
    """A coordinator killed (no "stop" sent) leaves its workers behind, each holding its
    detector socket and memory: a local worker stops when the process that spawned it has
    ended (never for silence: a long final solve answers no beat), another host's when none
    of SILENT_BEATS beats was answered; any message from the coordinator resets the count."""
    from tcbf_live.stream import worker_inbox

    ctx = zmq.Context()
    router, link = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        link.connect(f"tcp://127.0.0.1:{port}")
        inbox = worker_inbox.LinkInbox(link, 0)
        inbox.parent = os.getppid()
        inbox.unanswered = 10**6
        assert not inbox.gone()
        inbox.parent = os.getppid() + 1  # (the spawning process ended: another parent now)
        assert inbox.gone()
        inbox.parent, inbox.unanswered = None, 0
        assert not any(inbox.gone() for _ in range(worker_inbox.SILENT_BEATS - 1))
        link.send(b"hi")
        ident, _ = router.recv_multipart()
        router.send_multipart([ident, *pack("merged", {"bytes": 0})])
        assert link.poll(5000)
        inbox.read()  # an answer: the count starts again
        assert not inbox.gone() and not inbox.gone()
        inbox.unanswered = worker_inbox.SILENT_BEATS
        assert inbox.gone()
    finally:
        router.close(linger=0)
        link.close(linger=0)
        ctx.term()


def _children(pid: int) -> list[int]:
    """Process ids of `pid`'s multiprocessing workers (spawned: `spawn_main` in their argv)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(next(ln for ln in status.read_text().splitlines()
                            if ln.startswith("PPid:")).split()[1])  # fmt: skip
            argv = (status.parent / "cmdline").read_bytes()
        except (OSError, StopIteration, ValueError):
            continue
        if ppid == pid and b"spawn_main" in argv:
            found.append(int(status.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_killed_runs_local_workers_stop(tmp_path):
    """`run --workers 1` killed with SIGKILL: its worker stops within seconds."""

    def running(pid: int) -> bool:  # (a zombie has stopped: whoever adopted it reaps it)
        try:
            return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:4]
        except (OSError, IndexError):
            return False

    run = subprocess.Popen([sys.executable, "-m", "tcbf_live", "run", "--protocol", "dectris-v2",
                            "--connect", f"tcp://127.0.0.1:{_free_port()}", "--workers", "1",
                            "--headless", "--timeout", "120", "--output",
                            str(tmp_path / "r.h5")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        until, workers = time.monotonic() + 60, []
        while not workers and time.monotonic() < until and run.poll() is None:
            time.sleep(0.2)
            workers = _children(run.pid)
        assert workers, "no worker started"
        time.sleep(3.0)  # (it has joined and runs its loop)
        run.send_signal(signal.SIGKILL)
        run.wait(10)
        until = time.monotonic() + 20
        while time.monotonic() < until and any(map(running, workers)):
            time.sleep(0.2)
        alive = [w for w in workers if running(w)]
        for w in alive:
            os.kill(w, signal.SIGKILL)
        assert not alive, "a worker outlived its killed run"
    finally:
        run.kill()
        run.wait(10)


@pytest.mark.parametrize("name", ["native", "dectris-v2"])
def test_a_start_sent_again_before_any_frame_is_one_series_with_workers(sim, name):
    """A sender that restarts after its start sends it again, before any frame: one process
    takes it for a re-announcement (nothing received yet); the workers count it as the id's
    next run, and the coordinator now follows them (its processor kept, as one process keeps
    it): before, it kept the first run's number, never calibrated the workers' run and the
    whole series was lost. Frames that reach a worker before the second start's relay go to
    the first run and, uncalibrated, are dropped when it ends: counted `series_restarted`
    (a documented limit: frames carry no run), never silently."""
    stream = messages(sim, name)
    starts = [m for m in stream[:3] if protocol(name).rank(m) == START]
    stream = [*starts, *stream]
    one = receive(Engine, name, stream).last_result
    n = PASSES * sim.n_frames
    assert one.frames_received == n

    def restart(eng, k):
        if k in (len(starts) - 1, 2 * len(starts) - 1):
            time.sleep(0.5)  # (each start relayed before what the sender sends next)

    eng = receive(workers(2), name, stream, during=restart)
    assert_same(eng.last_result, one)
    assert not eng.lost and not eng.counters.rejected
    eng = receive(workers(2), name, stream)  # at once: the frames race the second relay
    got = eng.last_result.frames_received if eng.last_result else 0
    frames_per_message = n / sum(protocol(name).rank(m) is None for m in stream)
    assert got + eng.counters.rejected["series_restarted"] * frames_per_message == n


def test_each_occurrence_of_a_pub_control_message_is_taken_once():
    """PUB: every worker sends each control message it reads (a start also as "first"); the
    coordinator takes each occurrence once, and a message sent again within the window (a
    restarted sender's identical start) again; a late worker's lone copy is taken."""
    start, end = [b"start-5"], [b"end-5"]
    c = Copies()
    got = [c.take(start, "ctl", b"w0", 0.0), c.take(start, "first", b"w0", 0.0),
           c.take(start, "ctl", b"w1", 0.1), c.take(start, "first", b"w1", 0.1),
           c.take(end, "ctl", b"w1", 0.2), c.take(end, "ctl", b"w0", 0.2)]  # fmt: skip
    assert got == [True, False, False, False, True, False]
    again = [c.take(start, "ctl", b"w1", 0.5), c.take(start, "ctl", b"w0", 0.5),
             c.take(start, "first", b"w0", 0.5), c.take(start, "first", b"w1", 0.6)]  # fmt: skip
    assert again == [True, False, False, False]  # the sender's second start: taken once more
    assert c.take(start, "ctl", b"w2", 9.0)  # (a worker alone, long after: its own)
    for k in range(1000):
        c.take([b"%d" % k], "ctl", b"w0", 10.0)
    assert len(c.last) <= Copies.KEPT
