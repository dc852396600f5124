import os
import socket
import sys

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """A crash (abort, segfault) dumps the crashing thread only: a dump of every thread pushes
    the one that matters, and libzmq's or Qt's message above it, out of a CI log's tail."""
    import faulthandler

    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
    except ImportError:  # another pytest: its own dump stands
        return
    fd = config.stash.get(fault_handler_stderr_fd_key, None)
    if fd is not None:
        faulthandler.enable(file=fd, all_threads=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def expect_usage_error(capsys):
    """Run `tcbf-live ARGV...`; assert exit code 2 and exactly one stderr line, no traceback."""
    from tcbf_live.stream.cli.main import main

    def check(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            sys.exit(main(argv))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "error" in err
        return err

    return check


def tutorial_dataset(folder, *reconstruct_flags: str):
    """The tutorial preset (`tutorial_config()`) written as FOLDER/d.npy with its metadata,
    and its `reconstruct` result FOLDER/d.h5 with `reconstruct_flags` (asserted to succeed).
    Returns (dataset, result)."""
    from tcbf_live.detectors.files import write_dataset
    from tcbf_live.simulators import Simulator, tutorial_config
    from tcbf_live.stream.cli.main import main

    sim = Simulator(tutorial_config())
    cfg, data, out = sim.cfg, folder / "d.npy", folder / "d.h5"
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, cfg.dtype, sim.ground_truth(),
                  iter([(0, sim.frames(0, sim.n_frames))]))  # fmt: skip
    assert main(["reconstruct", str(data), "--output", str(out), *reconstruct_flags]) == 0
    return data, out
