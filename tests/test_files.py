"""Files and exit codes: nothing overwritten without --overwrite, no output over an input, no
half files, one file per series, refusals before acquisition, exit codes that mean something."""

import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import zmq

from conftest import free_port
from tcbf_live.detectors.native import encode_end, encode_frames, encode_start
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream.cli.exitcodes import ExitCode, run_code, series_code
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.outputs import OutputExists, atomic_output, series_output

SCAN = (8, 12)


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=SCAN))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small recorded dataset (4x5 tutorial scan) with its metadata."""
    path = tmp_path_factory.mktemp("data") / "t.h5"
    assert main(["simulate", "--scan", "4x5", "--quiet", "--save", str(path), "--no-stream"]) == 0
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files left beside the outputs (hidden .NAME.tmp-...)."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def recon(dataset, out, *extra) -> list[str]:
    return ["reconstruct", f"{dataset}:/data", "--energy", "300e3", "--step", "10.67",
            "--semiangle", "4", "--output", str(out), *extra]  # fmt: skip


# ---------------------------------------------------------------- atomic writes


def test_a_failing_writer_leaves_neither_the_target_nor_a_temporary_file(tmp_path, monkeypatch):
    from tcbf_live.stream import hdf5 as results
    from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor

    s = Simulator(tutorial_config(scan_shape=(4, 5)))
    proc = SeriesProcessor(s.series_info(1), ProcessingSettings())
    from tcbf_live.detectors.base import FrameBatch

    proc.add(FrameBatch(1, 0, s.frames(0, s.n_frames)))
    result = proc.result(final=True, complete=True)

    def broken(*_):
        raise OSError("disk full")

    monkeypatch.setattr(results, "write_dose", broken)  # raises after most groups are written
    target = tmp_path / "r.h5"
    with pytest.raises(OSError, match="disk full"):
        results.write_result(target, result, "native")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"earlier result")  # with --overwrite: the old file stays on failure
    with pytest.raises(OSError, match="disk full"):
        results.write_result(target, result, "native", overwrite=True)
    assert target.read_bytes() == b"earlier result" and leftovers(tmp_path) == []

    monkeypatch.undo()
    with pytest.raises(OutputExists):  # no --overwrite: refused, the old file kept
        results.write_result(target, result, "native")
    assert target.read_bytes() == b"earlier result" and leftovers(tmp_path) == []
    results.write_result(target, result, "native", overwrite=True)
    with h5py.File(target) as f:
        assert f["acquisition"].attrs["frames_received"] == 20
    assert leftovers(tmp_path) == []


def test_a_file_created_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "r.h5"
    with pytest.raises(OutputExists), atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
        target.write_bytes(b"appeared meanwhile")
    assert target.read_bytes() == b"appeared meanwhile" and leftovers(tmp_path) == []
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []
    with pytest.raises(OSError, match="was not written"), atomic_output(tmp_path / "x.png"):
        pass  # e.g. Qt failing to save a screenshot without an error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]


def test_series_files_are_numbered_beside_the_output():
    assert series_output("out/r.h5", 1) == Path("out/r.h5")
    assert series_output("out/r.h5", 2) == Path("out/r.series-2.h5")
    assert series_output("r.v1.h5", 3) == Path("r.v1.series-3.h5")


# ---------------------------------------------------------------- simulate --save


@pytest.mark.parametrize("name", ["d.npy", "d.h5", "d.h5:/frames"])
def test_simulate_save_never_replaces_without_overwrite(tmp_path, name, expect_usage_error,
                                                        capsys):  # fmt: skip
    spec = str(tmp_path / name)
    argv = ["simulate", "--scan", "2x3", "--quiet", "--save", spec, "--no-stream"]
    assert main(argv) == 0
    capsys.readouterr()
    path = tmp_path / name.split(":")[0]
    before = digest(path)
    assert "pass --overwrite" in expect_usage_error([*argv, "--seed", "5"])
    assert digest(path) == before
    assert main([*argv, "--seed", "5", "--overwrite"]) == 0
    assert digest(path) != before and leftovers(tmp_path) == []
    if name.endswith(".npy"):  # the .json sidecar counts as part of the file
        path.unlink()
        capsys.readouterr()
        assert "d.json exists" in expect_usage_error(argv)


def test_simulate_save_failing_midway_leaves_no_file(tmp_path, monkeypatch):
    from tcbf_live.simulators import simulate

    real = simulate.Simulator.iter_batches

    def failing(self, batch=64):
        it = real(self, batch)
        yield next(it)
        raise OSError("disk full")

    monkeypatch.setattr(simulate.Simulator, "iter_batches", failing)
    for name in ("d.npy", "d.h5"):
        argv = ["simulate", "--scan", "16x16", "--quiet", "--save", str(tmp_path / name),
                "--no-stream"]  # fmt: skip
        assert main(argv) == 2
        assert list(tmp_path.iterdir()) == []  # no data, no sidecar, no temporary file


# ---------------------------------------------------------------- reconstruct


def test_reconstruct_refuses_to_write_over_its_input(dataset, tmp_path, expect_usage_error):
    before = digest(dataset)
    link = tmp_path / "alias.h5"
    link.symlink_to(dataset)
    relative = os.path.relpath(dataset)
    for out in (dataset, link, relative, f"{dataset.parent}/../{dataset.parent.name}/t.h5"):
        err = expect_usage_error(recon(dataset, out))
        assert "is an input file" in err
        err = expect_usage_error(recon(dataset, out, "--overwrite"))  # not even with it
        assert "is an input file" in err
    assert digest(dataset) == before

    npy = tmp_path / "d.npy"
    np.save(npy, np.zeros((2, 2, 16, 16), np.uint16))
    (tmp_path / "d.json").write_text("{}")
    for out in (npy, tmp_path / "d.json"):  # the sidecar is an input too
        assert "is an input file" in expect_usage_error(["reconstruct", str(npy), "--energy",
                                                         "3e5", "--step", "1", "--output",
                                                         str(out), "--overwrite"])  # fmt: skip


def test_reconstruct_output_checks_and_exit_codes(dataset, tmp_path, expect_usage_error, capsys):
    out = tmp_path / "r.h5"
    assert main(recon(dataset, out)) == ExitCode.COMPLETE
    capsys.readouterr()
    written = digest(out)
    assert "pass --overwrite" in expect_usage_error(recon(dataset, out))
    assert digest(out) == written
    assert main(recon(dataset, out, "--overwrite")) == ExitCode.COMPLETE
    capsys.readouterr()
    assert "is a directory" in expect_usage_error(recon(dataset, tmp_path))
    assert "does not exist" in expect_usage_error(recon(dataset, tmp_path / "no" / "r.h5"))
    assert leftovers(tmp_path) == []

    blank = tmp_path / "blank.npy"  # no bright-field disk: not processable, no file
    np.save(blank, np.zeros((3, 4, 32, 32), np.uint16))
    code = main(["reconstruct", str(blank), "--energy", "3e5", "--step", "1", "--output",
                 str(tmp_path / "b.h5")])  # fmt: skip
    assert code == ExitCode.UNUSABLE and not (tmp_path / "b.h5").exists()


def test_reconstruct_over_the_budget_once_calibrated_is_unusable(dataset, tmp_path, capsys):
    """The BF disk (known at calibration) makes the series too large: exit 5, no file."""
    from tcbf_live.stream.budget import series_bytes

    lower = series_bytes((4, 5), (128, 128), 2, None, 4, frames_expected=20)  # before it
    out = tmp_path / "r.h5"
    code = main(recon(dataset, out, "--memory-budget", str(lower + 1000)))
    err = capsys.readouterr().err
    assert code == ExitCode.UNUSABLE and not out.exists()
    assert "calibrated" in err and "no file written" in err


def test_an_output_folder_that_is_not_writable_is_refused(dataset, tmp_path, expect_usage_error,
                                                          monkeypatch):  # fmt: skip
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anyway: ask as a user would be answered
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != folder)
    try:
        assert "not writable" in expect_usage_error(recon(dataset, folder / "r.h5"))
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


def test_masks_are_checked_before_any_frame_is_used(dataset, tmp_path, expect_usage_error):
    out = tmp_path / "r.h5"
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((64, 64), bool))
    err = expect_usage_error(recon(dataset, out, "--mask", str(small)))
    assert "--mask is 64x64" in err and "128x128" in err
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not an array")
    assert "cannot read --mask" in expect_usage_error(recon(dataset, out, "--mask", str(garbage)))
    np.save(tmp_path / "cube.npy", np.zeros((4, 128, 128), bool))
    assert "2D" in expect_usage_error(recon(dataset, out, "--mask", str(tmp_path / "cube.npy")))
    np.save(tmp_path / "obj.npy", np.array([None, 1], object), allow_pickle=True)
    expect_usage_error(recon(dataset, out, "--mask", str(tmp_path / "obj.npy")))
    assert "is an input file" in expect_usage_error(recon(dataset, small, "--mask", str(small),
                                                          "--overwrite"))  # fmt: skip
    assert not out.exists() and small.stat().st_size > 0

    good = tmp_path / "good.npy"  # the right shape is used
    mask = np.zeros((128, 128), bool)
    mask[0, :3] = True
    np.save(good, mask)
    assert main(recon(dataset, out, "--mask", str(good))) == ExitCode.COMPLETE
    with h5py.File(out) as f:
        assert f["calibration/mask"][0, :3].all()


def test_memory_claims_are_refused_before_acquisition(dataset, tmp_path, endpoint,
                                                      expect_usage_error, capsys):  # fmt: skip
    out = tmp_path / "r.h5"
    run = ["run", "--headless", "--bind", endpoint, "--socket", "pull", "--output", str(out)]
    t0 = time.perf_counter()
    err = expect_usage_error([*run, "--scan", "100000x100000"])
    assert "memory budget" in err and "before acquisition" in err
    assert time.perf_counter() - t0 < 5
    err = expect_usage_error([*run, "--scan", "512x512", "--upsample", "16", "--memory-budget",
                              "1G"])  # fmt: skip
    assert "shift and add" in err
    expect_usage_error([*run, "--memory-budget", "lots"])
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.bind(endpoint)  # nothing was bound
    sock.close(linger=0)
    # the same claims within a larger budget are taken (nothing arrives: exit code 4)
    run[run.index(endpoint)] = f"tcp://127.0.0.1:{free_port()}"
    code = main([*run, "--scan", "512x512", "--upsample", "16", "--memory-budget", "8G",
                 "--timeout", "0.2"])  # fmt: skip
    assert code == ExitCode.EMPTY and not out.exists()
    capsys.readouterr()
    # offline the detector is known, so its buffers count too
    err = expect_usage_error(recon(dataset, out, "--memory-budget", "2M"))
    assert "128x128 detector" in err and not out.exists()


# ---------------------------------------------------------------- run


def push_series(endpoint: str, messages, before_send=None) -> threading.Thread:
    """Send `messages` from a PUSH socket once `run` has bound `endpoint` (in a thread)."""

    def send():
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # writable only once connected
        sock.connect(endpoint)
        if not sock.poll(20_000, zmq.POLLOUT):  # writable once the run has bound (after
            sock.close(linger=0)  # its checks); never bound: the run's code says why
            return
        if before_send is not None:
            before_send()
        for parts in messages:
            if parts == "pause":
                time.sleep(0.3)
                continue
            sock.send_multipart(parts)
        sock.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def run_cli(out, messages, *extra, before_send=None) -> int:
    """`tcbf-live run` on a fresh port (a port just closed may still be held) while
    `messages` are pushed to it."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sender = push_series(endpoint, messages, before_send)
    code = main(["run", "--headless", "--bind", endpoint, "--socket", "pull", "--output",
                 str(out), "--timeout", "1.5", "--align-interval", "0", *extra])  # fmt: skip
    sender.join(10)
    return code


