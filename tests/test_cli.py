"""Command line: clear one-line errors with exit code 2, save/replay, listen end to end."""

import json
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

from tcbf_live.detectors.files import RecordedDataset
from tcbf_live.stream.cli.listen import listen
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.receiver import SubscriberSettings

SMALL = ["--scan", "4x5", "--quiet"]


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--bogus"],
        ["simulate", "--bits", "12"],
        ["simulate", "--scan", "0x4"],
        ["simulate", "--scan", "ax4"],
        ["simulate", "--energy", "nan"],
        ["simulate", "--semiangle", "40"],
        ["simulate", "--defocus", "100", "--C10", "-100"],
        ["simulate", "--batch", "0"],
        ["simulate", "--rate", "-5"],
        ["simulate", "--no-stream"],
        ["simulate", "--bind", "127.0.0.1:5555"],
        ["simulate", "--replay", "missing.npy"],
        ["simulate", "--descan", "1,2"],
        ["listen", "--timeout", "0"],
        ["simulate", "--seed", "-1"],
        ["simulate", "--step", "1e30"],
        ["simulate", "--rolloff", "-3"],
        ["simulate", "--phase-rms", "-1"],
        ["simulate", "--bind", "tcp://nonsense"],
        ["simulate", "--bad-pixels", "20000"],
        ["simulate", "--save", "data.txt", "--no-stream"],
        ["simulate", "--replay", "missing.npy", "--overwrite"],
        ["run", "--headless", "--output", "x.h5", "--memory-budget", "lots"],
        ["run", "--headless", "--output", "x.h5", "--memory-budget", "10"],
        ["run", "--headless", "--output", "x.h5", "--mask", "missing.npy"],
        ["reconstruct", "missing.npy", "--output", "x.h5", "--memory-budget", "-1G"],
        ["frobnicate"],
    ],
)
def test_bad_flags_give_one_line_and_exit_2(argv, expect_usage_error):
    expect_usage_error(argv)


def test_replay_rejects_non_4d_and_physics_flags(tmp_path, capsys):
    bad = tmp_path / "flat.npy"
    np.save(bad, np.zeros((4, 4, 4), np.uint16))
    assert main(["simulate", "--replay", str(bad)]) == 2
    assert "needs the scan shape (--scan)" in capsys.readouterr().err
    assert main(["simulate", "--replay", str(bad), "--scan", "3x2"]) == 2
    assert "does not match 4 frames" in capsys.readouterr().err
    np.save(bad, np.zeros((4, 4), np.uint16))
    assert main(["simulate", "--replay", str(bad)]) == 2
    assert "4D" in capsys.readouterr().err
    good = tmp_path / "ok.npy"
    np.save(good, np.zeros((2, 2, 8, 8), np.uint16))
    assert main(["simulate", "--replay", str(good), "--defocus", "100"]) == 2
    assert "--defocus cannot be combined with --replay" in capsys.readouterr().err
    h5 = tmp_path / "x.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = np.zeros((2, 2, 8), np.uint16)
    assert main(["simulate", "--replay", f"{h5}:/data"]) == 2
    assert main(["simulate", "--replay", f"{h5}:/nothing"]) == 2
    np.save(tmp_path / "f64.npy", np.ones((2, 2, 8, 8)))
    assert main(["simulate", "--replay", str(tmp_path / "f64.npy")]) == 2
    np.save(tmp_path / "empty.npy", np.ones((0, 2, 8, 8), np.uint16))
    assert main(["simulate", "--replay", str(tmp_path / "empty.npy")]) == 2
    (tmp_path / "ok.json").write_text("{not json")
    assert main(["simulate", "--replay", str(good)]) == 2


