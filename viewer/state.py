"""The viewer's contract: the view-state schema and its wire codec (no Qt; imports nothing of
`tcbf_live.stream`).

A view state is a flat dict of scalars and numpy arrays: everything the panels draw, in one
self-contained message, so an in-process viewer and a remote one (over the result stream) draw
the same thing and a viewer that joins late gets the whole picture from its first message. The
engine builds it (`tcbf_live.stream.view_state`); this module says what it may hold.

Wire format (ZeroMQ multipart): part 0 is a msgpack map {"kind": "tcbf-view", "version": 1,
"meta": {scalars}, "arrays": [[name, dtype, shape], ...]}; parts 1.. are the arrays' raw bytes
(C order). A received state is untrusted: `decode_state` caps the header, the number of arrays
and their total size, checks every dtype and byte count, then every key the viewer draws against
the schema (`validate_state`): types and ranges of the scalars (`SCALARS`), each array's dtype
and dimensions (`ARRAYS`), the keys drawn together (`NEEDS`), each array's shape against the
others (scan-sized maps against `scan_shape`, tiles against the BF pixels and `bins`), and every
index array's values against the array it indexes, so nothing drawn from a state can allocate or
read beyond what the message itself holds. Nothing is ever unpickled.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

KIND = "tcbf-view"
VERSION = 1
MAX_STATE_BYTES = 256 << 20  # all arrays of one state
MAX_HEADER_BYTES = 1 << 20  # the msgpack header (a real one is a few kB)
MAX_STATE_ARRAYS = 128  # a real state has ~20
MAX_LIST = 256  # bins, schedule, trust rows
DTYPES = {"<f4", "<f8", "<i4", "<i8", "<u1", "<u2", "<u4", "|u1", "|b1"}


class StateError(ValueError):
    """A result-stream message that cannot be used."""


def encode_state(state: dict[str, Any]) -> list[bytes | memoryview]:
    """The multipart message of a state: a msgpack header, then each array's bytes (no copy)."""
    meta, arrays, parts = {}, [], []
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            a = np.ascontiguousarray(value)
            arrays.append([name, a.dtype.str, list(a.shape)])
            parts.append(memoryview(a.reshape(-1).view(np.uint8)))  # empty arrays too
        else:
            meta[name] = value
    header = {"kind": KIND, "version": VERSION, "meta": meta, "arrays": arrays}
    return [msgpack.packb(header, use_bin_type=True), *parts]