def series(sim, sid, first=0, stop=None, end=True, frames=None):
    frames = sim.frames(0, sim.n_frames) if frames is None else frames
    stop = sim.n_frames if stop is None else stop
    msgs = [encode_start(sim.series_info(sid))]
    msgs += [encode_frames(sid, i, frames[i : min(i + 8, stop)]) for i in range(first, stop, 8)]
    return msgs + ([encode_end(sid, stop - first)] if end else [])


def test_run_exit_codes(sim, tmp_path, capsys):
    out = tmp_path / "r.h5"
    assert run_cli(out, series(sim, 9)) == ExitCode.COMPLETE
    err = capsys.readouterr().err
    assert f"series 9: {sim.n_frames}/{sim.n_frames} frames, 0 missing" in err
    assert f"wrote {out}" in err
    with h5py.File(out) as f:
        assert f["acquisition"].attrs["complete"] and f["acquisition"].attrs["series_id"] == 9

    # frames missing, though the series ended normally
    out = tmp_path / "missing.h5"
    msgs = series(sim, 10)
    del msgs[3]
    assert run_cli(out, msgs) == ExitCode.INCOMPLETE
    assert "8 of 96 frames missing" in capsys.readouterr().err
    with h5py.File(out) as f:
        assert f["acquisition"].attrs["frames_missing"] == 8

    # one frame short with no gap: a suspected missed trigger, never presented as good
    out = tmp_path / "short.h5"
    assert run_cli(out, series(sim, 14, stop=sim.n_frames - 1)) == ExitCode.INCOMPLETE
    assert "suspect: missed trigger" in capsys.readouterr().err

    # the sender stopped mid-series: no end, idle timeout
    out = tmp_path / "partial.h5"
    assert run_cli(out, series(sim, 11, stop=40, end=False)) == ExitCode.INCOMPLETE
    assert "ended before its end message" in capsys.readouterr().err
    with h5py.File(out) as f:
        assert not f["acquisition"].attrs["complete"]

    # nothing at all; a series without frames: no file
    for msgs in ([], [encode_start(sim.series_info(12)), encode_end(12, 0)]):
        out = tmp_path / "empty.h5"
        assert run_cli(out, msgs) == ExitCode.EMPTY
        assert not out.exists()
    assert "no series received" in capsys.readouterr().err

    # frames without a bright-field disk: not processable, no file
    out = tmp_path / "blank.h5"
    blank = np.zeros((sim.n_frames, *sim.cfg.detector_shape), np.uint16)
    assert run_cli(out, series(sim, 13, frames=blank)) == ExitCode.UNUSABLE
    assert not out.exists() and "no usable bright-field disk" in capsys.readouterr().err


