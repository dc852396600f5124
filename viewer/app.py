"""Run a viewer window: Qt application setup, Ctrl-C, timed runs and screenshots.

`headless=True` uses Qt's offscreen platform, so the same window renders (and saves PNGs) on a
machine without a display.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable


def check_display() -> None:
    """A clear error instead of Qt aborting the process when there is no screen."""
    from tcbf_live.stream.cli.common import UsageError

    if os.environ.get("QT_QPA_PLATFORM") or sys.platform != "linux":
        return
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise UsageError("no display for the viewer window: pass --headless")


def qt_app(headless: bool = False):
    """The QApplication (created once); offscreen when headless."""
    if headless:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        # the offscreen plugin warns "does not support propagateSizeHints()" on every redraw
        # (uncategorised); a Python message handler would do but PySide6's leaks references
        os.environ.setdefault("QT_LOGGING_RULES", "default.warning=false")
    from pyqtgraph.Qt import QtWidgets

    return QtWidgets.QApplication.instance() or QtWidgets.QApplication(["tcbf-live"])


def run_window(
    window,
    app,
    seconds: float | None = None,
    screenshot: str | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Show `window` until it is closed, Ctrl-C, `seconds` elapse or `should_stop()`; then
    draw the newest state, save the screenshot and close the window."""
    from pyqtgraph.Qt import QtCore

    previous = signal.signal(signal.SIGINT, lambda *_: app.quit())
    ticker = QtCore.QTimer()  # wakes the interpreter so Ctrl-C and should_stop are seen
    ticker.timeout.connect(lambda: app.quit() if should_stop() else None)
    ticker.start(200)
    if seconds is not None:
        QtCore.QTimer.singleShot(int(seconds * 1000), app.quit)
    window.show()
    try:
        app.exec()
        window.refresh()
        app.processEvents()
        if screenshot:
            window.save_png(screenshot)
    finally:
        ticker.stop()
        window.close()
        window.deleteLater()
        app.processEvents()
        signal.signal(signal.SIGINT, previous)


def shutdown(app) -> None:
    """Tear Qt down before the interpreter does: a QApplication left alive at exit can crash
    PySide6 during finalisation."""
    import gc

    app.processEvents()
    gc.collect()
    app.shutdown()
