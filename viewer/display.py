"""Can a window open here? Asked before Qt is started, by every window command (`run`, `demo`,
`view`), so a missing library or display is one line and exit code 2, never Qt's abort.

Qt aborts the whole process (SIGABRT, a core dump, a message blaming the installation) when its
platform plugin cannot start: no display, an unreachable one, or the xcb plugin's system
libraries missing. `check_window` answers without importing Qt in this process: the GUI
libraries are looked up (not imported); on Linux, unless `QT_QPA_PLATFORM` needs no display
(offscreen, minimal), the display is connected to (the Wayland socket, the X socket
`/tmp/.X11-unix/X<n>` or TCP 6000+n for `host:n`), then a child process starts a
QGuiApplication on it, so a failing plugin aborts the child only; its missing libraries
(`ldd` on the plugin) are named in the answer. Windows and macOS always have their platform
plugin and a screen in a desktop session: only the libraries are checked there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

GUI_MODULES = ("PySide6", "pyqtgraph")
GUI_HINT = 'pip install "tcbf-live[gui]"'
# Debian/Ubuntu packages of the libraries Qt 6's xcb plugin (PySide6 wheels) loads from the
# system: Qt's "Qt for X11 Requirements" and `ldd` on PySide6 6.8's libqxcb.so
XCB_PACKAGES = ("libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 "
                "libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1 libxkbcommon-x11-0 "
                "libegl1 libgl1 libfontconfig1 libdbus-1-3")  # fmt: skip
NO_DISPLAY_PLATFORMS = {"offscreen", "minimal"}
CONNECT_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 30.0
PROBE = ("from PySide6.QtGui import QGuiApplication\n"
         "app = QGuiApplication(['tcbf-live'])\n"
         "print(app.platformName())\n")  # fmt: skip


class WindowUnavailable(Exception):
    """No window can open here; the message names the cause and the fix (one line)."""


def check_window(headless: bool = False, env: Mapping[str, str] | None = None) -> None:
    """WindowUnavailable unless the GUI libraries are installed and (unless `headless`,
    which renders offscreen) a window can open on this machine's display."""
    missing = [name for name in GUI_MODULES if not _installed(name)]
    if missing:
        raise WindowUnavailable(f"the viewer needs {' and '.join(missing)}, which are not "
                                f"installed: {GUI_HINT}")  # fmt: skip
    if headless or sys.platform != "linux":
        return
    env = os.environ if env is None else env
    problem = display_problem(env)
    if problem is None:
        problem = probe_problem(env)
    if problem is not None:
        raise WindowUnavailable(problem)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module that refuses to be found counts as missing
        return False


def display_problem(env: Mapping[str, str]) -> str | None:
    """Why no display can be reached (Linux), or None: the platforms Qt would try, in order."""
    wanted = [p.split(":")[0].strip() for p in env.get("QT_QPA_PLATFORM", "").split(";")]
    wanted = [p for p in wanted if p]
    if any(p in NO_DISPLAY_PLATFORMS or not (p == "xcb" or p.startswith("wayland"))
           for p in wanted):  # fmt: skip
        return None  # offscreen, minimal, or eglfs, vnc ...: a platform without X or Wayland
    x_display, wayland = env.get("DISPLAY", ""), env.get("WAYLAND_DISPLAY", "")
    if not x_display and not wayland:
        return ("no display for the viewer window (DISPLAY and WAYLAND_DISPLAY are unset): "
                "pass --headless, or start it in a desktop session (ssh -X from afar)")  # fmt: skip
    errors = []
    if wayland:
        error = _wayland_error(wayland, env.get("XDG_RUNTIME_DIR", ""))
        if error is None:
            return None
        errors.append(f"Wayland display {wayland}: {error}")
    if x_display:
        error = _x_error(x_display)
        if error is None:
            return None
        errors.append(f"X display {x_display}: {error}")
    return (f"the display cannot be reached ({'; '.join(errors)}): pass --headless, or check "
            "DISPLAY (ssh -X forwards X from a remote machine)")  # fmt: skip


def _unix_connect(path: str) -> str | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_TIMEOUT_S)
        try:
            s.connect(path)
        except OSError as exc:
            return exc.strerror or type(exc).__name__
    return None


def _wayland_error(name: str, runtime_dir: str) -> str | None:
    path = name if name.startswith("/") else os.path.join(runtime_dir, name)
    return _unix_connect(path)


def _x_error(display: str) -> str | None:
    """None when the X server of `display` ([host]:n[.screen]) accepts a connection."""
    match = re.fullmatch(r"(?P<host>.*):(?P<n>\d+)(?:\.\d+)?", display)
    if match is None:
        return "not a display name ([host]:n)"
    host, n = match["host"], int(match["n"])
    if host in ("", "unix"):
        path = f"/tmp/.X11-unix/X{n}"
        error = _unix_connect(path)
        if error is not None and _unix_connect("\0" + path) is None:  # Linux abstract socket
            return None
        return error
    try:
        socket.create_connection((host.strip("[]"), 6000 + n), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def probe_problem(env: Mapping[str, str]) -> str | None:
    """Start a QGuiApplication in a child process (a failing platform plugin aborts the child,
    not us): None when it starts, else why, with the system libraries the xcb plugin misses."""

    def no_core_dump() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    try:
        child = subprocess.run([sys.executable, "-c", PROBE], env=dict(env), text=True,
                               capture_output=True, timeout=PROBE_TIMEOUT_S,
                               preexec_fn=no_core_dump)  # fmt: skip
    except subprocess.TimeoutExpired:
        return (f"Qt did not open the display within {PROBE_TIMEOUT_S:g} s: pass --headless, "
                "or check DISPLAY")  # fmt: skip
    if child.returncode == 0:
        return None
    missing = missing_xcb_libraries()
    if missing:
        return (f"Qt cannot open a window: its xcb platform plugin misses system libraries "
                f"({', '.join(missing)}); on Debian/Ubuntu: sudo apt-get install {XCB_PACKAGES}"
                ", or pass --headless")  # fmt: skip
    said = [line.strip() for line in child.stderr.splitlines() if line.strip()]
    detail = said[0][:200] if said else f"exit status {child.returncode}"
    return (f"Qt cannot open a window on this display ({detail}): pass --headless; on "
            f"Debian/Ubuntu Qt's xcb plugin needs: {XCB_PACKAGES}")  # fmt: skip


def missing_xcb_libraries() -> list[str]:
    """Shared libraries of PySide6's xcb plugin that the system does not have (`ldd`)."""
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return []
    qt = Path(next(iter(spec.submodule_search_locations))) / "Qt"
    found = []
    for lib in (qt / "plugins" / "platforms" / "libqxcb.so", qt / "lib" / "libQt6XcbQpa.so.6"):
        if not lib.exists():
            continue
        try:
            out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return []
        found += [line.split()[0] for line in out.stdout.splitlines() if "not found" in line]
    return sorted(set(found))
