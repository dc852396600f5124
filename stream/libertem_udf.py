"""tcBF as a LiberTEM UDF: the accumulate / merge / solve phases on LiberTEM's executors.

`TcbfUDF` carries the engine's phases in LiberTEM's split (docs/architecture.md):

- *accumulate* (`process_partition`): the partition's frames fold into its `AccumulatorState`,
  whose arrays are the UDF's result buffers (one numba call per 256 frames, as the built-in
  engine; no Python per frame);
- *merge* (`merge`): per-position sums are `kind="nav"` buffers, so a partition's slice is
  assigned where it lies in the scan; the counters add. The per-BF-pixel stack thereby stays
  with the workers until the main node merges it, as LiberTEM does for every nav buffer;
- *solve* (`get_results`, on the main node): alignment, aberrations and image of whatever
  has been merged, so `Context.run_udf_iter` (LiberTEM-live's way of showing a scan as it
  is acquired) yields a live model on partial results; `tcbf` holds the `PipelineResult`
  (None: no model yet), `defocus_A` etc. the headline numbers as arrays.

LiberTEM is an optional extra (`pip install "tcbf-live[libertem]"`); this module imports it.
Datasets are in acquisition order (LiberTEM's nav order): a serpentine scan's rows are put
in scan order when the state is built (`state_of`).
"""

from __future__ import annotations

import numpy as np
from libertem.udf.base import UDF

from tcbf_live.detectors.base import SeriesInfo, scan_position
from tcbf_live.stream.series import ProcessingSettings, SeriesError, SeriesProcessor
from tcbf_live.stream.tcbf.accumulators import Accumulators, AccumulatorState
from tcbf_live.stream.tcbf.kernels import ACCEPTED, NEXT_INDEX, OUT_OF_ORDER
from tcbf_live.stream.tcbf.pipeline import Pipeline

BATCH_FRAMES = 256  # frames per kernel call within a partition
# scalar read-outs of the solve phase (NaN where not determined); `tcbf` has everything
HEADLINE = ("defocus_A", "defocus_A_err", "C12_A", "phi12_rad", "rotation_rad", "resolution_A")


class TcbfUDF(UDF):
    """tcBF alignment and reconstruction of a 4D-STEM dataset (or a live acquisition).

    Build it with `TcbfUDF.calibrated(first_frames, ...)` (calibrates like the built-in
    engine) or `TcbfUDF.for_series(processor)` (from a calibrated `SeriesProcessor`).
    Parameters: the prepared `calibration` and tile `layout`, `axial_radius_px`,
    `integer_stack` (unsigned-integer frames), `scan_order`, and for the solve phase the
    pipeline's `acquisition` and `pipeline_settings`; `solve=False` leaves the solve phase to
    the caller (the accumulator buffers only).
    """

    def __init__(self, calibration, layout, axial_radius_px, integer_stack, scan_order,
                 acquisition, pipeline_settings, solve: bool = True):  # fmt: skip
        super().__init__(calibration=calibration, layout=layout, axial_radius_px=axial_radius_px,
                         integer_stack=integer_stack, scan_order=scan_order,
                         acquisition=acquisition, pipeline_settings=pipeline_settings,
                         solve=solve)  # fmt: skip

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_series(cls, proc: SeriesProcessor, solve: bool = True) -> TcbfUDF:
        """The UDF of a calibrated series (the geometry its own accumulators have)."""
        if proc.acc is None:
            raise SeriesError(f"series {proc.info.series_id} is not calibrated")
        acc = proc.acc
        return cls(acc.calibration, acc.tiles_layout, acc.axial_radius_px, acc.integer_stack,
                   proc.info.scan_order, proc.pipeline.acquisition, proc.settings.pipeline,
                   solve)  # fmt: skip

    @classmethod
    def calibrated(cls, frames: np.ndarray, *, scan_shape: tuple[int, int], energy_eV: float,
                   step_A: float, semiangle_mrad: float | None = None,
                   angular_sampling_mrad: float | None = None, counts_per_electron: float = 1.0,
                   scan_order: str = "raster",
                   settings: ProcessingSettings | None = None) -> TcbfUDF:  # fmt: skip
        """Calibrate on `frames` (N, Qx, Qy): the first frames of the scan, or frames of an
        earlier scan with the same optics (a live acquisition cannot be read twice).
        Raises `SeriesError` when they show no usable bright-field disk."""
        frames = np.asarray(frames)
        info = SeriesInfo(series_id=1, scan_shape=tuple(scan_shape),
                          detector_shape=frames.shape[1:], dtype=frames.dtype.str,
                          energy_eV=energy_eV, step_A=step_A, semiangle_mrad=semiangle_mrad,
                          angular_sampling_mrad=angular_sampling_mrad,
                          counts_per_electron=counts_per_electron, scan_order=scan_order,
                          frames_expected=scan_shape[0] * scan_shape[1])  # fmt: skip
        proc = SeriesProcessor(info, settings or ProcessingSettings())
        if not proc.calibrate_on(frames):
            raise SeriesError(f"no usable bright-field disk: {proc.calibration_error}")
        return cls.for_series(proc)

    # ------------------------------------------------------------------ buffers
    def _layout(self) -> dict:
        p = self.params
        return AccumulatorState.layout(1, p.calibration.n_bf, p.layout.total_tiles, 1,
                                       p.integer_stack)  # fmt: skip

    def get_result_buffers(self) -> dict:
        """Every `AccumulatorState` field (per position: `kind="nav"`, the counters:
        "single"), and the solve phase's results (`use="result_only"`). The dataset must be
        the scan (no region of interest, one frame per position): refused otherwise."""
        scan = self.params.acquisition.scan_shape
        nav = tuple(int(n) for n in self.meta.dataset_shape.nav)
        if self.meta.roi is not None or int(np.prod(nav)) != scan[0] * scan[1]:
            raise ValueError(f"TcbfUDF processes the whole scan {scan[0]}x{scan[1]} (one frame "
                             f"per position, no roi); the dataset's navigation is {nav}"
                             + (" with a roi" if self.meta.roi is not None else ""))  # fmt: skip
        out = {}
        for name, (shape, dtype) in self._layout().items():
            if name == "stats":
                out[name] = self.buffer(kind="single", extra_shape=shape, dtype=dtype)
            else:
                out[name] = self.buffer(kind="nav", extra_shape=shape[1:], dtype=dtype)
        out["tcbf"] = self.buffer(kind="single", dtype=object, use="result_only")
        for name in HEADLINE:
            out[name] = self.buffer(kind="single", dtype=np.float64, use="result_only")
        return out

    def get_preferred_input_dtype(self):
        return UDF.USE_NATIVE_DTYPE  # counts stay integers: the uint16 stack, exact sums

    # ------------------------------------------------------------------ accumulate
    def process_partition(self, partition: np.ndarray) -> None:
        """Fold the partition's frames (N, Qx, Qy), indices relative to its first frame."""
        p, n = self.params, partition.shape[0]
        if (partition.dtype.kind == "u") != p.integer_stack:  # e.g. LiberTEM's corrections
            raise ValueError(f"frames of type {partition.dtype} reach a TcbfUDF calibrated on "
                             f"{'unsigned-integer' if p.integer_stack else 'float or signed'} "
                             "frames: calibrate on frames of the dataset's type (LiberTEM "
                             "hands float frames over when dark/gain corrections are given)")
        state = AccumulatorState(**{k: getattr(self.results, k) for k in self._layout()})
        acc = Accumulators((1, n), p.calibration, p.layout, p.axial_radius_px,
                           integer_stack=p.integer_stack, state=state)  # fmt: skip
        for first in range(0, n, BATCH_FRAMES):
            acc.add(first, partition[first : first + BATCH_FRAMES])

    # ------------------------------------------------------------------ merge
    def merge(self, dest, src) -> None:
        """Partitions hold disjoint positions: their slices are assigned; counters add
        (out-of-order and next-index are per partition: `state_of` sets them)."""
        for name in self._layout():
            if name != "stats":
                getattr(dest, name)[:] = getattr(src, name)
        dest.stats[:NEXT_INDEX] += src.stats[:NEXT_INDEX]

    # ------------------------------------------------------------------ solve
    def get_results(self) -> dict:
        p = self.params
        results = {name: getattr(self.results, name) for name in self._layout()}
        model = None
        if p.solve:
            state = state_of(results, p.acquisition.scan_shape, p.scan_order)
            frames = int(state.stats[ACCEPTED])
            complete = bool(np.all(self.meta.get_valid_nav_mask()))
            pipeline = Pipeline(p.acquisition, p.calibration, p.layout, p.pipeline_settings)
            model = pipeline.update(pipeline.inputs(state, frames), final=complete)
        results["tcbf"] = np.array([model], dtype=object)
        for name, value in headline(model).items():
            results[name] = np.array([value], np.float64)
        return results