def decode_state(parts: list) -> dict[str, Any]:
    """The state from a multipart message; StateError for anything malformed (see the module
    docstring for what is checked)."""
    if not parts:
        raise StateError("empty message")
    if len(parts) > MAX_STATE_ARRAYS + 1:
        raise StateError(f"{len(parts) - 1} arrays (at most {MAX_STATE_ARRAYS})")
    head = memoryview(parts[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise StateError(f"header of {head.nbytes} bytes (at most {MAX_HEADER_BYTES})")
    try:
        header = msgpack.unpackb(head, raw=False, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types for garbage
        raise StateError(f"header is not msgpack: {exc}") from None
    if not isinstance(header, dict) or header.get("kind") != KIND:
        raise StateError("not a tcbf-view message")
    if header.get("version") != VERSION:
        raise StateError(f"unsupported version {header.get('version')!r}")
    meta, arrays = header.get("meta"), header.get("arrays")
    if not isinstance(meta, dict) or not isinstance(arrays, list) or len(arrays) != len(parts) - 1:
        raise StateError("header does not match the message parts")
    state = {str(k): v for k, v in meta.items()}
    total = 0
    for spec, buf in zip(arrays, parts[1:], strict=True):
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)
                and isinstance(spec[1], str) and isinstance(spec[2], list)
                and len(spec[2]) <= 4 and all(_is_int(n) and n >= 0 for n in spec[2])):  # fmt: skip
            raise StateError(f"bad array description {str(spec)[:80]}")
        name, dtype, shape = spec[0], spec[1], tuple(spec[2])
        if dtype not in DTYPES:
            raise StateError(f"array {name!r}: unsupported dtype {dtype}")
        if name in state:
            raise StateError(f"array {name!r} given twice")
        data = memoryview(buf)
        expected = math.prod(shape) * np.dtype(dtype).itemsize  # exact (Python ints)
        total += expected
        if data.nbytes != expected or total > MAX_STATE_BYTES:
            raise StateError(f"array {name!r}: {data.nbytes} bytes for {shape} {dtype}")
        state[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
    validate_state(state)
    return state


# ---------------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(1 << 63) <= v < 1 << 63


def _is_num(v: Any) -> bool:
    return isinstance(v, float) or _is_int(v)


def _finite(v: Any) -> bool:
    return _is_num(v) and math.isfinite(v)


def _opt(check):
    return lambda v: v is None or check(v)


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_LIST and all(_is_int(b) and b > 0 for b in v)


def _trust_row(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 5 and _is_int(v[0]) and _is_num(v[1])
            and _is_num(v[2]) and v[2] != 0 and isinstance(v[3], bool)
            and (v[4] is None or _is_num(v[4])))  # fmt: skip


ABERRATION_KEYS = {"defocus_A", "C10_A", "C12_A", "phi12_deg", "rotation_deg", "residual_px"}


def _scan_shape(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(n) and n > 0 for n in v)


def _aberrations(v: Any) -> bool:
    return (isinstance(v, dict) and set(v) == ABERRATION_KEYS | {"transpose"}
            and all(_is_num(v[k]) for k in ABERRATION_KEYS)
            and isinstance(v["transpose"], bool))  # fmt: skip


# every scalar key the viewer reads: its check (unknown keys pass: a newer engine may add some)
SCALARS = {
    "series_id": _is_int,
    "scan_shape": _scan_shape,
    "step_A": _opt(lambda v: _finite(v) and v > 0),
    "energy_eV": _opt(_is_num),
    "frames_received": lambda v: _is_int(v) and v >= 0,
    "frames_expected": lambda v: _is_int(v) and v >= 0,
    "frames_missing": _is_int,
    "frames_per_s": _is_num,
    "rejected": lambda v: _is_int(v) and v >= 0,
    "frames_excluded": lambda v: _is_int(v) and v >= 0,
    "suspect": lambda v: (
        isinstance(v, list)
        and len(v) <= 16
        and all(isinstance(x, str) and len(x) <= 1000 for x in v)
    ),
    "complete": lambda v: isinstance(v, bool),
    "dose_e_per_A2": _is_num,
    "electrons_total": _is_num,
    "bins": _int_list,
    "projected_dose_e_per_A2": _is_num,
    "beam_current_pA": _opt(_is_num),
    "center_px": lambda v: isinstance(v, list) and len(v) == 2 and all(map(_finite, v)),
    "radius_px": lambda v: _finite(v) and v >= 0,
    "axial_radius_px": lambda v: _finite(v) and v >= 0,
    "angular_sampling_mrad": _opt(lambda v: _finite(v) and v > 0),
    "tcbf_sampling_A": _opt(_is_num),
    "tcbf_upsampling": lambda v: _is_int(v) and 1 <= v <= 64,
    "tcbf_phase_flipped": lambda v: isinstance(v, bool),
    "tcbf_frames": lambda v: _is_int(v) and v >= 0,
    "tcbf_final": lambda v: isinstance(v, bool),
    "alignment_latency_s": _opt(_is_num),
    "schedule": _int_list,
    "tile_bin_px": _is_int,
    "resolution_A": _opt(_is_num),
    "resolution_half_bit_A": _opt(_is_num),
    "resolution_limited": lambda v: isinstance(v, bool),
    "resolution_text": lambda v: isinstance(v, str) and len(v) <= 200,
    "descan_text": lambda v: isinstance(v, str) and len(v) <= 200,
    "third_order_text": lambda v: isinstance(v, str) and len(v) <= 300,
    "aberration_errors_text": lambda v: isinstance(v, str) and len(v) <= 200,
    "method_text": lambda v: isinstance(v, str) and len(v) <= 400,
    "target_resolution_A": _opt(_is_num),
    "dose_for_target_e_per_A2": _opt(_is_num),
    "trust": lambda v: isinstance(v, list) and len(v) <= MAX_LIST and all(map(_trust_row, v)),
    "aberrations": _aberrations,
}

F4, I4, U1 = "<f4", "<i4", "|u1"
# every array the viewer reads: dtype and number of dimensions (shapes are checked below)
ARRAYS = {
    "incoherent_bf": (F4, 2), "axial_bf": (F4, 2), "hits": (U1, 2), "dose_map": (F4, 2),
    "mean_pattern": (F4, 2), "bf_pixels": (I4, 2), "tile_members": (I4, 2),
    "tcbf_image": (F4, 2), "errors_px": (F4, 1), "bf_k_px": (F4, 2), "shifts_px": (F4, 2),
    "tile_k_px": (F4, 2), "tile_shifts_px": (F4, 2), "tile_used": (U1, 1),
    "tile_quality": (F4, 1), "tile_residual_px": (F4, 2), "frc_q_per_A": (F4, 1),
    "frc": (F4, 1), "frc_half_bit": (F4, 1),
    "resolution_vs_dose": (F4, 2), "ring_bf": (F4, 3), "ring_radii_px": (F4, 1),
}  # fmt: skip
REQUIRED = ("series_id", "scan_shape", "frames_received", "frames_expected", "incoherent_bf",
            "hits", "dose_map")  # fmt: skip
# a key present (and not None) needs these too
NEEDS = {
    "mean_pattern": ("center_px", "radius_px", "axial_bf"),
    "bf_pixels": ("mean_pattern",),
    "tile_members": ("bf_pixels", "bins"),
    "tcbf_image": ("tcbf_upsampling",),
    "bf_k_px": ("shifts_px",),
    "shifts_px": ("bf_k_px",),  # drawn together: each needs the other
    "tile_k_px": ("tile_shifts_px", "tile_used"),
    "tile_shifts_px": ("tile_k_px",),
    "tile_used": ("tile_k_px",),
    "tile_residual_px": ("tile_k_px",),
    "ring_bf": ("ring_radii_px",),
    "ring_radii_px": ("ring_bf",),
    "resolution_A": ("resolution_half_bit_A", "frc_q_per_A", "frc", "frc_half_bit"),
    "resolution_text": ("resolution_A",),
    "dose_for_target_e_per_A2": ("target_resolution_A",),
}


def validate_state(s: dict[str, Any]) -> None:
    """StateError unless every key the viewer reads is well-typed and every shape and index
    agrees with the state's own arrays."""
    for key in REQUIRED:
        if key not in s:
            raise StateError(f"missing {key!r}")
    for key, check in SCALARS.items():
        if key in s and not check(s[key]):
            raise StateError(f"bad value for {key!r}: {str(s[key])[:80]}")
    for key, (dtype, ndim) in ARRAYS.items():
        a = s.get(key)
        if key in s and not (isinstance(a, np.ndarray) and a.dtype.str == dtype
                             and a.ndim == ndim):  # fmt: skip
            raise StateError(f"{key!r} must be a {ndim}-d {dtype} array")
    for key, needed in NEEDS.items():
        if s.get(key) is not None:
            for other in needed:
                if s.get(other) is None:
                    raise StateError(f"{key!r} without {other!r}")

    scan = tuple(s["scan_shape"])
    for key in ("incoherent_bf", "axial_bf", "hits", "dose_map"):
        if key in s and s[key].shape != scan:
            raise StateError(f"{key!r} of shape {s[key].shape} for a {scan} scan")
    if "ring_bf" in s:
        rings = s["ring_bf"]
        if rings.shape[1:] != scan or len(rings) < 1 or s["ring_radii_px"].shape != rings.shape[:1]:
            raise StateError(f"ring images {rings.shape} / radii {s['ring_radii_px'].shape} "
                             f"for a {scan} scan")  # fmt: skip
    if "bf_pixels" in s:
        px, det = s["bf_pixels"], s["mean_pattern"].shape
        if px.shape[1] != 2 or len(px) < 1:
            raise StateError(f"'bf_pixels' of shape {px.shape}")
        if px.min() < 0 or px[:, 0].max() >= det[0] or px[:, 1].max() >= det[1]:
            raise StateError(f"'bf_pixels' outside the {det} detector")
    if "tile_members" in s:
        members, n = s["tile_members"], len(s["bf_pixels"])
        if members.shape != (len(s["bins"]), n):
            raise StateError(f"'tile_members' of shape {members.shape} for {len(s['bins'])} "
                             f"bin levels and {n} BF pixels")  # fmt: skip
        if members.size and (members.min() < 0 or members.max() >= n):
            raise StateError(f"tile indices outside [0, {n})")
    for a, b in (("bf_k_px", "shifts_px"), ("tile_k_px", "tile_shifts_px"),
                 ("tile_k_px", "tile_residual_px")):  # fmt: skip
        if a in s and b in s and (s[a].shape[1:] != (2,) or s[b].shape != s[a].shape):
            raise StateError(f"{a!r} {s[a].shape} and {b!r} {s[b].shape} must be (n, 2)")
    if "tile_k_px" in s:
        n = len(s["tile_k_px"])
        for key in ("tile_used", "tile_quality"):
            if key in s and s[key].shape != (n,):
                raise StateError(f"{key!r} of shape {s[key].shape} for {n} tiles")
    frc = [s[k].shape for k in ("frc_q_per_A", "frc", "frc_half_bit") if k in s]
    if len(set(frc)) > 1:
        raise StateError(f"FRC arrays of different lengths {frc}")
    if "resolution_vs_dose" in s and s["resolution_vs_dose"].shape[1:] not in ((2,), (4,)):
        raise StateError("'resolution_vs_dose' must be (n, 2) or (n, 4) (with its range)")
