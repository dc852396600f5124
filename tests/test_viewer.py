"""Viewer and result stream: offscreen (pytest-qt), fed by a real engine over real sockets."""

import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import zmq

from conftest import free_port
from tcbf_live.detectors.base import FrameBatch
from tcbf_live.detectors.native import encode_end, encode_frames, encode_start
from tcbf_live.simulators.simulate import Simulator, tutorial_config
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.publisher import SnapshotPublisher, subscribe_states
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.pipeline import PipelineSettings
from tcbf_live.stream.view_state import view_state
from tcbf_live.viewer.panels import (
    BfPanel,
    DosePanel,
    ErrorPanel,
    ShiftPanel,
    TcbfPanel,
    TilesPanel,
    dose_lines,
)
from tcbf_live.viewer.state import StateError, decode_state, encode_state
from tcbf_live.viewer.window import ViewerWindow


@pytest.fixture(scope="module")
def tutorial():
    sim = Simulator(tutorial_config())
    return sim, sim.frames(0, sim.n_frames)


def start_engine(endpoint, **kw):
    settings = EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        processing=ProcessingSettings(pipeline=PipelineSettings(ring_images=True)),
        idle_timeout_s=20.0, max_series=1, **kw,
    )  # fmt: skip
    return Engine(settings).start()


def send(endpoint, info, frames, batch=16, rate_fps=0.0, first_sleep=0.1):
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    time.sleep(first_sleep)
    t0 = time.perf_counter()
    push.send_multipart(encode_start(info))
    for i, first in enumerate(range(0, len(frames), batch)):
        if rate_fps:
            wait = t0 + first / rate_fps - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        push.send_multipart(encode_frames(info.series_id, first, frames[first : first + batch],
                                          i + 1))  # fmt: skip
    push.send_multipart(encode_end(info.series_id, len(frames)))
    push.close(linger=5000)


def test_view_state_round_trip_and_malformed_messages_rejected(tutorial):
    sim, frames = tutorial
    proc = SeriesProcessor(sim.series_info(3), ProcessingSettings())
    proc.add(FrameBatch(3, 0, frames))
    proc.solve(final=True)
    state = view_state(proc.result(final=True, complete=True))
    parts = [bytes(p) for p in encode_state(state)]
    back = decode_state(parts)
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(back[name], value)
        else:
            assert back[name] == value
    assert back["aberrations"]["defocus_A"] == pytest.approx(15000, rel=0.03)
    # the dose panel shows the resolution in the engine's own words (one wording, two units)
    result = proc.result(final=True, complete=True)
    assert dose_lines(back)[1] == result.tcbf.resolution_text("Å")
    assert result.tcbf.resolution_text() in result.dose_summary()
    assert back["descan_text"].startswith("descan constant: drift 0 px")
    import msgpack

    header = msgpack.unpackb(parts[0])
    bad_dtype = dict(header, arrays=[[*header["arrays"][0][:1], "|O", header["arrays"][0][2]],
                                     *header["arrays"][1:]])  # fmt: skip
    for broken in (
        [],
        [b"\xc1garbage"],
        [msgpack.packb({"kind": "other"}), *parts[1:]],
        [parts[0], *parts[1:-1]],  # a part missing
        [parts[0], parts[1][:-1], *parts[2:]],  # truncated array
        [msgpack.packb(bad_dtype), *parts[1:]],  # object dtype: never unpickled
    ):
        with pytest.raises(StateError):
            decode_state(broken)