def test_run_refuses_a_mask_that_does_not_fit_the_streamed_detector(sim, tmp_path, caplog):
    mask = tmp_path / "mask.npy"
    np.save(mask, np.zeros((64, 64), bool))
    out = tmp_path / "r.h5"
    code = run_cli(out, series(sim, 9), "--mask", str(mask))
    assert code == ExitCode.UNUSABLE and not out.exists()
    assert "--mask is 64x64 but the detector is 128x128 px" in caplog.text


def test_run_output_checks_happen_before_acquisition(tmp_path, expect_usage_error):
    run = ["run", "--headless", "--timeout", "0.1", "--output"]
    out = tmp_path / "r.h5"
    out.write_bytes(b"earlier")
    assert "pass --overwrite" in expect_usage_error([*run, str(out)])
    out.unlink()
    (tmp_path / "r.series-2.h5").write_bytes(b"earlier run")
    assert "earlier run" in expect_usage_error([*run, str(out)])
    assert "is a directory" in expect_usage_error([*run, str(tmp_path)])
    assert "does not exist" in expect_usage_error([*run, str(tmp_path / "x" / "r.h5")])
    mask = tmp_path / "m.npy"
    np.save(mask, np.zeros((128, 128), bool))
    assert "input file" in expect_usage_error([*run, str(mask), "--mask", str(mask),
                                               "--overwrite"])  # fmt: skip
    assert mask.stat().st_size > 0


