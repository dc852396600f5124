import os
import socket
import sys

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