def test_viewer_renders_every_panel_from_a_live_engine(qtbot, tutorial, endpoint, tmp_path):
    sim, frames = tutorial
    engine = start_engine(endpoint, align_interval_s=0.1)
    publish = f"tcp://127.0.0.1:{free_port()}"
    publisher = SnapshotPublisher(engine, publish, rate_hz=20).start()
    source = subscribe_states(publish)
    window = ViewerWindow(source, refresh_hz=20)
    qtbot.addWidget(window)
    window.show()
    try:
        send(endpoint, sim.series_info(5), frames, rate_fps=1500)
        qtbot.waitUntil(lambda: window.state is not None and window.state.get("complete")
                        and window.state.get("tcbf_final"), timeout=20000)  # fmt: skip
    finally:
        engine.join(10)
        publisher.close()
        source.close()
    s = window.state
    assert s["frames_received"] == len(frames) and s["series_id"] == 5
    assert window.updates >= 2  # it updated during the scan, not only at the end
    # every panel holds data
    bf, tcbf, shifts = window.panel(BfPanel), window.panel(TcbfPanel), window.panel(ShiftPanel)
    for item in (bf.dp_image, bf.axial_image, bf.inc_image, window.panel(TilesPanel).image,
                 window.panel(DosePanel).image, tcbf.view.getImageItem()):  # fmt: skip
        assert item.image is not None and item.image.size > 0
    assert shifts.model_curve.getData()[0].size > 0
    assert shifts.tile_curve.getData()[0].size > 0
    assert window.panel(ErrorPanel).curve.getData()[0].size == len(s["errors_px"]) > 0
    assert "defocus 1.4" in shifts.fit_label.text() or "defocus 1.5" in shifts.fit_label.text()
    assert "descan constant: drift 0 px" in shifts.fit_label.text()  # the tutorial has none
    assert "1152/1152 frames" in window.status.text()
    assert tcbf.progress.value() == 100
    # the slider re-draws the axial vBF from the ring images
    bf.axial_slider.setValue(6)
    assert "axial radius 2.9" in bf.axial_label.text()
    png = tmp_path / "viewer.png"
    assert window.save_png(str(png)) and png.stat().st_size > 10_000
    pixels = window.panel_pixels()
    assert pixels.std() > 20  # the tcBF panel shows an image, not a blank area


def test_viewer_joining_mid_scan_sees_the_current_state(qtbot, tutorial, endpoint):
    import threading

    sim, frames = tutorial
    engine = start_engine(endpoint, align_interval_s=0.1)
    publish = f"tcp://127.0.0.1:{free_port()}"
    publisher = SnapshotPublisher(engine, publish, rate_hz=20).start()
    sender = threading.Thread(target=send, args=(endpoint, sim.series_info(6), frames),
                              kwargs={"rate_fps": 600})  # ~2 s  # fmt: skip
    sender.start()
    try:
        time.sleep(1.0)  # about half the scan has been sent
        source = subscribe_states(publish)
        window = ViewerWindow(source, refresh_hz=20)
        qtbot.addWidget(window)
        qtbot.waitUntil(lambda: window.state is not None, timeout=5000)
        first = window.state["frames_received"]
        assert 200 < first < len(frames)  # the current state, from the first message
        assert "incoherent_bf" in window.state and "mean_pattern" in window.state
        source.close()
    finally:
        sender.join()
        engine.join(10)
        publisher.close()


def test_a_stalled_viewer_does_not_slow_ingest(tutorial):
    """Ingest frames/s with a subscriber that never reads vs none (same messages, best of 3)."""
    sim, frames = tutorial
    many = np.concatenate([frames] * 8)  # 9216 frames: 96 x 96 scan
    from dataclasses import replace

    info = replace(sim.series_info(8), scan_shape=(96, 96), frames_expected=len(many))

    def rate(stalled: bool) -> float:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        engine = start_engine(endpoint, align_interval_s=0.25)
        publish = f"tcp://127.0.0.1:{free_port()}"
        publisher = SnapshotPublisher(engine, publish, rate_hz=20).start()
        sub = None
        if stalled:  # subscribes, then never reads
            sub = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.RCVHWM, 1)
            sub.connect(publish)
        try:
            send(endpoint, info, many, batch=16, first_sleep=0.3)
            assert engine.join(30)
        finally:
            publisher.close()
            if sub is not None:
                sub.close(linger=0)
        assert engine.last_result.frames_received == len(many)
        if stalled:
            assert publisher.sent > 0
        return engine.last_result.frames_per_s

    free, stalled = [], []
    for _ in range(5):  # interleaved, so a noisy moment on the shared machine hits both
        free.append(rate(False))
        stalled.append(rate(True))
    # medians: single runs on this shared 2-core machine scatter by +-30 %, and by more while
    # other work runs (0.88 was seen so); a viewer that held ingest up would stall it (the
    # join above) or take most of its rate, not a few tens of percent
    assert np.median(stalled) >= 0.6 * np.median(free), (free, stalled)