def test_run_keeps_a_result_whose_output_appeared_meanwhile(sim, tmp_path, capsys):
    out = tmp_path / "r.h5"
    code = run_cli(out, series(sim, 9), before_send=lambda: out.write_bytes(b"other"))
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE and out.read_bytes() == b"other"
    kept = tmp_path / "r.kept-1.h5"
    assert f"series 9 went to {kept}" in err
    with h5py.File(kept) as f:
        assert f["acquisition"].attrs["frames_received"] == sim.n_frames
    assert leftovers(tmp_path) == []


def test_each_series_goes_to_its_own_file(sim, tmp_path, capsys):
    """A sender restarted mid-series: the partial series and the complete one each in their
    own file; the complete one in full, nothing replaced."""
    out = tmp_path / "r.h5"
    msgs = series(sim, 9, stop=40, end=False) + ["pause"] + series(sim, 10)
    assert run_cli(out, msgs) == ExitCode.COMPLETE
    err = capsys.readouterr().err
    second = tmp_path / "r.series-2.h5"
    assert f"wrote {out}" in err and f"wrote {second}" in err
    found = {}
    for path in (out, second):  # numbered in the order the series ended
        with h5py.File(path) as f:
            a = f["acquisition"].attrs
            found[int(a["series_id"])] = (bool(a["complete"]), int(a["frames_received"]))
    assert found == {9: (False, 40), 10: (True, sim.n_frames)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "r.series-2.h5"]

    # a stray start without frames in the middle of a series: no file for it, and the
    # series goes on to its end in r.h5
    folder = tmp_path / "stray"
    folder.mkdir()
    good = series(sim, 11)
    msgs = good[:4] + [encode_start(sim.series_info(77))] + good[4:]
    assert run_cli(folder / "r.h5", msgs) == ExitCode.COMPLETE
    assert [p.name for p in folder.iterdir()] == ["r.h5"]
    with h5py.File(folder / "r.h5") as f:
        a = f["acquisition"].attrs
        assert a["series_id"] == 11 and a["complete"] and a["frames_received"] == sim.n_frames


