"""SIMPLON REST client against a local fake detector (http.server)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tcbf_live.detectors.simplon import SimplonClient, SimplonError


class FakeDCU(BaseHTTPRequestHandler):
    requests: list = []
    fail: set = set()

    def _reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):  # noqa: N802 (http.server naming)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        FakeDCU.requests.append(("PUT", self.path, body))
        if self.path.rsplit("/", 1)[-1] in FakeDCU.fail:
            return self._reply(400, {"error": "value out of range"})
        if self.path.endswith("/command/arm"):
            return self._reply(200, {"sequence id": 42})
        if "/command/" in self.path:
            return self._reply(200, {"sequence id": 42})
        return self._reply(200, [self.path.rsplit("/", 1)[-1]])

    def do_GET(self):  # noqa: N802
        FakeDCU.requests.append(("GET", self.path, None))
        self._reply(200, {"value": "ready", "value_type": "string", "access_mode": "r"})

    def log_message(self, *args):
        pass


@pytest.fixture
def dcu():
    FakeDCU.requests, FakeDCU.fail = [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeDCU)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_active_mode_sequence(dcu):
    c = SimplonClient("127.0.0.1", dcu)
    c.configure_stream("cbor", "basic", '{"scan_shape": [4, 5]}')
    c.configure_scan(20, "exte", frame_time_s=1e-4)
    assert c.arm() == 42
    c.disarm()
    assert c.stream_state() == "ready"
    paths = [(m, p.split("/api/1.8.0/")[1], b) for m, p, b in FakeDCU.requests]
    assert paths[:4] == [
        ("PUT", "config/mode", {"value": "enabled"}),
        ("PUT", "config/format", {"value": "cbor"}),
        ("PUT", "config/header_detail", {"value": "basic"}),
        ("PUT", "config/header_appendix", {"value": '{"scan_shape": [4, 5]}'}),
    ]
    assert ("PUT", "config/ntrigger", {"value": 20}) in paths  # exte: one trigger per position
    assert ("PUT", "config/nimages", {"value": 1}) in paths
    assert ("PUT", "command/arm", {}) in paths and ("PUT", "command/disarm", {}) in paths
    assert FakeDCU.requests[0][1].startswith("/stream/api/1.8.0/config/")
    assert paths[-1] == ("GET", "status/state", None)


def test_errors_are_one_clear_exception(dcu):
    FakeDCU.fail = {"ntrigger"}
    with pytest.raises(SimplonError, match="HTTP 400"):
        SimplonClient("127.0.0.1", dcu).configure_scan(10)
    from conftest import free_port

    with pytest.raises(SimplonError, match="Connection refused|refused"):
        SimplonClient("127.0.0.1", free_port(), timeout_s=1).arm()
    with pytest.raises(ValueError):
        SimplonClient("evil host; rm -rf /")


@pytest.mark.parametrize("protocol,stream_format,detail",
                         [("dectris-v2", "cbor", "basic"), ("dectris-v1", "legacy", "all")])
def test_run_active_mode_configures_arms_and_disarms(dcu, tmp_path, capsys, protocol,
                                                     stream_format, detail):  # fmt: skip
    """The stream is configured for the protocol (the registry's SIMPLON format and header
    detail: V1 carries our appendix only with header_detail all), armed, then disarmed."""
    from tcbf_live.stream.cli.main import main

    FakeDCU.requests.clear()
    out = tmp_path / "r.h5"
    code = main(["run", "--protocol", protocol, "--socket", "pull", "--connect",
                 f"tcp://127.0.0.1:{dcu + 1}", "--headless", "--scan", "4x5", "--timeout", "1",
                 "--simplon", f"127.0.0.1:{dcu}", "--output", str(out)])  # fmt: skip
    assert code == 4  # EMPTY: nothing was streamed by the fake detector
    commands = [p.rsplit("/", 1)[-1] for m, p, _ in FakeDCU.requests if "/command/" in p]
    assert commands == ["arm", "disarm"]
    puts = {p.rsplit("/", 1)[-1]: body for m, p, body in FakeDCU.requests if m == "PUT"}
    assert puts["format"] == {"value": stream_format}
    assert puts["header_detail"] == {"value": detail}
    assert "no series received" in capsys.readouterr().err


def test_run_active_mode_needs_a_scan_and_a_dectris_protocol(expect_usage_error):
    assert "--scan" in expect_usage_error(
        [
            "run",
            "--protocol",
            "dectris-v2",
            "--headless",
            "--simplon",
            "127.0.0.1:1",
            "--output",
            "x.h5",
        ]
    )
    assert "DECTRIS" in expect_usage_error(
        ["run", "--headless", "--scan", "2x2", "--simplon", "127.0.0.1:1", "--output", "x.h5"]
    )


@pytest.mark.parametrize("protocol", ["dectris-v2", "dectris-v1"])
def test_armed_engine_takes_only_the_armed_series(endpoint, protocol):
    """Active mode: a foreign series on the socket (armed by someone else, or left over) is
    counted and ignored, also when its header arrives before the arm's reply."""
    import time

    import zmq

    from tcbf_live.simulators import Simulator, tutorial_config
    from tcbf_live.simulators.sender import SendSettings, stream_series
    from tcbf_live.stream.engine import Engine, EngineSettings
    from tcbf_live.stream.receiver import SubscriberSettings

    sim = Simulator(tutorial_config(scan_shape=(4, 6)))
    engine = Engine(EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        protocol=protocol, idle_timeout_s=10.0, max_series=1, armed=True,
    )).start()  # fmt: skip
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    frames = sim.frames(0, sim.n_frames)
    try:
        for series in (7, 42):  # the foreign series first
            stream_series(push, sim, SendSettings(protocol=protocol, encoding="bslz4"), series,
                          iter([(0, frames)]))  # fmt: skip
    finally:
        push.close(linger=2000)
    time.sleep(0.3)  # the headers are in before the arm's reply
    engine.expect_series(42)
    assert engine.join(timeout=20)
    result = engine.last_result
    assert result.info.series_id == 42 and result.complete
    assert result.frames_received == sim.n_frames
    assert engine.counters.rejected["foreign_series"] == 1
    assert engine.counters.rejected["no_series"] == sim.n_frames  # its frames: counted only


