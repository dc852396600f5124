"""The window's panels, one class each: `build()` makes the widget once, `draw(state)` redraws it
from a view state (`tcbf_live.viewer.state`) and computes nothing heavy (pyqtgraph: data pushed
in, no computation in paint paths).

Axes carry physical units: Å in real space, mrad on the detector (px when the state has no
angular sampling). A new panel is one class here plus one entry in `window.PANELS`; the keys it
reads belong in the state's schema (`viewer.state.SCALARS`/`ARRAYS`, `NEEDS` for keys drawn
together), so a remote state is validated before the panel sees it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtWidgets

from tcbf_live.viewer.plots import (
    State,
    arrow_segments,
    box,
    circle,
    controls_row,
    detector_rect,
    image_item,
    plot_widget,
    sampling_mrad,
    scan_rect,
    slider,
    tile_colours,
    zoom_on_disk,
)

log = logging.getLogger(__name__)

COLORMAPS = ("gray", "viridis", "inferno", "magma", "cividis", "CET-D1")


class Panel(ABC):
    """One box of the window. `state` is the newest state drawn (None before the first), so a
    control of the panel can redraw without a new state."""

    state: State | None = None

    @abstractmethod
    def build(self) -> QtWidgets.QWidget:
        """The panel's widget (called once, in the GUI thread)."""

    @abstractmethod
    def draw(self, state: State, new_series: bool) -> None:
        """Show `state` (`new_series`: the first state of another series)."""


class BfPanel(Panel):
    """Mean diffraction pattern with the BF disk, axial virtual BF (radius slider over the ring
    images) and incoherent BF."""

    def build(self) -> QtWidgets.QWidget:
        self.dp_plot = plot_widget("mean diffraction pattern", "k_y (mrad)", "k_x (mrad)")
        self.dp_plot.setMinimumHeight(260)
        self.dp_image = image_item(self.dp_plot)
        self.disk_curve = self.dp_plot.plot(pen=pg.mkPen("c", width=1))
        self.axial_curve = self.dp_plot.plot(pen=pg.mkPen("y", width=2))
        self.axial_plot = plot_widget("axial virtual BF", "y (Å)", "x (Å)")
        self.axial_image = image_item(self.axial_plot)
        self.inc_plot = plot_widget("incoherent BF", "y (Å)", "x (Å)")
        self.inc_image = image_item(self.inc_plot)
        self.axial_slider = slider(1, 8, 2)
        self.axial_slider.valueChanged.connect(lambda _: self._draw_axial())
        self.axial_label = QtWidgets.QLabel("axial radius")
        images = QtWidgets.QGridLayout()
        images.addWidget(self.dp_plot, 0, 0, 2, 1)
        images.addWidget(self.axial_plot, 0, 1)
        images.addWidget(self.inc_plot, 1, 1)
        images.setColumnStretch(0, 3)
        images.setColumnStretch(1, 2)
        return box("BF disk", images, controls_row(self.axial_label, self.axial_slider))

    def draw(self, state: State, new_series: bool) -> None:
        self.state = s = state
        if "mean_pattern" in s:
            self.dp_image.setImage(s["mean_pattern"], autoLevels=True)
            self.dp_image.setRect(detector_rect(s))
            self.disk_curve.setData(*circle(s["radius_px"] * sampling_mrad(s)))
            if new_series:  # zoom on the disk once per series; the user may zoom after that
                zoom_on_disk(self.dp_plot, s)
            self._draw_axial()
        inc = s["incoherent_bf"]
        self.inc_image.setImage(inc, autoLevels=True)
        self.inc_image.setRect(scan_rect(s, inc.shape))

    def _draw_axial(self) -> None:
        """vBF of the slider's radius from the ring images (the kernel's axial vBF before)."""
        s = self.state
        if s is None or "mean_pattern" not in s:
            return
        if "ring_bf" in s:
            n = min(self.axial_slider.value(), len(s["ring_radii_px"]))
            image, radius = s["ring_bf"][:n].sum(axis=0), float(s["ring_radii_px"][n - 1])
        else:
            image, radius = s["axial_bf"], s.get("axial_radius_px", 0.0)
        samp = sampling_mrad(s)
        unit = "mrad" if s.get("angular_sampling_mrad") else "px"
        self.axial_curve.setData(*circle(radius * samp))
        self.axial_label.setText(f"axial radius {radius * samp:.3g} {unit}")
        self.axial_image.setImage(image, autoLevels=True)
        self.axial_image.setRect(scan_rect(s, image.shape))


