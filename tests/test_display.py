"""Qt optional, no display no abort: headless commands never import Qt and run without PySide6;
window commands without the GUI libraries or without a reachable display say so in one line and
exit 2 (never Qt's SIGABRT), through the one shared check (`viewer.display.check_window`)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from tcbf_live.viewer import display

CLI = [sys.executable, "-m", "tcbf_live"]
QT = ("PySide6", "pyqtgraph", "shiboken6")
BLOCKER = f'''"""Test helper: PySide6 and pyqtgraph cannot be imported in this interpreter."""
import sys


class NoGui:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {QT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, NoGui())
'''


def no_display_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY")}  # fmt: skip
    return {**env, **extra}


@pytest.fixture
def no_gui_env(tmp_path) -> dict[str, str]:
    """An environment whose Python cannot import PySide6 or pyqtgraph (a sitecustomize with a
    meta-path blocker on PYTHONPATH), as on a receiver node installed without the gui extra."""
    site = tmp_path / "nogui"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "QT_QPA_PLATFORM": "offscreen"}


def one_line_exit_2(proc: subprocess.CompletedProcess) -> str:
    """The stderr line of a refused command: exit 2 (no signal, no core dump), one line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


WINDOW_COMMANDS = [
    ["run", "--connect", "tcp://127.0.0.1:1", "--output", "x.h5"],
    ["view", "--connect", "tcp://127.0.0.1:1"],
    ["demo"],
]


def test_the_viewer_state_and_headless_commands_import_no_qt():
    code = ("import sys\n"
            "import tcbf_live.viewer, tcbf_live.viewer.state, tcbf_live.viewer.sources\n"
            "import tcbf_live.viewer.app, tcbf_live.viewer.display\n"
            "import tcbf_live.stream.view_state, tcbf_live.stream.publisher\n"
            "from tcbf_live.stream.cli import main, run, demo, view, reconstruct\n"
            "from tcbf_live.stream.cli import simulate, listen\n"
            "main.build_parser()\n"
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {QT!r})\n"
            "assert not loaded, loaded\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_headless_commands_run_without_pyside6(tmp_path, no_gui_env):
    """simulate --save, reconstruct, listen + simulate, run --headless --publish: all complete
    in an interpreter that cannot import Qt."""
    data, out = tmp_path / "d.h5", tmp_path / "r.h5"

    def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout,
                              env=no_gui_env, cwd=tmp_path)  # fmt: skip

    # the blocker works: a window command refuses, naming the extra
    assert 'pip install "tcbf-live[gui]"' in one_line_exit_2(cli("demo", "--headless",
                                                                 "--seconds", "1"))  # fmt: skip
    made = cli("simulate", "--scan", "16x16", "--quiet", "--save", str(data), "--no-stream")
    assert made.returncode == 0, made.stderr[-2000:]
    rec = cli("reconstruct", f"{data}:/data", "--energy", "300e3", "--step", "10.67",
              "--semiangle", "4", "--output", str(out))  # fmt: skip
    assert rec.returncode in (0, 3) and out.exists(), rec.stderr[-2000:]

    def receive(receiver: list[str], scan: str) -> tuple[int, str, str]:
        """Run a receiving command on a fresh endpoint while `simulate` sends it one series."""
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        proc = subprocess.Popen([*CLI, *receiver, "--connect", endpoint], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=no_gui_env,
                                cwd=tmp_path)  # fmt: skip
        try:
            sent = cli("simulate", "--bind", endpoint, "--scan", scan, "--quiet",
                       "--wait-subscriber", "30")  # fmt: skip
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert sent.returncode == 0, sent.stderr[-2000:]
        return proc.returncode, out, err

    code, _, err = receive(["run", "--headless", "--output", "live.h5", "--timeout", "60",
                            "--publish", f"tcp://127.0.0.1:{free_port()}"], "16x16")  # fmt: skip
    assert code in (0, 3) and "Traceback" not in err, err[-2000:]
    assert (tmp_path / "live.h5").exists()
    code, heard, err = receive(["listen", "--timeout", "30"], "8x8")
    assert code == 0 and "64/64 frames" in heard, err[-2000:]


@pytest.mark.parametrize("argv", WINDOW_COMMANDS, ids=lambda a: a[0])
def test_window_commands_without_the_gui_libraries_name_the_extra(argv, tmp_path, no_gui_env):
    proc = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120,
                          env=no_gui_env, cwd=tmp_path)  # fmt: skip
    line = one_line_exit_2(proc)
    assert 'pip install "tcbf-live[gui]"' in line and "PySide6" in line


@pytest.mark.parametrize("argv", WINDOW_COMMANDS, ids=lambda a: a[0])
def test_window_commands_with_an_unreachable_display_exit_2(argv, tmp_path):
    """DISPLAY=:99 with no X server there and no QT_QPA_PLATFORM: one line, exit 2, no abort."""
    if Path("/tmp/.X11-unix/X99").exists():
        pytest.skip("an X server runs on :99 here")
    proc = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120,
                          env=no_display_env(DISPLAY=":99"), cwd=tmp_path)  # fmt: skip
    line = one_line_exit_2(proc)
    assert "X display :99" in line and "--headless" in line
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_a_display_qt_cannot_use_is_refused_by_the_probe(tmp_path):
    """An "X server" that accepts and hangs up: the display is reachable, Qt's plugin cannot
    start on it (or cannot load at all): the child process aborts, the command says why."""
    server = socket.socket()
    for n in range(80, 100):
        try:
            server.bind(("127.0.0.1", 6000 + n))
            break
        except OSError:
            continue
    else:
        pytest.skip("no free X port 6080-6099")
    server.listen(8)
    server.settimeout(0.2)
    proc = subprocess.Popen([*CLI, "view", "--connect", "tcp://127.0.0.1:1"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=no_display_env(DISPLAY=f"127.0.0.1:{n}"))  # fmt: skip
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            server.accept()[0].close()  # the reachability check, then Qt's connection
        except TimeoutError:
            pass
    server.close()
    _, err = proc.communicate(timeout=60)
    line = one_line_exit_2(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
    assert line.startswith("tcbf-live view: error: Qt cannot open a window")
    assert "--headless" in line
    assert not list(tmp_path.glob("core*"))


def test_display_problem_follows_the_platform_qt_would_use(tmp_path):
    for platform in ("offscreen", "minimal", "offscreen:fontengine=freetype", "vnc;xcb"):
        assert display.display_problem({"QT_QPA_PLATFORM": platform}) is None
    assert "pass --headless" in display.display_problem({})
    assert "unset" in display.display_problem({"QT_QPA_PLATFORM": "xcb"})
    assert "not a display name" in display.display_problem({"DISPLAY": "nonsense"})
    # a listening Wayland socket is a reachable display; a stale one is not
    path = tmp_path / "wayland-7"
    with socket.socket(socket.AF_UNIX) as wl:
        wl.bind(str(path))
        wl.listen(1)
        assert display.display_problem({"WAYLAND_DISPLAY": str(path)}) is None
        assert display.display_problem({"WAYLAND_DISPLAY": "wayland-7",
                                        "XDG_RUNTIME_DIR": str(tmp_path)}) is None  # fmt: skip
    problem = display.display_problem({"WAYLAND_DISPLAY": str(path), "DISPLAY": ":99"})
    assert "Wayland display" in problem and "X display :99" in problem


def test_check_window_headless_needs_only_the_libraries(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    display.check_window(headless=True)  # offscreen: no display needed
    if sys.platform == "linux":
        with pytest.raises(display.WindowUnavailable, match="--headless"):
            display.check_window()
