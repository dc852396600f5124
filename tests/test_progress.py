"""`reconstruct`'s progress meter (`stream/cli/progress.py`): frames, frames/s and the time left
on a terminal, redrawn in place; nothing when the output is piped."""

import io

from tcbf_live.stream.cli.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_frames_rate_and_time_left():
    out = Terminal()
    p = Progress(1000, stream=out, interval_s=0.0)
    p.update(250)
    p.update(500)
    p.finish(" aligning ...")
    text = out.getvalue()
    lines = text.split("\r")[1:]
    assert len(lines) == 3 and lines[0].startswith("250/1000 frames (25 %)")
    assert "frames/s" in lines[1] and "s left" in lines[1]
    assert lines[-1].startswith("1000/1000 frames (100 %)") and text.endswith("aligning ...\n")


def test_redraws_are_rate_limited():
    out = Terminal()
    p = Progress(10**6, stream=out, interval_s=60.0)
    for done in range(0, 10**6, 1000):
        p.update(done)
    assert out.getvalue().count("\r") == 1


def test_piped_output_stays_quiet(tmp_path, capsys):
    p = Progress(100, stream=io.StringIO(), interval_s=0.0)
    p.update(50)
    p.finish()
    assert p.stream.getvalue() == ""
    # reconstruct under pytest (stderr captured: not a terminal) prints no meter
    from tcbf_live.detectors.files import write_dataset
    from tcbf_live.simulators import Simulator, tutorial_config
    from tcbf_live.stream.cli.main import main

    sim = Simulator(tutorial_config(scan_shape=(8, 16)))
    cfg, data = sim.cfg, tmp_path / "d.npy"
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, cfg.dtype, sim.ground_truth(),
                  iter([(0, sim.frames(0, sim.n_frames))]))  # fmt: skip
    main(["reconstruct", str(data), "--output", str(tmp_path / "r.h5")])
    err = capsys.readouterr().err
    assert "s left" not in err and "\r" not in err and "reconstructed 128 frames" in err