def test_armed_series_cut_short_takes_nothing_from_a_foreign_one(endpoint):
    """The armed series loses its end, then a foreign series streams: its start, frames and
    end are counted, and none of it reaches (or ends) the armed series."""
    import zmq

    from tcbf_live.detectors.dectris_v2_encoder import encode_end, encode_image, encode_start
    from tcbf_live.simulators import Simulator, tutorial_config
    from tcbf_live.stream.engine import Engine, EngineSettings
    from tcbf_live.stream.receiver import SubscriberSettings

    sim = Simulator(tutorial_config(scan_shape=(4, 6)))
    engine = Engine(EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        protocol="dectris-v2", idle_timeout_s=1.5, max_series=1, armed=True,
    )).start()  # fmt: skip
    engine.expect_series(42)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    frames = sim.frames(0, sim.n_frames)
    try:
        push.send_multipart(encode_start(sim.series_info(42)))
        for i in range(12):  # half of the armed series, no end
            push.send_multipart(encode_image(42, i, frames[i]))
        push.send_multipart(encode_start(sim.series_info(7)))
        for i, f in enumerate(frames):
            push.send_multipart(encode_image(7, i, f // 2))
        push.send_multipart(encode_end(7))
    finally:
        push.close(linger=2000)
    assert engine.join(timeout=20)
    result = engine.last_result
    assert result.info.series_id == 42 and not result.complete
    assert result.frames_received == 12 and result.duplicates == 0
    rejected = engine.counters.rejected
    assert rejected["foreign_series"] == 1 and rejected["wrong_series"] == sim.n_frames + 1


def test_the_detectors_dropped_count_is_reconciled_with_ours(dcu, tmp_path):
    """Active mode: the SIMPLON stream status `dropped` goes into the result beside
    frames_missing, so images dropped in the detector are told from those lost on the way."""
    import h5py
    import numpy as np

    from tcbf_live.detectors.base import FrameBatch, SeriesInfo
    from tcbf_live.stream.cli.series_files import SeriesFiles
    from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor

    class Dropping(FakeDCU):
        def do_GET(self):  # noqa: N802
            if self.path.endswith("status/dropped"):
                return self._reply(200, {"value": 2, "value_type": "uint", "access_mode": "r"})
            return super().do_GET()

    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Dropping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = SimplonClient("127.0.0.1", server.server_address[1])
        assert client.dropped() == 2
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:32, :32]
        disk = ((yy - 16) ** 2 + (xx - 16) ** 2 < 64) * 20.0
        info = SeriesInfo(series_id=3, detector_shape=(32, 32), dtype="uint16", scan_shape=(8, 8))
        proc = SeriesProcessor(info, ProcessingSettings(calibration_frames=8))
        frames = rng.poisson(disk, (61, 32, 32)).astype(np.uint16)  # 3 of 64 never came
        proc.add(FrameBatch(3, 0, frames))
        result = proc.result(final=True, complete=True)
        files = SeriesFiles(tmp_path / "r.h5", "dectris-v2", overwrite=False)
        files.detector = client
        files(result)
        with h5py.File(tmp_path / "r.h5") as f:
            assert f["acquisition"].attrs["frames_dropped_by_detector"] == 2
            assert f["acquisition"].attrs["frames_missing"] == 3
        line = files.with_detector_counts(result).screening_summary()
        assert "the detector dropped 2 image(s), 3 missing here (1 lost on the way)" in line
    finally:
        server.shutdown()
        server.server_close()