# ---------------------------------------------------------------- demo, codes


def test_demo_refuses_existing_outputs_before_starting(tmp_path, expect_usage_error):
    png, out = tmp_path / "demo.png", tmp_path / "result.h5"
    png.write_bytes(b"old")
    demo = ["demo", "--headless", "--seconds", "1"]
    assert "--screenshot" in expect_usage_error([*demo, "--screenshot", str(png)])
    out.write_bytes(b"old")
    assert "--output" in expect_usage_error([*demo, "--output", str(out)])
    assert "same file" in expect_usage_error([*demo, "--output", str(out), "--screenshot",
                                              str(out), "--overwrite"])  # fmt: skip
    assert png.read_bytes() == out.read_bytes() == b"old"


def test_readme_demo_command_runs_twice(tmp_path):
    """The README's first command, run again over its own outputs (--overwrite)."""
    import subprocess

    png, out = tmp_path / "demo.png", tmp_path / "result.h5"
    png.write_bytes(b"first run")
    out.write_bytes(b"first run")
    cmd = [sys.executable, "-m", "tcbf_live", "demo", "--headless", "--seconds", "8",
           "--screenshot", str(png), "--output", str(out), "--overwrite"]  # fmt: skip
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stderr, proc.stderr[-2000:]
    with h5py.File(out) as f:
        assert f.attrs["software"] == "tcbf-live"
    assert leftovers(tmp_path) == []


