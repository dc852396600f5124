"""The control endpoint of a running `run` (`--control`, `stream/control.py`): status,
aberrations, save and stop answered while the series streams in; bad requests get an error
reply and the endpoint stays up; beyond loopback only with CURVE keys."""

import io
import json
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from conftest import free_port
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.control import MAX_REQUEST_BYTES, ControlClient


@pytest.fixture
def start_run(tmp_path):
    """start_run(rate_fps): `simulate` (tutorial preset, paced; a process) into `run --control`
    on loopback (a thread); returns (control endpoint, run thread with .codes). After a stop
    the sender waits on a receiver that is gone: it is killed at the test's end (its stderr
    shown if it had failed on its own)."""
    senders = []

    def start(rate_fps: float):
        data, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        err = open(tmp_path / f"sender{len(senders)}.err", "w")  # noqa: SIM115 (closed below)
        senders.append((subprocess.Popen(
            [sys.executable, "-m", "tcbf_live", "simulate", "--bind", data, "--quiet",
             "--wait-subscriber", "30", "--rate", str(rate_fps), "--socket", "push"],
            stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path), err))  # fmt: skip
        codes = []
        runner = threading.Thread(target=lambda: codes.append(main(
            ["run", "--headless", "--connect", data, "--socket", "pull", "--output",
             str(tmp_path / "r.h5"), "--timeout", "20", "--align-interval", "0.2",
             "--control", control])), daemon=True)  # fmt: skip
        runner.codes = codes
        runner.start()
        return control, runner

    yield start
    for sender, err in senders:
        failed = sender.poll() not in (None, 0)
        sender.kill()
        sender.wait(10)
        err.close()
        if failed:
            sys.stderr.write(Path(err.name).read_text())


def ask(client, cmd, **fields):
    for _ in range(100):  # the run binds the endpoint once it has started
        try:
            return client.request(cmd, **fields)
        except TimeoutError:
            time.sleep(0.1)
    raise AssertionError("the control endpoint never answered")


def test_status_aberrations_save_and_stop_on_a_running_run(tmp_path, start_run):
    control, runner = start_run(rate_fps=100.0)  # 1152 frames: ~12 s
    client = ControlClient(control, timeout_s=2.0)
    try:
        assert ask(client, "status")["ok"]
        deadline = time.monotonic() + 30
        model = ask(client, "aberrations")
        while not model.get("model") and time.monotonic() < deadline:  # a live model comes
            time.sleep(0.2)
            model = ask(client, "aberrations")
        assert model["model"] and model["method"] == "tiles"
        assert model["defocus_A"] == pytest.approx(15000.0, rel=0.1)
        # (the first live models come from a few tiles, without errors: then they are empty)
        assert not model["errors"] or set(model["errors"]) >= {"C10_A", "rotation_rad"}
        mid = ask(client, "status")
        assert isinstance(mid["series"], int) and 0 < mid["frames_received"] < 1152
        saved = ask(client, "save", path="now.h5")
        assert saved["ok"], saved
        with h5py.File(tmp_path / "now.h5") as f:
            assert f["tcbf/image"].ndim == 2 and f["acquisition"].attrs["frames_received"] > 0
        assert ask(client, "save", path="img.npy")["ok"]
        assert np.load(tmp_path / "img.npy").ndim == 2
        again = ask(client, "save", path="now.h5")
        assert not again["ok"] and "exists" in again["error"]
        assert ask(client, "save", path="now.h5", overwrite=True)["ok"]
        outside = ask(client, "save", path="../escape.h5")
        assert not outside["ok"] and not (tmp_path.parent / "escape.h5").exists()
        assert not ask(client, "reboot")["ok"]
        stopped = ask(client, "stop")
        assert stopped == {"ok": True, "stopping": True}
        runner.join(30)
        assert not runner.is_alive()
        assert runner.codes and runner.codes[0] in (0, 3)  # stopped early: incomplete (3)
        with h5py.File(tmp_path / "r.h5") as f:
            assert f["acquisition"].attrs["frames_received"] < 1152
    finally:
        client.close()


def test_bad_requests_get_an_error_and_the_endpoint_stays_up(start_run):
    """Malformed requests are answered with an error; one over the size cap is dropped by
    ZeroMQ with its connection (MAXMSGSIZE), before it is read; the endpoint answers on."""
    control, runner = start_run(rate_fps=100.0)
    ctx = zmq.Context.instance()
    client = ControlClient(control, timeout_s=2.0)
    try:
        assert ask(client, "status")["ok"]
        for raw in (b"not json", b"[1, 2]", b'{"no": "cmd"}', b"\xff\xfe",
                    b"x" * (MAX_REQUEST_BYTES + 1)):  # fmt: skip
            req = ctx.socket(zmq.REQ)
            req.connect(control)
            req.send(raw)
            answered = req.poll(1500)
            reply = json.loads(req.recv()) if answered else None
            req.close(linger=0)
            if len(raw) > MAX_REQUEST_BYTES:
                assert reply is None
            else:
                assert reply["ok"] is False and reply["error"]
        assert ask(client, "status")["ok"]  # still answering
        ask(client, "stop")
        runner.join(30)
    finally:
        client.close()


def test_the_control_command_prints_the_reply_and_exits_by_it(start_run):
    control, runner = start_run(rate_fps=300.0)
    client = ControlClient(control, timeout_s=2.0)
    ask(client, "status")  # the endpoint is up
    client.close()
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["control", "status", "--connect", control])
    assert code == 0 and json.loads(out.getvalue())["ok"]
    with redirect_stdout(io.StringIO()):
        assert main(["control", "save", "--path", "../x.h5", "--connect", control]) == 1
        assert main(["control", "stop", "--connect", control]) == 0
    runner.join(30)
    nobody = f"tcp://127.0.0.1:{free_port()}"
    assert main(["control", "status", "--connect", nobody, "--timeout", "0.3"]) == 4


def test_control_beyond_loopback_needs_curve_keys(tmp_path, capsys):
    code = main(["run", "--headless", "--output", str(tmp_path / "r.h5"),
                 "--control", "tcp://0.0.0.0:5999"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--control beyond loopback needs CURVE keys" in err
    assert "Traceback" not in err and not (tmp_path / "r.h5").exists()