def headline(model) -> dict[str, float]:
    """The `HEADLINE` numbers of a `PipelineResult` (NaN where not determined)."""
    out = dict.fromkeys(HEADLINE, np.nan)
    ab = model.aberrations if model is not None else None
    if ab is not None:
        err = (ab.errors or {}).get("C10_A", np.nan)  # defocus = -C10: the same error
        out.update(defocus_A=ab.defocus_A, defocus_A_err=err, C12_A=ab.C12_A,
                   phi12_rad=ab.phi12_rad, rotation_rad=ab.rotation_rad)
    if model is not None and model.resolution_A is not None:
        out["resolution_A"] = model.resolution_A
    return out


def state_of(buffers: dict, scan_shape: tuple[int, int], scan_order: str,
             nav: str = "acquisition") -> AccumulatorState:  # fmt: skip
    """The `AccumulatorState` (positions in scan order, `seen` by acquisition index) of the
    UDF's accumulator buffers (arrays or LiberTEM's buffers), whose nav order is `nav`:
    "acquisition" (a live acquisition, a frame stack, a .mib) or "scan" (a 4D array stored
    by position, as `write_dataset` writes it)."""
    n_pos = scan_shape[0] * scan_shape[1]
    arrays = {k: np.asarray(getattr(v, "data", v)) for k, v in buffers.items()}
    for k, a in arrays.items():  # nav: (rows, cols, ...) or flat (positions, ...)
        if k != "stats":
            arrays[k] = a.reshape(n_pos) if a.size == n_pos else a.reshape(n_pos, -1)
    if scan_order != "raster":  # acquisition index i is at scan position at[i]
        rows, cols = scan_position(np.arange(n_pos), scan_shape, scan_order)
        at = rows * scan_shape[1] + cols
        for k, a in arrays.items():
            if nav == "scan" and k == "seen":
                arrays[k] = a[at]  # by position -> by acquisition index
            elif nav == "acquisition" and k not in ("stats", "seen"):
                moved = np.empty_like(a)
                moved[at] = a
                arrays[k] = moved
    stats = arrays["stats"].reshape(-1).copy()
    seen = np.flatnonzero(arrays["seen"])
    stats[OUT_OF_ORDER] = 0  # partitions run in any order: not the acquisition's order
    stats[NEXT_INDEX] = int(seen[-1]) + 1 if seen.size else 0
    return AccumulatorState(**{**arrays, "stats": stats})
