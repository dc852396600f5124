"""The operator's window: every figure of the tcBF tutorial as a live panel (pyqtgraph).

`ViewerWindow(source)` polls its source (`viewer.sources`) on a QTimer at `refresh_hz` (redraws
throttled to that rate; nothing in the GUI thread blocks) and draws the newest view state
(`stream.snapshot.view_state`): BF disk and virtual-BF images, alignment tiles, tcBF image,
shift field with the fitted model, dose, and a status bar. Axes carry physical units: Å in real
space, mrad on the detector.
"""

from __future__ import annotations

import colorsys
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtWidgets

log = logging.getLogger("tcbf.viewer")

pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)

COLORMAPS = ("gray", "viridis", "inferno", "magma", "cividis", "CET-D1")


def _plot(title: str, x: str, y: str, invert_y: bool = True) -> pg.PlotWidget:
    w = pg.PlotWidget(title=title)
    w.setLabel("bottom", x)
    w.setLabel("left", y)
    w.setAspectLocked(True)
    if invert_y:
        w.invertY(True)
    return w


def _image(plot: pg.PlotWidget) -> pg.ImageItem:
    item = pg.ImageItem(axisOrder="row-major")
    plot.addItem(item)
    return item


def _circle(radius: float, centre=(0.0, 0.0), n: int = 128) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n)
    return centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)


def tile_colours(members: np.ndarray, bf_pixels: np.ndarray, shape) -> np.ndarray:
    """RGBA (rows, cols, 4) image: one colour per tile, transparent outside the BF disk."""
    rgba = np.zeros((*shape, 4), np.uint8)
    n = int(members.max()) + 1 if members.size else 0
    hues = (np.arange(n) * 0.618034) % 1.0  # golden-ratio hues: neighbours differ
    table = np.array([[int(255 * v) for v in colorsys.hsv_to_rgb(h, 0.65, 0.95)] + [255]
                      for h in hues], np.uint8).reshape(-1, 4)  # fmt: skip
    if n:
        rgba[bf_pixels[:, 0], bf_pixels[:, 1]] = table[members]
    return rgba