def test_demo_headless_writes_a_screenshot_and_a_sharp_result(tmp_path):
    png, out = tmp_path / "demo.png", tmp_path / "demo.h5"
    cmd = [sys.executable, "-m", "tcbf_live", "demo", "--headless", "--seconds", "20",
           "--screenshot", str(png), "--output", str(out)]  # fmt: skip
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert png.stat().st_size > 10_000
    with h5py.File(out) as f:
        assert f["acquisition"].attrs["complete"] and f["acquisition"].attrs["frames_missing"] == 0

        image = f["tcbf/image"][()]
        factor = int(f["tcbf/image"].attrs["upsampling_factor"])
        incoherent = f["bf/incoherent"][()]
    sim = Simulator(tutorial_config())
    q_max = 2 * 4e-3 / sim.wavelength_A

    def corr(a, b, border):
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    sharp = corr(image, sim.phase_on_grid(factor, q_max), 6 * factor)
    blurred = corr(incoherent, sim.phase_on_grid(1, q_max), 6)
    assert sharp >= 0.5 and abs(blurred) <= 0.1


def test_run_with_the_in_process_viewer_writes_the_result_and_stops_on_ctrl_c(tmp_path, tutorial):
    import signal

    sim, frames = tutorial
    port = free_port()
    out = tmp_path / "live.h5"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.Popen([sys.executable, "-m", "tcbf_live", "run", "--socket", "pull",
                             "--bind", f"tcp://127.0.0.1:{port}", "--output", str(out)],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(3.0)  # interpreter, Qt and the window start
        send(f"tcp://127.0.0.1:{port}", sim.series_info(4), frames, rate_fps=2000)
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert out.exists(), "the result is written when the series ends, window still open"
        time.sleep(0.5)
        assert proc.poll() is None  # the window stays up on the final result
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "wrote" in err
    with h5py.File(out) as f:
        assert f["acquisition"].attrs["frames_received"] == len(frames)
        assert "tcbf/image" in f


def show_state(qtbot, state):
    """A viewer window showing one fixed (decoded) view state."""

    class Fixed:
        def latest(self):
            return state

        def close(self):
            pass

    window = ViewerWindow(Fixed(), refresh_hz=20)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.state is not None, timeout=5000)
    return window


def test_the_status_bar_says_when_a_result_is_suspect(qtbot, tutorial):
    """A missed trigger (the series ended a frame short) and excluded frames are in the view
    state and shown in red in the status bar: a sheared image is never shown as a good one."""
    sim, frames = tutorial
    faulty = np.delete(frames, 500, axis=0)
    faulty[100] = 0  # one blank frame: excluded
    proc = SeriesProcessor(sim.series_info(3), ProcessingSettings())
    proc.add(FrameBatch(3, 0, faulty))
    proc.solve(final=True)
    state = decode_state([bytes(p) for p in encode_state(view_state(
        proc.result(final=True, complete=True)))])  # fmt: skip
    assert state["frames_excluded"] == 1 and "missed trigger" in state["suspect"][0]

    window = show_state(qtbot, state)
    text = window.status.text()
    assert "excluded 1" in text and "SUSPECT: missed trigger" in text
    assert "d03030" in window.status.styleSheet()
    for hostile in ([1] * 3, ["x" * 5000]):
        with pytest.raises(StateError):
            decode_state([bytes(p) for p in encode_state(dict(state, suspect=hostile))])


def test_the_shift_panel_says_when_the_global_search_gave_the_model(qtbot):
    """At 20 e/A^2 on the tutorial no tile level is trusted: the panel says how the model was
    found (the global search, its ratio to the null) in place of the tiles' misfit."""
    from tcbf_live.simulators import Simulator, tutorial_config

    sim = Simulator(tutorial_config(dose_e_per_A2=20.0))
    proc = SeriesProcessor(sim.series_info(3), ProcessingSettings())
    proc.add(FrameBatch(3, 0, sim.frames(0, sim.n_frames)))
    proc.solve(final=True)
    state = decode_state([bytes(p) for p in encode_state(view_state(
        proc.result(final=True, complete=True)))])  # fmt: skip
    assert state["method_text"].startswith("tile alignment: no model; global search")

    window = show_state(qtbot, state)
    text = window.panel(ShiftPanel).fit_label.text()
    assert "global search" in text and "tile misfit" not in text and "1 sigma: defocus" in text
