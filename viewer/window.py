"""The operator's window: every figure of the tcBF tutorial as a live panel (pyqtgraph).

`ViewerWindow(source)` polls its source (`viewer.sources`) on a QTimer at `refresh_hz` (redraws
throttled to that rate; nothing in the GUI thread blocks) and hands the newest view state
(`viewer.state`) to each panel of `PANELS` (`viewer.panels`), then writes the status bar.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from pyqtgraph.Qt import QtCore, QtWidgets

from tcbf_live.viewer.panels import (
    BfPanel,
    DosePanel,
    ErrorPanel,
    Panel,
    ShiftPanel,
    TcbfPanel,
    TilesPanel,
)
from tcbf_live.viewer.sources import Source

log = logging.getLogger(__name__)

# (panel, grid row, grid column): a new panel is one class in `panels` and one entry here
PANELS: tuple[tuple[type[Panel], int, int], ...] = (
    (BfPanel, 0, 0),
    (TcbfPanel, 0, 1),
    (ShiftPanel, 0, 2),
    (TilesPanel, 1, 0),
    (DosePanel, 1, 1),
    (ErrorPanel, 1, 2),
)
P = TypeVar("P", bound=Panel)


def status_text(s: dict[str, Any]) -> str:
    """The status bar: series, frames, rate, losses, alignment latency, and why a result is
    suspect (e.g. a missed trigger)."""
    latency = s.get("alignment_latency_s")
    lat = f"{latency * 1e3:.0f} ms" if latency is not None else "-"
    return (
        f"series {s.get('series_id')}  |  {s.get('frames_received')}/"
        f"{s.get('frames_expected')} frames  |  {s.get('frames_per_s', 0):.0f} frames/s  |  "
        f"missing {s.get('frames_missing')}  |  excluded {s.get('frames_excluded', 0)}  |  "
        f"rejected messages {s.get('rejected', 0)}  |  "
        f"alignment update {lat}{'  |  complete' if s.get('complete') else ''}"
        + "".join(f"  |  SUSPECT: {x}" for x in s.get("suspect") or [])
    )


class ViewerWindow(QtWidgets.QMainWindow):
    """Live panels fed by a source with `latest()`; optional `save_result(path)` callback."""

    def __init__(self, source: Source, save_result: Callable[[str], None] | None = None,
                 refresh_hz: float = 10.0, title: str = "tcbf-live"):  # fmt: skip
        super().__init__()
        self.source = source
        self.save_result_to = save_result
        self.state: dict[str, Any] | None = None
        self.updates = 0
        self._series = None
        self.setWindowTitle(title)
        self.resize(1500, 900)
        central = QtWidgets.QWidget()
        grid = QtWidgets.QGridLayout(central)
        self.panels: list[Panel] = []
        for cls, r, c in PANELS:
            panel = cls()
            grid.addWidget(panel.build(), r, c)
            self.panels.append(panel)
        for c in range(grid.columnCount()):
            grid.setColumnStretch(c, 1)
        for r in range(grid.rowCount()):
            grid.setRowStretch(r, 1)
        self.setCentralWidget(central)
        self.status = QtWidgets.QLabel("waiting for data ...")
        self.statusBar().addWidget(self.status, 1)
        bar = self.addToolBar("file")
        bar.addAction("Save PNG...", self._ask_png)
        act = bar.addAction("Save result...", self._ask_result)
        act.setEnabled(save_result is not None)
        self.timer = QtCore.QTimer(self)
        self.timer.timeout.connect(self.refresh)
        self.timer.start(int(1000 / refresh_hz))

    def panel(self, cls: type[P]) -> P:
        """The window's panel of class `cls`."""
        return next(p for p in self.panels if isinstance(p, cls))

    def refresh(self) -> None:
        """Poll the source; redraw if there is a new state (never blocks)."""
        try:
            state = self.source.latest()
        except Exception:
            log.exception("viewer source failed")
            return
        if state is not None:
            self.show_state(state)

    def show_state(self, state: dict[str, Any]) -> None:
        new_series = state.get("series_id") != self._series
        self._series = state.get("series_id")
        self.state = state
        self.updates += 1
        for panel in self.panels:
            try:
                panel.draw(state, new_series)
            except Exception:  # one panel's failure leaves the others drawn
                log.exception("drawing the %s failed", type(panel).__name__)
        self.status.setText(status_text(state))
        # a result not to be trusted (e.g. a missed trigger) is said in red
        self.status.setStyleSheet("color: #d03030;" if state.get("suspect") else "")

    def save_png(self, path: str) -> bool:
        return self.grab().save(path)

    def panel_pixels(self) -> np.ndarray:
        """The tcBF panel as rendered (H, W) gray levels, for checks and tests."""
        return self.panel(TcbfPanel).pixels()

    def _ask_png(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save PNG", "tcbf.png", "*.png")
        if path:
            self.save_png(path)

    def _ask_result(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save result", "result.h5", "*.h5")
        if path and self.save_result_to is not None:
            self.save_result_to(path)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.timer.stop()
        super().closeEvent(event)