class TcbfPanel(Panel):
    """The tcBF image (colormap choice) and the scan progress."""

    def build(self) -> QtWidgets.QWidget:
        self.view = pg.ImageView(view=pg.PlotItem())
        self.view.setMinimumHeight(260)
        self.view.view.setLabel("bottom", "y (Å)")
        self.view.view.setLabel("left", "x (Å)")
        self.view.view.invertY(True)
        self.view.ui.roiBtn.hide()
        self.view.ui.menuBtn.hide()
        self.cmap = QtWidgets.QComboBox()
        self.cmap.addItems(COLORMAPS)
        self.cmap.currentTextChanged.connect(self._set_cmap)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setFormat("scan %p %")
        self.title = QtWidgets.QLabel("tcBF image: waiting for a shift model")
        row = controls_row("colormap", self.cmap, self.progress, stretch_last=True)
        return box("tcBF image", self.title, self.view, row)

    def draw(self, state: State, new_series: bool) -> None:
        self.state = s = state
        expected = max(int(s.get("frames_expected", 0)), 1)
        self.progress.setValue(int(100 * min(s.get("frames_received", 0) / expected, 1.0)))
        if "tcbf_image" not in s:
            self.title.setText("tcBF image: waiting for a shift model (rows / dose)")
            return
        img = s["tcbf_image"]
        self.view.setImage(img, autoRange=False, autoLevels=True, autoHistogramRange=True)
        f = s.get("tcbf_upsampling", 1)
        rect = scan_rect(s, (img.shape[0] / f, img.shape[1] / f))
        self.view.getImageItem().setRect(rect)
        self.view.view.setRange(rect, padding=0)
        kind = "phase-flipped" if s.get("tcbf_phase_flipped") else "shift-and-add"
        final = ", final" if s.get("tcbf_final") else ""
        self.title.setText(f"tcBF image ({kind}, x{f}, {s.get('tcbf_frames', 0)} frames{final})")

    def _set_cmap(self, name: str) -> None:
        try:
            self.view.setColorMap(pg.colormap.get(name))
        except Exception:  # a colormap missing from this pyqtgraph build
            log.warning("colormap %s is not available", name)

    def pixels(self) -> np.ndarray:
        """The image as rendered, (H, W) gray levels, for checks and tests."""
        img = self.view.getView().scene().views()[0].grab().toImage()
        img = img.convertToFormat(img.Format.Format_Grayscale8)
        arr = np.frombuffer(img.constBits(), np.uint8, count=img.sizeInBytes())
        return arr.reshape(img.height(), img.bytesPerLine())[:, : img.width()].copy()


