"""What the viewer shows, built from the engine: `view_state(result)` and `EngineStates`.

A view state is a flat dict of scalars and numpy arrays (copies) from one consistent read-out of
a series (`SeriesResult`). Its schema and wire codec are the viewer's own contract
(`tcbf_live.viewer.state`): this module only builds states, and `EngineStates` hands the newest
one to an in-process viewer or to the result-stream publisher, once per change.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tcbf_live.stream.result import POSITION_MAPS, SeriesResult
from tcbf_live.stream.tcbf.dose import half_bit_threshold
from tcbf_live.viewer.state import StateError, decode_state, encode_state

__all__ = ["EngineStates", "StateError", "decode_state", "encode_state", "state_key",
           "view_state"]  # fmt: skip


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def view_state(result: SeriesResult, rejected: int = 0) -> dict[str, Any]:
    """Everything the panels draw, from one consistent read-out of a series."""
    info = result.info
    cal = result.calibration
    s: dict[str, Any] = {
        "series_id": int(info.series_id),
        "scan_shape": [int(n) for n in info.scan_shape],
        "step_A": info.step_A,
        "energy_eV": info.energy_eV,
        "frames_received": int(result.frames_received),
        "frames_expected": int(result.frames_expected),
        "frames_missing": int(result.frames_missing),
        "frames_per_s": float(result.frames_per_s),
        "rejected": int(rejected),
        "frames_excluded": int(result.frames_excluded),
        "suspect": [str(x) for x in result.suspect],
        "complete": bool(result.complete),
        "dose_e_per_A2": float(result.dose_e_per_A2),
        "electrons_total": float(result.electrons_total),
        "bins": [int(b) for b in result.bins],
        "hits": np.ascontiguousarray(result.hits > 0, dtype=np.uint8),
        **{name: _f32(getattr(result, name)) for name, m in POSITION_MAPS.items() if m.view},
        "projected_dose_e_per_A2": float(result.projected_dose_e_per_A2),
        "beam_current_pA": result.beam_current_pA,
    }
    if cal is not None:
        s.update(
            center_px=[float(c) for c in cal.center_px],
            radius_px=float(cal.radius_px),
            axial_radius_px=float(result.axial_radius_px),
            angular_sampling_mrad=cal.angular_sampling_mrad,
            mean_pattern=_f32(cal.mean_pattern),
            bf_pixels=np.ascontiguousarray(cal.bf_pixels, dtype=np.int32),
        )
        if result.tile_members:
            s["tile_members"] = np.ascontiguousarray(np.stack(result.tile_members), np.int32)
    if result.tcbf is not None:
        s.update(_tcbf_keys(result.tcbf, info.step_A))
    return s


def _tcbf_keys(t, step_A: float | None) -> dict[str, Any]:
    """The keys of an alignment update (`PipelineResult`): image, shifts, tiles, FRC,
    aberrations."""
    last = t.alignment.iterations[-1] if t.alignment.iterations else None
    s: dict[str, Any] = dict(
        tcbf_image=_f32(t.image),
        tcbf_sampling_A=t.sampling_A,
        tcbf_upsampling=int(t.upsampling_factor),
        tcbf_phase_flipped=bool(t.phase_flipped),
        tcbf_frames=int(t.frames),
        tcbf_final=bool(t.final),
        alignment_latency_s=float(t.latency_s),
        schedule=[int(b) for b in t.alignment.schedule],
        errors_px=_f32(t.errors_px),
        bf_k_px=_f32(t.bf_k_px),
        shifts_px=_f32(t.shifts_px),
    )
    if last is not None:
        s.update(tile_bin_px=int(last.bin_px), tile_k_px=_f32(last.k_px),
                 tile_shifts_px=_f32(last.shifts_px),
                 tile_used=np.ascontiguousarray(last.used, np.uint8),
                 tile_quality=_f32(last.quality))  # fmt: skip
        h = t.higher  # the third-order fit to these tiles, and what it leaves (`higher_order`)
        if h is not None and len(h.residuals_A) == len(last.k_px) and step_A:
            s.update(third_order_text=h.text(), tile_residual_px=_f32(h.residuals_A / step_A))
    if t.frc is not None:
        s.update(frc_q_per_A=_f32(t.frc.q_per_A), frc=_f32(t.frc.frc),
                 frc_half_bit=_f32(half_bit_threshold(t.frc.n_pixels)),
                 resolution_A=t.resolution_A, resolution_half_bit_A=t.resolution_half_bit_A,
                 resolution_limited=bool(t.resolution_limited))  # fmt: skip
        if t.resolution_A is not None:
            s["resolution_text"] = t.resolution_text("Å")
    if t.resolution_vs_dose is not None:
        s["resolution_vs_dose"] = _f32(t.resolution_vs_dose)
    if t.dose_for_target_e_per_A2 is not None:
        s["target_resolution_A"] = t.target_resolution_A
        s["dose_for_target_e_per_A2"] = t.dose_for_target_e_per_A2
    s["trust"] = [[x.bin_px, x.min_electrons, x.threshold, bool(x.trusted),
                   x.dose_needed_e_per_A2] for x in t.trust]  # fmt: skip
    if t.ring_bf is not None:
        s.update(ring_bf=_f32(t.ring_bf), ring_radii_px=_f32(t.ring_radii_px))
    ab = t.aberrations
    if ab is not None:
        s["aberrations"] = {
            "defocus_A": ab.defocus_A,
            "C10_A": ab.C10_A,
            "C12_A": ab.C12_A,
            "phi12_deg": math.degrees(ab.phi12_rad),
            "rotation_deg": math.degrees(ab.rotation_rad),
            "transpose": bool(ab.transpose),
            "residual_px": ab.residual_px,
        }
        # the viewer's aberration keys are fixed: the errors as one line (or "unknown")
        s["aberration_errors_text"] = ab.errors_text().strip(" ()")
    if t.alignment.method == "global":  # no tile level gave the model: how it was found
        s["method_text"] = t.alignment.note[:400]
    if t.descan is not None:  # the BF disk's drift (`tcbf.descan`), worded once here
        d, (a, b), (c, e) = t.descan, *t.descan.per_step_px
        s["descan_text"] = (f"descan {d.model}{' (compensated)' * d.compensated}: drift "
                            f"{d.drift_px():.2g} px; per step row {a:+.3g} {b:+.3g}, col "
                            f"{c:+.3g} {e:+.3g} px")  # fmt: skip
    return s


def state_key(result: SeriesResult) -> tuple:
    """Changes whenever a view state built from `result` would: publish/redraw only then."""
    t = result.tcbf
    return (result.info.series_id, result.frames_received, result.complete,
            None if t is None else (t.frames, t.latency_s))  # fmt: skip


class EngineStates:
    """The newest view state of an engine, or None when nothing changed since the last call:
    the in-process viewer's source (`latest`, `close`) and what the publisher sends."""

    def __init__(self, engine):
        self.engine = engine
        self._last: tuple | None = None

    def latest(self) -> dict[str, Any] | None:
        result = self.engine.snapshot()
        if result is None:
            return None
        key = state_key(result)
        if key == self._last:
            return None
        state = view_state(result, sum(self.engine.counters.rejected.values()))
        self._last = key
        return state

    def forget(self) -> None:
        """The next `latest()` returns the current state even if unchanged (it was not sent)."""
        self._last = None

    def close(self) -> None:
        """Nothing to release (the engine belongs to the caller)."""