class ViewerWindow(QtWidgets.QMainWindow):
    """Live panels fed by a source with `latest()`; optional `save_result(path)` callback."""

    def __init__(self, source, save_result: Callable[[str], None] | None = None,
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
        grid.addWidget(self._bf_panel(), 0, 0)
        grid.addWidget(self._tcbf_panel(), 0, 1)
        grid.addWidget(self._shift_panel(), 0, 2)
        grid.addWidget(self._tiles_panel(), 1, 0)
        grid.addWidget(self._dose_panel(), 1, 1)
        grid.addWidget(self._error_panel(), 1, 2)
        for w in (self.dp_plot, self.tcbf_view, self.shift_plot):
            w.setMinimumHeight(260)
        self.frc_plot.getAxis("bottom").enableAutoSIPrefix(False)

        for c in range(3):
            grid.setColumnStretch(c, 1)
        for r in range(2):
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

    # ------------------------------------------------------------------ panels
    def _box(self, title: str, *widgets) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox(title)
        lay = QtWidgets.QVBoxLayout(box)
        for w in widgets:
            lay.addWidget(w) if isinstance(w, QtWidgets.QWidget) else lay.addLayout(w)
        return box

    def _bf_panel(self) -> QtWidgets.QWidget:
        self.dp_plot = _plot("mean diffraction pattern", "k_y (mrad)", "k_x (mrad)")
        self.dp_image = _image(self.dp_plot)
        self.disk_curve = self.dp_plot.plot(pen=pg.mkPen("c", width=1))
        self.axial_curve = self.dp_plot.plot(pen=pg.mkPen("y", width=2))
        self.axial_plot = _plot("axial virtual BF", "y (Å)", "x (Å)")
        self.axial_image = _image(self.axial_plot)
        self.inc_plot = _plot("incoherent BF", "y (Å)", "x (Å)")
        self.inc_image = _image(self.inc_plot)
        self.axial_slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.axial_slider.setRange(1, 8)
        self.axial_slider.setValue(2)
        self.axial_slider.valueChanged.connect(lambda _: self._draw_bf(force=True))
        self.axial_label = QtWidgets.QLabel("axial radius")
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.axial_label)
        row.addWidget(self.axial_slider)
        images = QtWidgets.QGridLayout()
        images.addWidget(self.dp_plot, 0, 0, 2, 1)
        images.addWidget(self.axial_plot, 0, 1)
        images.addWidget(self.inc_plot, 1, 1)
        images.setColumnStretch(0, 3)
        images.setColumnStretch(1, 2)
        return self._box("BF disk", images, row)

    def _tcbf_panel(self) -> QtWidgets.QWidget:
        self.tcbf_view = pg.ImageView(view=pg.PlotItem())
        self.tcbf_view.view.setLabel("bottom", "y (Å)")
        self.tcbf_view.view.setLabel("left", "x (Å)")
        self.tcbf_view.view.invertY(True)
        self.tcbf_view.ui.roiBtn.hide()
        self.tcbf_view.ui.menuBtn.hide()
        self.cmap = QtWidgets.QComboBox()
        self.cmap.addItems(COLORMAPS)
        self.cmap.currentTextChanged.connect(self._set_cmap)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setFormat("scan %p %")
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("colormap"))
        row.addWidget(self.cmap)
        row.addWidget(self.progress, 1)
        self.tcbf_title = QtWidgets.QLabel("tcBF image: waiting for a shift model")
        return self._box("tcBF image", self.tcbf_title, self.tcbf_view, row)

    def _shift_panel(self) -> QtWidgets.QWidget:
        self.shift_plot = _plot("shifts vs BF pixel (arrows x5)", "k_y (mrad)", "k_x (mrad)")
        self.shift_plot.addLegend(offset=(5, 5))
        self.model_curve = pg.PlotCurveItem(pen=pg.mkPen((120, 120, 255), width=1),
                                            connect="pairs", name="fitted model")  # fmt: skip
        self.tile_curve = pg.PlotCurveItem(pen=pg.mkPen((255, 170, 0), width=2),
                                           connect="pairs", name="measured (tiles)")  # fmt: skip
        self.tile_dots = pg.ScatterPlotItem(size=5, brush=pg.mkBrush(255, 170, 0))
        for item in (self.model_curve, self.tile_curve, self.tile_dots):
            self.shift_plot.addItem(item)
        self.decimate = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.decimate.setRange(1, 16)
        self.decimate.setValue(4)
        self.decimate.valueChanged.connect(lambda _: self._draw_shifts())
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("model: every Nth pixel"))
        row.addWidget(self.decimate)
        self.fit_label = QtWidgets.QLabel("no fit yet")
        self.fit_label.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
        return self._box("shift field", self.shift_plot, row, self.fit_label)

    def _tiles_panel(self) -> QtWidgets.QWidget:
        self.tiles_plot = _plot("alignment tiles", "k_y (mrad)", "k_x (mrad)")
        self.tiles_image = _image(self.tiles_plot)
        self.level = QtWidgets.QComboBox()
        self.level.addItem("current")
        self.level.currentTextChanged.connect(lambda _: self._draw_tiles())
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("bin level"))
        row.addWidget(self.level, 1)
        self.tiles_label = QtWidgets.QLabel("")
        return self._box("alignment bins", self.tiles_plot, row, self.tiles_label)

    def _dose_panel(self) -> QtWidgets.QWidget:
        self.dose_plot = _plot("dose map (e/Å²)", "y (Å)", "x (Å)")
        self.dose_image = _image(self.dose_plot)
        self.frc_plot = pg.PlotWidget(title="FRC of half-sets")
        self.frc_plot.setLabel("bottom", "q (1/Å)")
        self.frc_plot.setYRange(-0.2, 1.0)
        self.frc_curve = self.frc_plot.plot(pen="w")
        self.frc_half_bit = self.frc_plot.plot(pen=pg.mkPen("y", style=QtCore.Qt.PenStyle.DashLine))
        self.frc_plot.addLine(y=0.143, pen=pg.mkPen("c", style=QtCore.Qt.PenStyle.DotLine))
        self.rvd_plot = pg.PlotWidget(title="resolution vs dose")
        self.rvd_plot.setLabel("bottom", "scan dose (e/Å²)")
        self.rvd_plot.setLabel("left", "resolution (Å)")
        self.rvd_curve = self.rvd_plot.plot(pen="w", symbol="o", symbolSize=5)
        self.dose_label = QtWidgets.QLabel("dose: -")
        self.dose_label.setWordWrap(True)
        plots = QtWidgets.QHBoxLayout()
        plots.addWidget(self.dose_plot)
        plots.addWidget(self.frc_plot)
        return self._box("dose", self.dose_label, plots)

    def _error_panel(self) -> QtWidgets.QWidget:
        self.error_plot = pg.PlotWidget(title="alignment self-consistency")
        self.error_plot.setLabel("bottom", "iteration")
        self.error_plot.setLabel("left", "rms tile misfit (px)")
        self.error_curve = self.error_plot.plot(pen="w", symbol="o", symbolSize=6)
        self.error_plot.getAxis("left").enableAutoSIPrefix(False)
        return self._box("alignment error and resolution", self.error_plot, self.rvd_plot)

    # ------------------------------------------------------------------ updates
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
        self._draw_bf(force=new_series)
        self._draw_tcbf()
        self._draw_shifts()
        self._draw_tiles(new_series)
        self._draw_dose()
        self._draw_status()

    def _scan_rect(self, shape, factor: float = 1.0) -> QtCore.QRectF:
        step = self.state.get("step_A") or 1.0
        rows, cols = shape
        return QtCore.QRectF(0, 0, cols * step / factor, rows * step / factor)

    def _det_rect(self) -> QtCore.QRectF | None:
        s = self.state
        if "mean_pattern" not in s:
            return None
        samp = s.get("angular_sampling_mrad") or 1.0
        qx, qy = s["mean_pattern"].shape
        cx, cy = s["center_px"]
        return QtCore.QRectF(-cy * samp, -cx * samp, qy * samp, qx * samp)

    def _axial_image(self) -> tuple[np.ndarray, float]:
        """vBF of the slider's radius from the ring images (the kernel's axial vBF before)."""
        s = self.state
        if "ring_bf" not in s:
            return s["axial_bf"], s.get("axial_radius_px", 0.0)
        n = min(self.axial_slider.value(), len(s["ring_radii_px"]))
        return s["ring_bf"][:n].sum(axis=0), float(s["ring_radii_px"][n - 1])

    def _draw_bf(self, force: bool = False) -> None:
        s = self.state
        if s is None:
            return
        if "mean_pattern" in s:
            self.dp_image.setImage(s["mean_pattern"], autoLevels=True)
            self.dp_image.setRect(self._det_rect())
            samp = s.get("angular_sampling_mrad") or 1.0
            unit = "mrad" if s.get("angular_sampling_mrad") else "px"
            self.disk_curve.setData(*_circle(s["radius_px"] * samp))
            if force:  # zoom on the disk once per series; the user may zoom after that
                reach = 1.5 * s["radius_px"] * samp
                for plot in (self.dp_plot, self.tiles_plot):
                    plot.setRange(xRange=(-reach, reach), yRange=(-reach, reach), padding=0)

            image, radius = self._axial_image()
            self.axial_curve.setData(*_circle(radius * samp))
            self.axial_label.setText(f"axial radius {radius * samp:.3g} {unit}")
            self.axial_image.setImage(image, autoLevels=True)
            self.axial_image.setRect(self._scan_rect(image.shape))
        inc = s["incoherent_bf"]
        self.inc_image.setImage(inc, autoLevels=True)
        self.inc_image.setRect(self._scan_rect(inc.shape))

    def _draw_tcbf(self) -> None:
        s = self.state
        expected = max(int(s.get("frames_expected", 0)), 1)
        self.progress.setValue(int(100 * min(s.get("frames_received", 0) / expected, 1.0)))
        if "tcbf_image" not in s:
            self.tcbf_title.setText("tcBF image: waiting for a shift model (rows / dose)")
            return
        img = s["tcbf_image"]
        self.tcbf_view.setImage(img, autoRange=False, autoLevels=True, autoHistogramRange=True)
        f = s.get("tcbf_upsampling", 1)
        rect = self._scan_rect((img.shape[0] / f, img.shape[1] / f))
        self.tcbf_view.getImageItem().setRect(rect)
        self.tcbf_view.view.setRange(rect, padding=0)
        errors = s.get("errors_px")
        if errors is not None and len(errors):
            self.error_curve.setData(np.arange(1, len(errors) + 1), np.nan_to_num(errors))
            sched = ",".join(str(b) for b in s.get("schedule", []))
            self.error_plot.setTitle(f"alignment self-consistency (bins {sched})")
        kind = "phase-flipped" if s.get("tcbf_phase_flipped") else "shift-and-add"
        final = ", final" if s.get("tcbf_final") else ""
        self.tcbf_title.setText(f"tcBF image ({kind}, x{f}, {s.get('tcbf_frames', 0)} frames"
                                f"{final})")  # fmt: skip

    def _set_cmap(self, name: str) -> None:
        try:
            self.tcbf_view.setColorMap(pg.colormap.get(name))
        except Exception:  # a colormap missing from this pyqtgraph build
            log.warning("colormap %s is not available", name)

    def _draw_shifts(self) -> None:
        s = self.state
        if s is None or "shifts_px" not in s:
            return
        samp = s.get("angular_sampling_mrad") or 1.0
        scale = 5.0 * samp  # arrows: scan px x 5, drawn in detector units
        k = s["bf_k_px"][:: self.decimate.value()]
        v = s["shifts_px"][:: self.decimate.value()]
        self.model_curve.setData(*self._segments(k * samp, v * scale))
        if "tile_k_px" in s:
            used = s["tile_used"].astype(bool)
            tk, tv = s["tile_k_px"][used], s["tile_shifts_px"][used]
            self.tile_curve.setData(*self._segments(tk * samp, tv * scale))
            self.tile_dots.setData(tk[:, 1] * samp, tk[:, 0] * samp)
        ab = s.get("aberrations")
        if ab:
            self.fit_label.setText(
                f"defocus {ab['defocus_A']:.4g} Å (C10 {ab['C10_A']:.4g} Å)\n"
                f"astigmatism C12 {ab['C12_A']:.3g} Å at {ab['phi12_deg']:.1f}°\n"
                f"rotation {ab['rotation_deg']:.2f}°{'  transposed' if ab['transpose'] else ''}"
                f"\ntile misfit to the model {self._last_error():.3f} px"
            )
        else:
            self.fit_label.setText("shift model in scan px per detector px (no optics given)")

    def _last_error(self) -> float:
        errors = self.state.get("errors_px")
        return float(errors[-1]) if errors is not None and len(errors) else float("nan")

    @staticmethod
    def _segments(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x/y arrays for connect='pairs': (k, k + v) per arrow; x = columns, y = rows."""
        x = np.empty(2 * len(k))
        y = np.empty(2 * len(k))
        x[0::2], x[1::2] = k[:, 1], k[:, 1] + v[:, 1]
        y[0::2], y[1::2] = k[:, 0], k[:, 0] + v[:, 0]
        return x, y

    def _draw_tiles(self, new_series: bool = False) -> None:
        s = self.state
        if s is None or "tile_members" not in s:
            return
        bins = list(s.get("bins", []))
        if new_series or self.level.count() != len(bins) + 1:
            self.level.blockSignals(True)
            self.level.clear()
            self.level.addItems(["current"] + [f"bin {b}" for b in bins])
            self.level.blockSignals(False)
        current = s.get("tile_bin_px")
        choice = self.level.currentText()
        b = current if choice in ("current", "") else int(choice.split()[1])
        if b not in bins:
            b = bins[0] if bins else None
        if b is None:
            return
        lvl = bins.index(b)
        members = s["tile_members"][lvl]
        rgba = tile_colours(members, s["bf_pixels"], s["mean_pattern"].shape)
        self.tiles_image.setImage(rgba, autoLevels=False)
        self.tiles_image.setRect(self._det_rect())
        sched = ",".join(str(x) for x in s.get("schedule", [])) or "none yet"
        mark = " (current level)" if b == current else ""
        self.tiles_label.setText(f"bin {b} px: {int(members.max()) + 1} tiles{mark}; "
                                 f"schedule {sched}")  # fmt: skip

    def _draw_dose(self) -> None:
        s = self.state
        dose = s["dose_map"]
        shown = np.where(s["hits"].astype(bool), dose, np.nan)
        if np.isfinite(shown).any():
            self.dose_image.setImage(np.nan_to_num(shown, nan=0.0), autoLevels=True)
            self.dose_image.setRect(self._scan_rect(dose.shape))
        current = s.get("beam_current_pA")
        lines = [
            f"dose {s.get('dose_e_per_A2', 0):.4g} e/Å² per position, projected "
            f"{s.get('projected_dose_e_per_A2', 0):.4g} e/Å² for the scan; "
            f"{s.get('electrons_total', 0):.4g} e"
            + (f", {current:.3g} pA" if current is not None else "")
        ]
        if s.get("resolution_A") is not None:
            bound = "better than " if s.get("resolution_limited") else ""
            lines.append(f"resolution {bound}{s['resolution_A']:.3g} Å (FRC 0.143), "
                         f"{s['resolution_half_bit_A']:.3g} Å (half-bit)")  # fmt: skip
            self.frc_curve.setData(s["frc_q_per_A"], s["frc"])
            self.frc_half_bit.setData(s["frc_q_per_A"], s["frc_half_bit"])
        if s.get("dose_for_target_e_per_A2") is not None:
            lines.append(f"estimate: {s['target_resolution_A']:g} Å needs "
                         f"~{s['dose_for_target_e_per_A2']:.3g} e/Å²")  # fmt: skip
        if s.get("trust"):
            parts = []
            for b, lowest, thr, ok, needed in s["trust"]:
                more = f" (at ~{needed:.3g} e/Å²)" if not ok and needed else ""
                parts.append(f"{b}: {lowest / thr:.0%}{' ✓' if ok else more}")
            lines.append("tile electrons / threshold: " + ", ".join(parts))
        rvd = s.get("resolution_vs_dose")
        if rvd is not None and len(rvd):
            self.rvd_curve.setData(rvd[:, 0], rvd[:, 1])
        self.dose_label.setText("\n".join(lines))

    def _draw_status(self) -> None:
        s = self.state
        latency = s.get("alignment_latency_s")
        lat = f"{latency * 1e3:.0f} ms" if latency is not None else "-"
        suspect = s.get("suspect") or []
        self.status.setText(
            f"series {s.get('series_id')}  |  {s.get('frames_received')}/"
            f"{s.get('frames_expected')} frames  |  {s.get('frames_per_s', 0):.0f} frames/s  |  "
            f"missing {s.get('frames_missing')}  |  excluded {s.get('frames_excluded', 0)}  |  "
            f"rejected messages {s.get('rejected', 0)}  |  "
            f"alignment update {lat}{'  |  complete' if s.get('complete') else ''}"
            + "".join(f"  |  SUSPECT: {x}" for x in suspect)
        )  # a result not to be trusted (e.g. a missed trigger) is said in red
        self.status.setStyleSheet("color: #d03030;" if suspect else "")

    # ------------------------------------------------------------------ saving
    def save_png(self, path: str) -> bool:
        return self.grab().save(path)

    def panel_pixels(self) -> np.ndarray:
        """The tcBF panel as rendered (H, W) gray levels, for checks and tests."""
        img = self.tcbf_view.getView().scene().views()[0].grab().toImage()
        img = img.convertToFormat(img.Format.Format_Grayscale8)
        ptr = img.constBits()
        arr = np.frombuffer(ptr, np.uint8, count=img.sizeInBytes())
        return arr.reshape(img.height(), img.bytesPerLine())[:, : img.width()].copy()

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