def test_exit_code_of_a_result_and_of_a_run():
    def result(complete=True, frames_missing=0, suspect=()):
        return SimpleNamespace(complete=complete, frames_missing=frames_missing, suspect=suspect)

    assert series_code(result()) == ExitCode.COMPLETE
    assert series_code(result(complete=False)) == ExitCode.INCOMPLETE
    assert series_code(result(frames_missing=2)) == ExitCode.INCOMPLETE
    assert series_code(result(suspect=("missed trigger",))) == ExitCode.INCOMPLETE
    assert run_code([ExitCode.INCOMPLETE, ExitCode.COMPLETE], 0) == ExitCode.COMPLETE
    assert run_code([ExitCode.INCOMPLETE], 3) == ExitCode.INCOMPLETE
    assert run_code([], 1) == ExitCode.UNUSABLE and run_code([], 0) == ExitCode.EMPTY
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5]


def test_run_help_documents_the_exit_codes_and_file_names(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for line in ("0  complete", "2  refused input", "3  incomplete", "4  empty", "5  unusable",
                 "r.series-2.h5", "--overwrite", "--memory-budget"):  # fmt: skip
        assert line in text


@pytest.mark.parametrize(("error", "code"), [(OSError("disk full"), ExitCode.USAGE),
                                             (RuntimeError("bug"), ExitCode.INTERNAL)])  # fmt: skip
def test_run_whose_result_cannot_be_written_says_so(sim, tmp_path, capsys,
                                                    monkeypatch, error, code):  # fmt: skip
    """A write that fails mid-file: no file, no temporary file, and not exit code 0 or 4."""
    from tcbf_live.stream import hdf5 as results

    def broken(*_):
        raise error

    monkeypatch.setattr(results, "write_dose", broken)
    out = tmp_path / "r.h5"
    assert run_cli(out, series(sim, 9)) == code
    assert list(tmp_path.iterdir()) == []
    assert str(error) in capsys.readouterr().err


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_series_writes_the_series_in_progress(sim, tmp_path, signame):
    """Ctrl-C (SIGINT) or a facility script's `kill` (SIGTERM) mid-series: the frames that
    arrived are written (incomplete, exit 3), nothing is lost, no temporary file stays. (Before,
    the interrupt hit `Thread.join`, which then reported the ingest thread ended while it still
    ran: the run exited 4 with no file.)"""
    import signal
    import subprocess

    port = free_port()
    out = tmp_path / "r.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "tcbf_live",
        "run",
        "--socket",
        "pull",
        "--bind",
        f"tcp://127.0.0.1:{port}",
        "--headless",
        "--timeout",
        "60",
        "--output",
        str(out),
    ]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        info = sim.series_info(3)
        frames = sim.frames(0, sim.n_frames)
        half = len(frames) // 2
        push.send_multipart(encode_start(info))
        for first in range(0, half, 16):
            push.send_multipart(encode_frames(3, first, frames[first : first + 16]))
        time.sleep(3.0)  # the frames are in (startup included); the series is still open
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        push.close(linger=0)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == ExitCode.INCOMPLETE, err[-4000:]
    with h5py.File(out) as f:
        assert f["acquisition"].attrs["frames_received"] == half
        assert not f["acquisition"].attrs["complete"]
    assert leftovers(tmp_path) == []


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    """A writer killed mid-write (SIGKILL: no `finally`) leaves a hidden temporary file; the
    next write beside the same output removes it. A live process's temporary file stays."""
    import subprocess

    from tcbf_live.stream.outputs import remove_stale_temporaries

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = tmp_path / f".r.tmp-{int(gone.stdout)}-abcd1234.h5"
    alive = tmp_path / f".r.tmp-{os.getpid()}-abcd1234.h5"
    dead.write_bytes(b"half a file")
    alive.write_bytes(b"being written")
    with atomic_output(tmp_path / "r.h5") as tmp:
        tmp.write_bytes(b"result")
    assert not dead.exists() and alive.exists()
    assert (tmp_path / "r.h5").read_bytes() == b"result"
    assert remove_stale_temporaries(tmp_path / "r.h5") == 0
