"""Small pyqtgraph/Qt building blocks the panels share: plots with physical axes, image items,
titled boxes, rows of controls, and where scan and detector images lie (Å, mrad)."""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtWidgets

pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)

State = dict[str, Any]


def plot_widget(title: str, x: str, y: str, invert_y: bool = True) -> pg.PlotWidget:
    w = pg.PlotWidget(title=title)
    w.setLabel("bottom", x)
    w.setLabel("left", y)
    w.setAspectLocked(True)
    if invert_y:
        w.invertY(True)
    return w


def image_item(plot: pg.PlotWidget) -> pg.ImageItem:
    item = pg.ImageItem(axisOrder="row-major")
    plot.addItem(item)
    return item


def circle(radius: float, centre=(0.0, 0.0), n: int = 128) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n)
    return centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)


def box(title: str, *items) -> QtWidgets.QGroupBox:
    """A titled box stacking widgets and layouts."""
    box = QtWidgets.QGroupBox(title)
    lay = QtWidgets.QVBoxLayout(box)
    for w in items:
        lay.addWidget(w) if isinstance(w, QtWidgets.QWidget) else lay.addLayout(w)
    return box


def controls_row(*items, stretch_last: bool = False) -> QtWidgets.QHBoxLayout:
    row = QtWidgets.QHBoxLayout()
    for i, w in enumerate(items):
        w = QtWidgets.QLabel(w) if isinstance(w, str) else w
        row.addWidget(w, 1 if stretch_last and i == len(items) - 1 else 0)
    return row


def slider(low: int, high: int, value: int) -> QtWidgets.QSlider:
    s = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
    s.setRange(low, high)
    s.setValue(value)
    return s


def sampling_mrad(s: State) -> float:
    """Detector units per px: mrad when the state knows the sampling, else 1 (px)."""
    return s.get("angular_sampling_mrad") or 1.0


def scan_rect(s: State, shape, factor: float = 1.0) -> QtCore.QRectF:
    """Where a scan-sized image of `shape` (divided by `factor`) lies, in Å."""
    step = s.get("step_A") or 1.0
    rows, cols = shape
    return QtCore.QRectF(0, 0, cols * step / factor, rows * step / factor)


def detector_rect(s: State) -> QtCore.QRectF:
    """Where the detector image lies, centred on the BF disk, in mrad (px without sampling)."""
    samp = sampling_mrad(s)
    qx, qy = s["mean_pattern"].shape
    cx, cy = s["center_px"]
    return QtCore.QRectF(-cy * samp, -cx * samp, qy * samp, qx * samp)


def zoom_on_disk(plot: pg.PlotWidget, s: State) -> None:
    reach = 1.5 * s["radius_px"] * sampling_mrad(s)
    plot.setRange(xRange=(-reach, reach), yRange=(-reach, reach), padding=0)


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


def arrow_segments(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x/y arrays for connect='pairs': (k, k + v) per arrow; x = columns, y = rows."""
    x = np.empty(2 * len(k))
    y = np.empty(2 * len(k))
    x[0::2], x[1::2] = k[:, 1], k[:, 1] + v[:, 1]
    y[0::2], y[1::2] = k[:, 0], k[:, 0] + v[:, 0]
    return x, y
