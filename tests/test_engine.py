"""The live engine over real sockets: bad input skipped, frames kept, run CLI end to end."""

import subprocess
import sys
import threading
import time

import h5py
import msgpack
import numpy as np
import pytest
import zmq

from tcbf_live.detectors.native import encode_end, encode_frames, encode_start
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.simulators.sender import SendSettings
from tcbf_live.stream.cli.sending import LinkSettings, serve
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=(8, 12), bad_pixels=4))


def offline(sim, settings=None):
    from tcbf_live.detectors.base import FrameBatch

    proc = SeriesProcessor(sim.series_info(9), settings or ProcessingSettings())
    proc.add(FrameBatch(9, 0, sim.frames(0, sim.n_frames)))
    return proc.result(final=True)


def engine(endpoint, **kw):
    settings = EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        idle_timeout_s=5.0, max_series=1, **kw,
    )  # fmt: skip
    return Engine(settings).start()


def test_malformed_messages_are_skipped_and_frames_around_them_kept(endpoint, sim):
    eng = engine(endpoint)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    info = sim.series_info(9)
    frames = sim.frames(0, sim.n_frames)
    good = encode_frames(9, 0, frames[:1])
    header = msgpack.unpackb(good[0])
    bad = [
        [b"\xc1not msgpack", b""],
        [msgpack.packb({**header, "nbytes": 10}), good[1]],
        [msgpack.packb({**header, "dtype": "<c16"}), good[1]],
        [msgpack.packb({**header, "first": 10**6}), good[1]],
        [msgpack.packb({**header, "series": 123}), good[1]],
        [good[0], bytes(good[1])[:100]],
    ]
    push.send_multipart(encode_frames(9, 0, frames[:4]))  # before start: joined-late case
    push.send_multipart(encode_start(info))
    for i in range(0, sim.n_frames, 4):
        push.send_multipart(bad[(i // 4) % len(bad)])
        push.send_multipart(encode_frames(9, i, frames[i : i + 4], seq=i, encoding="lz4"))
    push.send_multipart(encode_end(9, sim.n_frames))
    assert eng.join(timeout=20)
    push.close()
    r = eng.last_result
    assert r is not None and r.complete and r.frames_received == sim.n_frames
    n_bad = sim.n_frames // 4
    assert sum(eng.counters.rejected.values()) == n_bad + 1
    assert eng.counters.rejected["no_start"] == 1
    ref = offline(sim)
    np.testing.assert_array_equal(r.incoherent_bf, ref.incoherent_bf)
    np.testing.assert_array_equal(r.total_counts, ref.total_counts)


def test_engine_stops_at_expected_count_without_end(endpoint, sim):
    eng = engine(endpoint)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    push.send_multipart(encode_start(sim.series_info(9)))
    push.send_multipart(encode_frames(9, 0, sim.frames(0, sim.n_frames)))
    assert eng.join(timeout=20)  # no end message needed
    push.close()
    assert eng.last_result.complete and eng.last_result.frames_missing == 0


def test_idle_timeout_finishes_an_incomplete_series(endpoint, sim):
    settings = EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        idle_timeout_s=0.5,
    )
    eng = Engine(settings).start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    push.send_multipart(encode_start(sim.series_info(9)))
    push.send_multipart(encode_frames(9, 0, sim.frames(0, 10)))
    assert eng.join(timeout=10)
    push.close()
    r = eng.last_result
    assert not r.complete and r.frames_received == 10 and r.frames_missing == sim.n_frames - 10
    assert r.calibration is not None  # calibrated on the 10 frames that came


def test_snapshots_during_ingest_are_consistent(endpoint):
    sim = Simulator(tutorial_config(scan_shape=(24, 32)))
    eng = Engine(
        EngineSettings(
            subscriber=SubscriberSettings(endpoint=endpoint), idle_timeout_s=5, max_series=1
        )  # fmt: skip
    ).start()
    sender = threading.Thread(
        target=serve,
        args=(sim, SendSettings(rate_fps=600, batch=8),
              LinkSettings(bind=endpoint, wait_subscriber_s=5)),  # fmt: skip
        kwargs={"show_progress": False},
    )
    sender.start()
    partial = []
    while not eng.join(timeout=0.05):
        snap = eng.snapshot()
        if snap is not None and snap.calibration is not None:
            partial.append(snap)
    sender.join()
    final = eng.last_result
    assert final.frames_received == sim.n_frames
    mid = [s for s in partial if 0 < s.frames_received < sim.n_frames]
    assert mid, "no snapshot taken mid-scan"
    for s in mid:
        # a snapshot is a consistent prefix: accumulated positions match the final values
        done = s.hits > 0
        assert done.sum() == s.frames_received
        np.testing.assert_array_equal(s.incoherent_bf[done], final.incoherent_bf[done])


def test_run_cli_writes_result_file(endpoint, tmp_path):
    out = tmp_path / "result.h5"
    cmd = [sys.executable, "-m", "tcbf_live"]
    run = subprocess.Popen(
        [*cmd, "run", "--connect", endpoint, "--headless", "--output", str(out), "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.5)
    sim_proc = subprocess.run(
        [*cmd, "simulate", "--bind", endpoint, "--scan", "12x16", "--dose", "80",
         "--bad-pixels", "6", "--wait-subscriber", "20", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _, err = run.communicate(timeout=60)
    assert sim_proc.returncode == 0, sim_proc.stderr
    assert run.returncode == 0, err
    assert "192/192 frames, 0 missing" in err
    with h5py.File(out) as f:
        assert f.attrs["software"] == "tcbf-live"
        acq = f["acquisition"].attrs
        assert list(acq["scan_shape"]) == [12, 16] and acq["frames_received"] == 192
        assert acq["frames_missing"] == 0 and acq["protocol"] == "native"
        assert acq["step_A"] == pytest.approx(256 / 24) and acq["energy_eV"] == 300e3
        assert f["bf/incoherent"].shape == (12, 16)
        assert f["alignment/bf_pixels"].shape[1] == 2
        assert 2000 < f["alignment/bf_pixels"].shape[0] < 2200
        dose = f["dose"].attrs
        assert dose["dose_e_per_A2"] == pytest.approx(80.0, rel=0.02)
        assert dose["electrons_total"] == pytest.approx(80 * (256 / 24) ** 2 * 192, rel=0.02)
        assert f["dose/map"].shape == (12, 16)
        assert f["calibration/mask"][()].sum() == 6


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--headless"],  # no --output
        ["run", "--headless", "--output", "x.h5", "--bins", "32,12"],
        ["run", "--headless", "--output", "x.h5", "--bf-threshold", "2"],
        ["run", "--headless", "--output", "/nonexistent/dir/x.h5"],
        ["run", "--headless", "--output", "x.h5", "--calibration", "missing.json"],
        ["run", "--headless", "--output", "x.h5", "--connect", "a", "--bind", "b"],
    ],
)
def test_run_bad_flags(argv, expect_usage_error):
    expect_usage_error(argv)


def test_viewer_without_a_display_is_a_clear_error(expect_usage_error, monkeypatch):
    for name in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    assert "pass --headless" in expect_usage_error(["run", "--output", "x.h5"])
    assert "pass --headless" in expect_usage_error(["view"])
    assert "needs --seconds" in expect_usage_error(["demo", "--headless"])


def test_repeat_scans_as_new_series(endpoint, sim):
    """--repeat new-series: the second pass of the scan becomes its own result."""
    from dataclasses import replace

    results = []
    settings = EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        processing=ProcessingSettings(repeat_scans="new-series"),
        idle_timeout_s=5.0, max_series=2,
    )  # fmt: skip
    eng = Engine(settings, on_series_end=results.append).start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    n = sim.n_frames
    push.send_multipart(encode_start(replace(sim.series_info(9), frames_expected=2 * n)))
    frames = sim.frames(0, n)
    push.send_multipart(encode_frames(9, 0, frames))
    push.send_multipart(encode_frames(9, n, frames[:50]))  # second pass, partial
    push.send_multipart(encode_end(9, n + 50))
    assert eng.join(timeout=20)
    push.close()
    assert [r.frames_received for r in results] == [n, 50]
    first, second = results
    np.testing.assert_array_equal(first.incoherent_bf, offline(sim).incoherent_bf)
    assert second.frames_missing == n - 50 and np.count_nonzero(second.hits) == 50


def test_a_blank_series_ends_with_a_result_not_a_dead_thread(endpoint, sim):
    """No BF disk (all-zero frames): calibration fails; the result says so, ingest survives."""
    eng = engine(endpoint)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    info = sim.series_info(12)
    blank = np.zeros((sim.n_frames, *info.detector_shape), np.uint16)
    push.send_multipart(encode_start(info))
    push.send_multipart(encode_frames(12, 0, blank))
    push.send_multipart(encode_end(12, len(blank)))
    push.close(linger=2000)
    assert eng.join(timeout=20)
    result = eng.last_result
    assert result is not None and result.calibration is None and result.tcbf is None
    assert eng.tally.finished == 1