class ShiftPanel(Panel):
    """Measured tile shifts and the fitted shift model as arrows over the BF disk, and the
    aberrations the model gives."""

    def build(self) -> QtWidgets.QWidget:
        self.plot = plot_widget("shifts vs BF pixel (arrows x5)", "k_y (mrad)", "k_x (mrad)")
        self.plot.setMinimumHeight(260)
        self.plot.addLegend(offset=(5, 5))
        self.model_curve = pg.PlotCurveItem(pen=pg.mkPen((120, 120, 255), width=1),
                                            connect="pairs", name="fitted model")  # fmt: skip
        self.tile_curve = pg.PlotCurveItem(pen=pg.mkPen((255, 170, 0), width=2),
                                           connect="pairs", name="measured (tiles)")  # fmt: skip
        self.tile_dots = pg.ScatterPlotItem(size=5, brush=pg.mkBrush(255, 170, 0))
        self.residual_curve = pg.PlotCurveItem(pen=pg.mkPen((230, 40, 40), width=2),
                                               connect="pairs",
                                               name="measured - third-order fit")  # fmt: skip
        for item in (self.model_curve, self.tile_curve, self.tile_dots, self.residual_curve):
            self.plot.addItem(item)
        self.decimate = slider(1, 16, 4)
        self.decimate.valueChanged.connect(lambda _: self.state and self.draw(self.state, False))
        self.fit_label = QtWidgets.QLabel("no fit yet")
        self.fit_label.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
        row = controls_row("model: every Nth pixel", self.decimate)
        return box("shift field", self.plot, row, self.fit_label)

    def draw(self, state: State, new_series: bool) -> None:
        self.state = s = state
        if "shifts_px" not in s:
            return
        samp = sampling_mrad(s)
        scale = 5.0 * samp  # arrows: scan px x 5, drawn in detector units
        k = s["bf_k_px"][:: self.decimate.value()]
        v = s["shifts_px"][:: self.decimate.value()]
        self.model_curve.setData(*arrow_segments(k * samp, v * scale))
        if "tile_k_px" in s:
            used = s["tile_used"].astype(bool)
            tk, tv = s["tile_k_px"][used], s["tile_shifts_px"][used]
            self.tile_curve.setData(*arrow_segments(tk * samp, tv * scale))
            self.tile_dots.setData(tk[:, 1] * samp, tk[:, 0] * samp)
        if "tile_residual_px" in s:  # what the third-order fit leaves, tile by tile
            r = s["tile_residual_px"]
            fitted = np.all(np.isfinite(r), axis=1)
            self.residual_curve.setData(*arrow_segments(s["tile_k_px"][fitted] * samp,
                                                        r[fitted] * scale))  # fmt: skip
        else:
            self.residual_curve.setData([], [])
        ab = s.get("aberrations")
        if not ab:
            self.fit_label.setText("shift model in scan px per detector px (no optics given)")
            return
        errors = s.get("errors_px")
        misfit = float(errors[-1]) if errors is not None and len(errors) else float("nan")
        self.fit_label.setText(
            f"defocus {ab['defocus_A']:.4g} Å (C10 {ab['C10_A']:.4g} Å)\n"
            f"astigmatism C12 {ab['C12_A']:.3g} Å at {ab['phi12_deg']:.1f}°\n"
            f"rotation {ab['rotation_deg']:.2f}°{'  transposed' if ab['transpose'] else ''}"
            + (f"\n{s['method_text']}" if s.get("method_text") else
               f"\ntile misfit to the model {misfit:.3f} px")
            + (f"\n{s['aberration_errors_text']}" if s.get("aberration_errors_text") else "")
            + (f"\nthird order: {s['third_order_text']}" if s.get("third_order_text") else "")
            + (f"\n{s['descan_text']}" if s.get("descan_text") else "")
        )


class TilesPanel(Panel):
    """The alignment tiles of each bin level, one colour per tile over the BF disk."""

    def build(self) -> QtWidgets.QWidget:
        self.plot = plot_widget("alignment tiles", "k_y (mrad)", "k_x (mrad)")
        self.image = image_item(self.plot)
        self.level = QtWidgets.QComboBox()
        self.level.addItem("current")
        self.level.currentTextChanged.connect(lambda _: self.state and self.draw(self.state, False))
        self.label = QtWidgets.QLabel("")
        row = controls_row("bin level", self.level, stretch_last=True)
        return box("alignment bins", self.plot, row, self.label)

    def draw(self, state: State, new_series: bool) -> None:
        self.state = s = state
        if new_series and "mean_pattern" in s:  # once per series, as the BF panel
            zoom_on_disk(self.plot, s)
        if "tile_members" not in s:
            return
        bins = list(s["bins"])
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
        members = s["tile_members"][bins.index(b)]
        self.image.setImage(tile_colours(members, s["bf_pixels"], s["mean_pattern"].shape),
                            autoLevels=False)  # fmt: skip
        self.image.setRect(detector_rect(s))
        sched = ",".join(str(x) for x in s.get("schedule", [])) or "none yet"
        mark = " (current level)" if b == current else ""
        self.label.setText(f"bin {b} px: {int(members.max()) + 1} tiles{mark}; schedule {sched}")


