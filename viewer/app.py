"""The one Qt lifecycle of `run`, `demo` and `view`: check, create (or reuse) the QApplication,
show the window until it is closed, Ctrl-C, `seconds` elapse or `should_stop()`, draw the newest
state, save the screenshot, close the window and tear Qt down.

`check_window` (re-exported from `viewer.display`) is called by each command before it starts
anything, and again here: Qt is imported only inside `show_viewer`, so importing this module
costs no Qt. `headless=True` uses Qt's offscreen platform: the same window renders (and saves
PNGs) on a machine without a display.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Callable

from tcbf_live.viewer.display import WindowUnavailable, check_window
from tcbf_live.viewer.sources import Source

__all__ = ["WindowUnavailable", "check_window", "show_viewer"]


def show_viewer(source: Source, *, title: str, headless: bool = False,
                seconds: float | None = None, screenshot: str | None = None,
                save_result: Callable[[str], None] | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
    """Show a `ViewerWindow` on `source` for as long as asked (see the module docstring), then
    save `screenshot` (a PNG) and tear Qt down; WindowUnavailable before anything starts when
    no window can open."""
    check_window(headless)
    app = _qt_app(headless)
    from tcbf_live.viewer.window import ViewerWindow

    window = ViewerWindow(source, save_result=save_result, title=title)
    try:
        _run(window, app, seconds, screenshot, should_stop)
    finally:
        window.close()
        window.deleteLater()
        app.processEvents()
        del window
        _shutdown(app)


def _qt_app(headless: bool):
    """The QApplication (created once); offscreen when headless."""
    if headless:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        # the offscreen plugin warns "does not support propagateSizeHints()" on every redraw
        # (uncategorised); a Python message handler would do but PySide6's leaks references
        os.environ.setdefault("QT_LOGGING_RULES", "default.warning=false")
    from pyqtgraph.Qt import QtWidgets

    return QtWidgets.QApplication.instance() or QtWidgets.QApplication(["tcbf-live"])


def _run(window, app, seconds: float | None, screenshot: str | None,
         should_stop: Callable[[], bool]) -> None:  # fmt: skip
    """The event loop until the window closes, Ctrl-C, `seconds` or `should_stop()`; then the
    newest state is drawn and the screenshot saved."""
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
        signal.signal(signal.SIGINT, previous)


def _shutdown(app) -> None:
    """Tear Qt down before the interpreter does: a QApplication left alive at exit can crash
    PySide6 during finalisation."""
    app.processEvents()
    gc.collect()
    app.shutdown()