def test_module_entry_point_gives_one_line_errors():
    """`python -m tcbf_live` must behave like the console script."""
    out = subprocess.run(
        [sys.executable, "-m", "tcbf_live", "simulate", "--batch", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_save_then_replay_streams_identical_frames(tmp_path, endpoint, suffix):
    path = tmp_path / f"data{suffix}"
    assert main(["simulate", *SMALL, "--scan-order", "serpentine", "--save", str(path),
                 "--no-stream", "--seed", "3"]) == 0  # fmt: skip
    data = RecordedDataset(str(path))
    assert data.meta["defocus_A"] == 15000.0 and data.meta["seed"] == 3
    assert data.scan_order == "serpentine"
    if suffix == ".h5":
        with h5py.File(path) as f:
            assert json.loads(f["data"].attrs["tcbf_meta"])["rotation_deg"] == -15.0
            assert f["ground_truth/phase"].attrs["pixel_A"] > 0
    else:
        assert json.loads(path.with_suffix(".json").read_text())["dose_e_per_A2"] == 100.0
    from tcbf_live.simulators import Simulator, tutorial_config

    sim = Simulator(tutorial_config(scan_shape=(4, 5), scan_order="serpentine", seed=3))
    np.testing.assert_array_equal(np.asarray(data.array), sim.datacube())

    received = {}
    from tcbf_live.detectors.base import FrameBatch
    from tcbf_live.detectors.native import NativeDecoder
    from tcbf_live.stream.receiver import StreamCounters, open_socket, receive_events

    sock = open_socket(SubscriberSettings(endpoint=endpoint))
    t = threading.Thread(
        target=main,
        args=(["simulate", "--replay", str(path), "--bind", endpoint, "--wait-subscriber", "5",
               "--quiet", "--batch", "3"],),
    )  # fmt: skip
    t.start()
    for ev in receive_events(sock, NativeDecoder(), StreamCounters(), timeout_s=5):
        if isinstance(ev, FrameBatch):
            for i, f in enumerate(ev.frames):
                received[ev.first + i] = f.copy()
        elif type(ev).__name__ == "SeriesEnd":
            break
    t.join()
    sock.close()
    np.testing.assert_array_equal(np.stack([received[i] for i in range(20)]), sim.frames(0, 20))


def test_listen_and_simulate_end_to_end(endpoint):
    """The README's main job, as two processes."""
    cmd = [sys.executable, "-m", "tcbf_live"]
    listener = subprocess.Popen(
        [*cmd, "listen", "--connect", endpoint, "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sim = subprocess.run(
        [*cmd, "simulate", "--bind", endpoint, "--scan", "8x8", "--wait-subscriber", "20",
         "--compression", "lz4", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out, err = listener.communicate(timeout=60)
    assert sim.returncode == 0, sim.stderr
    assert listener.returncode == 0, err
    assert "scan 8x8 (raster), detector 128x128 <u2" in out
    assert "64/64 frames (0 missing, 0 duplicate)" in out
    e_per_frame = float(out.split(" e/frame")[0].split()[-1])
    assert e_per_frame == pytest.approx(100 * (256 / 24) ** 2, rel=0.01)


def test_listener_reports_late_join(endpoint):
    """A subscriber that joins mid-series says so and decodes only after the start repeat."""
    import io

    out = io.StringIO()
    settings = SubscriberSettings(endpoint=endpoint)
    sender = threading.Thread(
        target=main,
        args=(["simulate", "--bind", endpoint, "--scan", "16x16", "--rate", "100", "--quiet",
               "--batch", "4"],),
    )  # fmt: skip
    sender.start()
    # wait until frames are flowing, then join
    from tcbf_live.stream.receiver import open_socket

    spy = open_socket(settings)
    while not spy.poll(10_000) or b"frames" not in spy.recv_multipart()[0]:
        pass
    spy.close()
    listen(settings, 1, timeout_s=10, out=out)
    sender.join()
    text = out.getvalue()
    assert "joined mid-series" in text and "joined late" in text
    got, expected = text.split(" frames (")[0].split()[-1].split("/")
    assert 0 < int(got) < int(expected) == 256


def test_reconstruct_and_alignment_flags_give_one_line_errors(tmp_path, expect_usage_error):
    data = tmp_path / "d.npy"
    np.save(data, np.zeros((2, 3, 16, 16), np.uint16))
    out = str(tmp_path / "r.h5")
    assert "does not give --energy and --step" in expect_usage_error(
        ["reconstruct", str(data), "--output", out]
    )
    expect_usage_error(["reconstruct", str(tmp_path / "missing.npy"), "--output", out])
    common = ["--energy", "3e5", "--step", "1", "--output", out]
    for bad in (["--bins", "32,12"], ["--bins", "8,16"], ["--bins", "x"], ["--upsample", "0"],
                ["--defocus-sign", "2"], ["--min-tile-electrons", "-1"],
                ["--transfer-fit", "sometimes"]):  # fmt: skip
        expect_usage_error(["reconstruct", str(data), *common, *bad])
    expect_usage_error(["run", "--headless", "--output", out, "--align-interval", "-1"])
    for bad in (["--align-interval", "inf"], ["--align-interval", "1e10"], ["--step", "inf"],
                ["--step", "1e300"], ["--energy", "nan"], ["--axial-radius", "-5"],
                ["--timeout", "inf"]):  # fmt: skip
        expect_usage_error(["run", "--headless", "--output", out, *bad])


def test_an_internal_error_is_one_line_and_exit_code_1(tmp_path, capsys, monkeypatch):
    """A bug (not a bad input) exits 1 with one line; -v adds the traceback to the log."""
    from tcbf_live.stream.cli import reconstruct

    data = tmp_path / "d.npy"
    np.save(data, np.zeros((2, 3, 16, 16), np.uint16))

    def broken(*_):
        raise RuntimeError("boom")

    monkeypatch.setattr(reconstruct, "reconstruct_dataset", broken)
    argv = ["reconstruct", str(data), "--energy", "3e5", "--step", "1", "--output",
            str(tmp_path / "r.h5")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "tcbf-live reconstruct: internal error: RuntimeError: boom (-v: traceback)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy"]