class DosePanel(Panel):
    """Dose map, dose and resolution figures, the FRC of half-sets and the alignment trust."""

    def build(self) -> QtWidgets.QWidget:
        self.plot = plot_widget("dose map (e/Å²)", "y (Å)", "x (Å)")
        self.image = image_item(self.plot)
        self.frc_plot = pg.PlotWidget(title="FRC of half-sets")
        self.frc_plot.setLabel("bottom", "q (1/Å)")
        self.frc_plot.getAxis("bottom").enableAutoSIPrefix(False)
        self.frc_plot.setYRange(-0.2, 1.0)
        self.frc_curve = self.frc_plot.plot(pen="w")
        self.frc_half_bit = self.frc_plot.plot(pen=pg.mkPen("y", style=QtCore.Qt.PenStyle.DashLine))
        self.frc_plot.addLine(y=0.143, pen=pg.mkPen("c", style=QtCore.Qt.PenStyle.DotLine))
        self.label = QtWidgets.QLabel("dose: -")
        self.label.setWordWrap(True)
        return box("dose", self.label, controls_row(self.plot, self.frc_plot))

    def draw(self, state: State, new_series: bool) -> None:
        self.state = s = state
        dose = s["dose_map"]
        shown = np.where(s["hits"].astype(bool), dose, np.nan)
        if np.isfinite(shown).any():
            self.image.setImage(np.nan_to_num(shown, nan=0.0), autoLevels=True)
            self.image.setRect(scan_rect(s, dose.shape))
        if s.get("resolution_A") is not None:
            self.frc_curve.setData(s["frc_q_per_A"], s["frc"])
            self.frc_half_bit.setData(s["frc_q_per_A"], s["frc_half_bit"])
        self.label.setText("\n".join(dose_lines(s)))


def dose_lines(s: State) -> list[str]:
    """The dose panel's text: dose, resolution, the dose estimate for the target, trust."""
    current = s.get("beam_current_pA")
    lines = [
        f"dose {s.get('dose_e_per_A2', 0):.4g} e/Å² per position, projected "
        f"{s.get('projected_dose_e_per_A2', 0):.4g} e/Å² for the scan; "
        f"{s.get('electrons_total', 0):.4g} e"
        + (f", {current:.3g} pA" if current is not None else "")
    ]
    if s.get("resolution_text"):  # worded by the engine (PipelineResult.resolution_text)
        lines.append(s["resolution_text"])
    if s.get("dose_for_target_e_per_A2") is not None:
        lines.append(f"estimate: {s['target_resolution_A']:g} Å needs "
                     f"~{s['dose_for_target_e_per_A2']:.3g} e/Å²")  # fmt: skip
    if s.get("trust"):
        parts = []
        for b, lowest, thr, ok, needed in s["trust"]:
            more = f" (at ~{needed:.3g} e/Å²)" if not ok and needed else ""
            parts.append(f"{b}: {lowest / thr:.0%}{' ✓' if ok else more}")
        lines.append("tile electrons / threshold: " + ", ".join(parts))
    return lines


class ErrorPanel(Panel):
    """The alignment's rms tile misfit per iteration, and resolution against dose."""

    def build(self) -> QtWidgets.QWidget:
        self.plot = pg.PlotWidget(title="alignment self-consistency")
        self.plot.setLabel("bottom", "iteration")
        self.plot.setLabel("left", "rms tile misfit (px)")
        self.plot.getAxis("left").enableAutoSIPrefix(False)
        self.curve = self.plot.plot(pen="w", symbol="o", symbolSize=6)
        self.rvd_plot = pg.PlotWidget(title="resolution vs dose")
        self.rvd_plot.setLabel("bottom", "scan dose (e/Å²)")
        self.rvd_plot.setLabel("left", "resolution (Å)")
        self.rvd_curve = self.rvd_plot.plot(pen="w", symbol="o", symbolSize=5)
        self.rvd_bars = pg.ErrorBarItem(pen=pg.mkPen((200, 200, 200), width=1), beam=0.0)
        self.rvd_plot.addItem(self.rvd_bars)
        return box("alignment error and resolution", self.plot, self.rvd_plot)

    def draw(self, state: State, new_series: bool) -> None:
        self.state = s = state
        errors = s.get("errors_px")
        if errors is not None and len(errors):
            self.curve.setData(np.arange(1, len(errors) + 1), np.nan_to_num(errors))
            sched = ",".join(str(b) for b in s.get("schedule", []))
            self.plot.setTitle(f"alignment self-consistency (bins {sched})")
        rvd = s.get("resolution_vs_dose")
        if rvd is not None and len(rvd):
            self.rvd_curve.setData(rvd[:, 0], rvd[:, 1])
            if rvd.shape[1] == 4:  # the range the FRC's noise allows (worse end NaN: open)
                top = np.nan_to_num(rvd[:, 3] - rvd[:, 1], nan=0.0)
                bottom = np.nan_to_num(rvd[:, 1] - rvd[:, 2], nan=0.0)
                self.rvd_bars.setData(x=rvd[:, 0], y=rvd[:, 1], top=top, bottom=bottom)
