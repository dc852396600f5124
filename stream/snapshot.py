"""What the viewer shows, as one self-contained message: `view_state` and its wire codec.

A view state is a flat dict of scalars and numpy arrays built from a `SeriesResult` (copies), so
an in-process viewer and a remote one (over the result stream) draw the same thing, and a viewer
that joins late gets the whole current picture from its first message.

Wire format (ZeroMQ multipart): part 0 is a msgpack map {"kind": "tcbf-view", "version": 1,
"meta": {scalars}, "arrays": [[name, dtype, shape], ...]}; parts 1.. are the arrays' raw bytes
(C order). Decoding checks every dtype against an allowlist and every byte count against the
shape, caps the total size, and never unpickles anything.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from .dose import half_bit_threshold
from .series import SeriesResult

KIND = "tcbf-view"
VERSION = 1
MAX_STATE_BYTES = 256 << 20
DTYPES = {"<f4", "<f8", "<i4", "<i8", "<u1", "<u2", "<u4", "|u1", "|b1"}


class StateError(ValueError):
    """A result-stream message that cannot be used."""


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
        "complete": bool(result.complete),
        "dose_e_per_A2": float(result.dose_e_per_A2),
        "electrons_total": float(result.electrons_total),
        "bins": [int(b) for b in result.bins],
        "incoherent_bf": _f32(result.incoherent_bf),
        "axial_bf": _f32(result.axial_bf),
        "hits": np.ascontiguousarray(result.hits > 0, dtype=np.uint8),
        "dose_map": _f32(result.dose_map),
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
    t = result.tcbf
    if t is not None:
        last = t.alignment.iterations[-1] if t.alignment.iterations else None
        s.update(
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

        if t.frc is not None:
            s.update(frc_q_per_A=_f32(t.frc.q_per_A), frc=_f32(t.frc.frc),
                     frc_half_bit=_f32(half_bit_threshold(t.frc.n_pixels)),
                     resolution_A=t.resolution_A, resolution_half_bit_A=t.resolution_half_bit_A,
                     resolution_limited=bool(t.resolution_limited))  # fmt: skip
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
    return s


def state_key(result: SeriesResult) -> tuple:
    """Changes whenever a view state built from `result` would: publish/redraw only then."""
    t = result.tcbf
    return (result.info.series_id, result.frames_received, result.complete,
            None if t is None else (t.frames, t.latency_s))  # fmt: skip


def encode_state(state: dict[str, Any]) -> list[bytes | memoryview]:
    meta, arrays, parts = {}, [], []
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            a = np.ascontiguousarray(value)
            arrays.append([name, a.dtype.str, list(a.shape)])
            parts.append(memoryview(a).cast("B"))
        else:
            meta[name] = value
    header = {"kind": KIND, "version": VERSION, "meta": meta, "arrays": arrays}
    return [msgpack.packb(header, use_bin_type=True), *parts]


def decode_state(parts: list) -> dict[str, Any]:
    """The state from a multipart message; StateError for anything malformed."""
    if not parts:
        raise StateError("empty message")
    try:
        header = msgpack.unpackb(bytes(parts[0]), raw=False, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types for garbage
        raise StateError(f"header is not msgpack: {exc}") from None
    if not isinstance(header, dict) or header.get("kind") != KIND:
        raise StateError("not a tcbf-view message")
    if header.get("version") != VERSION:
        raise StateError(f"unsupported version {header.get('version')}")
    meta, arrays = header.get("meta"), header.get("arrays")
    if not isinstance(meta, dict) or not isinstance(arrays, list) or len(arrays) != len(parts) - 1:
        raise StateError("header does not match the message parts")
    state = dict(meta)
    total = 0
    for spec, buf in zip(arrays, parts[1:], strict=True):
        try:
            name, dtype, shape = spec
            shape = tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            raise StateError(f"bad array description {spec!r}") from None
        if dtype not in DTYPES or any(n < 0 for n in shape) or len(shape) > 4:
            raise StateError(f"array {name!r}: unsupported dtype/shape {dtype} {shape}")
        data = memoryview(buf)
        expected = math.prod(shape) * np.dtype(dtype).itemsize
        total += expected
        if data.nbytes != expected or total > MAX_STATE_BYTES:
            raise StateError(f"array {name!r}: {data.nbytes} bytes for {shape} {dtype}")
        state[str(name)] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return state
