"""The coordinator <-> worker link: its messages, their codec and what a worker is told.

Every message is a msgpack header (a map, "t": its kind) followed by raw parts: numpy arrays the
header describes by name, dtype and shape, then any opaque parts (a detector message being
relayed). Nothing is pickled; decoding checks each array against its description (dtype from an
allow-list, byte length = shape) and raises LinkError, which the receiving side counts and
skips.

Kinds, worker -> coordinator: "hello", "ctl" (a detector control message, relayed to every
worker), "first" (the frame message that started a series at a worker), "cal" (frames to
calibrate on), "delta" (a `StateDelta`), "ended" (a series drained), "refused", "beat"
(counters), "credit" (asks for "merged"); coordinator -> worker: "welcome" (a `WorkerConfig`),
"ctl", "cal" (the calibration), "drop" (a series not processed), "merged" (the delta bytes
handled so far: `worker_inbox`), "stop".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack
import numpy as np

from tcbf_live.stream.series import ProcessingSettings
from tcbf_live.stream.shared_segments import PeerSegments
from tcbf_live.stream.tcbf.accumulators import StateDelta
from tcbf_live.stream.tcbf.calibration import Calibration

DTYPES = frozenset({"<f8", "<f4", "<u4", "<u2", "|u1", "<i8", "<i4", "<i2", "|i1"})
MAX_DIMS = 8  # an array of the link has at most this many dimensions
LINK_VERSION = 3  # 2: delta credit ("sent", "merged", "credit"; `worker_inbox`); 3: shared
# segments (a hello's "segments", WorkerConfig.shared, arrays described at a segment offset)
LINK_HWM = 64  # link messages queued each way (deltas are large: a few suffice)
LINK_MAX_BYTES = 1 << 31  # a delta of a large scan (the stack rows of one sync)
DELTA_CREDIT_BYTES = 128 << 20  # a worker's deltas sent and not yet merged (`worker_inbox`)


def credit_share(run_bytes: int, workers: int, index: int = 0) -> int:
    """Worker `index`'s delta credit: its share of the run's (`WorkerPlan.delta_credit_bytes`)
    among the `workers` planned, at most DELTA_CREDIT_BYTES, at least a byte (one delta at a
    time); a worker beyond the plan gets half the last one's, so all together stay within the
    run's credit plus one share (plus a block per worker) however many join."""
    share = run_bytes // max(workers, 1)
    if index >= workers:
        share >>= min(index - workers + 1, 62)
    return min(DELTA_CREDIT_BYTES, max(1, share))


class LinkError(ValueError):
    """A link message that does not decode (counted and skipped by the receiving side)."""


def pack(kind: str, header: dict | None = None, arrays: dict[str, np.ndarray] | None = None,
         raw: list[Any] = (), locate: Callable[[np.ndarray], tuple[int, int] | None] | None = None,
         ) -> list[Any]:  # fmt: skip
    """The parts of one link message. `locate`: where an array lies in memory the receiver
    maps (segment, offset: `memory_reserve.locate`); such an array is described, not sent."""
    descs, parts = [], []
    for k, v in (arrays or {}).items():
        v = np.ascontiguousarray(v)
        where = None if locate is None else locate(v)
        descs.append([k, v.dtype.str, list(v.shape), *(where or ())])
        if where is None:
            parts.append(v)
    return [msgpack.packb({"t": kind, **(header or {}), "arrays": descs}), *parts, *raw]


def unpack(parts: list[Any], segments: PeerSegments | None = None,
           ) -> tuple[str, dict, dict[str, np.ndarray], list[Any]]:  # fmt: skip
    """(kind, header, arrays, raw parts) of a link message; LinkError if malformed. An array
    described in shared memory is read from `segments` (a local worker's, else refused)."""
    try:
        head = msgpack.unpackb(parts[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for hostile bytes
        raise LinkError(f"header does not decode: {type(exc).__name__}") from None
    if not isinstance(head, dict) or not isinstance(head.get("t"), str):
        raise LinkError("header is not a map with a kind")
    descs = head.pop("arrays", [])
    if not isinstance(descs, list):
        raise LinkError("array descriptions are not a list")
    arrays, k = {}, 1
    for desc in descs:
        if (not isinstance(desc, list) or len(desc) not in (3, 5) or not isinstance(desc[0], str)
                or not isinstance(desc[1], str) or desc[1] not in DTYPES
                or not isinstance(desc[2], list) or len(desc[2]) > MAX_DIMS
                or not all(type(n) is int and 0 <= n < 1 << 48 for n in desc[2])):  # fmt: skip
            raise LinkError(f"bad array description {desc!r:.80}")
        name, dtype, shape = desc[:3]
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if len(desc) == 5:
            if segments is None:
                raise LinkError(f"array {name!r} in shared memory from a peer that shares none")
            try:
                data = segments.view(desc[3], desc[4], nbytes, np.dtype(dtype).itemsize)
            except ValueError as err:
                raise LinkError(f"array {name!r}: {err}") from None
        else:
            if k >= len(parts):
                raise LinkError("array descriptions do not match the parts")
            data, k = memoryview(parts[k]).cast("B"), k + 1
            if data.nbytes != nbytes:
                raise LinkError(f"array {name!r}: {data.nbytes} bytes for {shape} {dtype}")
        try:
            arrays[name] = np.frombuffer(data, dtype).reshape(shape)
        except (ValueError, TypeError) as err:  # (what the checks above did not foresee)
            raise LinkError(f"array {name!r}: {err}") from None
    return head.pop("t"), head, arrays, list(parts[k:])


def delta_arrays(delta: StateDelta) -> dict[str, np.ndarray]:
    return {"rows": delta.rows, "seen": delta.seen, "stats": delta.stats, **delta.values}


def delta_nbytes(delta: StateDelta) -> int:
    return sum(a.nbytes for a in delta_arrays(delta).values())


def delta_message(series_id: int, gen: int, delta: StateDelta, final: bool,
                  sent: int = 0, locate: Callable | None = None) -> list[Any]:  # fmt: skip
    """A worker's delta of run `gen` of a series (`sent`: its delta bytes so far, this one
    included: `worker_inbox`; `locate`: `pack`'s, for arrays in shared memory)."""
    return pack("delta", {"sid": series_id, "gen": gen, "final": final, "sent": sent},
                delta_arrays(delta), locate=locate)  # fmt: skip


def delta_from(arrays: dict[str, np.ndarray]) -> StateDelta:
    """The StateDelta of a "delta" message (checked against the series by its receiver)."""
    try:
        rows, seen, stats = arrays.pop("rows"), arrays.pop("seen"), arrays.pop("stats")
    except KeyError as exc:
        raise LinkError(f"delta without {exc}") from None
    return StateDelta(rows, arrays, seen, stats)


def settings_to_dict(p: ProcessingSettings) -> dict:
    """What a worker needs of the run's processing settings, JSON-able (the pipeline's are the
    coordinator's alone: workers accumulate, they do not solve)."""
    mask = None if p.mask is None else [list(np.shape(p.mask)),
                                        np.argwhere(np.asarray(p.mask, bool)).tolist()]  # fmt: skip
    return {
        "metadata": {k: list(v) if isinstance(v, tuple) else v for k, v in p.metadata.items()},
        "calibration_frames": p.calibration_frames,
        "bf_threshold": p.bf_threshold,
        "calibration": None if p.calibration is None else p.calibration.to_json(),
        "mask": mask,
        "bins": None if p.bins is None else list(p.bins),
        "axial_radius_px": p.axial_radius_px,
        "repeat_scans": p.repeat_scans,
    }


def settings_from_dict(d: dict, memory_budget_bytes: int | None) -> ProcessingSettings:
    """The inverse of `settings_to_dict`; LinkError when it does not describe settings."""
    try:
        meta = {k: tuple(v) if isinstance(v, list) else v for k, v in d["metadata"].items()}
        mask = None
        if d["mask"] is not None:
            shape, where = d["mask"]
            mask = np.zeros(tuple(shape), bool)
            idx = np.asarray(where, np.int64).reshape(-1, 2)
            mask[idx[:, 0], idx[:, 1]] = True
        cal = d["calibration"]
        return ProcessingSettings(
            metadata=meta,
            calibration_frames=int(d["calibration_frames"]),
            bf_threshold=float(d["bf_threshold"]),
            calibration=None if cal is None else Calibration.from_json(cal),
            mask=mask,
            bins=None if d["bins"] is None else tuple(d["bins"]),
            axial_radius_px=d["axial_radius_px"],
            repeat_scans=d["repeat_scans"],
            memory_budget_bytes=memory_budget_bytes,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise LinkError(f"processing settings do not decode: {exc!r:.120}") from None


@dataclass(frozen=True)
class WorkerConfig:
    """What the coordinator tells a worker that joins ("welcome"): the detector link to open,
    its share of a PUB stream, how often to send deltas and the bounds it keeps."""

    index: int  # this worker's number (logs, PUB share)
    protocol: str
    endpoint: str  # the detector's (a worker on another host may override it)
    socket_type: str  # "pull" or "sub"
    rcvhwm: int
    max_message_bytes: int
    channel: str | None
    share: tuple[int, int] | None  # PUB streams: keep frame messages k of every n (k, n)
    sync_interval_s: float  # deltas to the coordinator at most this far apart
    backlog_bytes: int  # frames held before their series is known or calibrated
    processing: dict  # `settings_to_dict`
    lane: bool = True  # V1 images through the compiled lane where it can (`stream.fast_lane`)
    row_block_rows: int = 0  # rows of each series' row block (`RowBlock`; 0: sized by bytes)
    delta_credit_bytes: int = DELTA_CREDIT_BYTES  # deltas in flight, at most (`worker_inbox`)
    shared: bool = False  # the coordinator mapped the segments of its hello (`shared_segments`)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        try:
            d = json.loads(text)
            names = {f.name for f in fields(cls)}
            if set(d) != names:
                raise ValueError(f"fields {sorted(set(d) ^ names)}")
            if d["share"] is not None:
                d["share"] = tuple(d["share"])
            return cls(**d)
        except (ValueError, TypeError) as exc:
            raise LinkError(f"worker configuration does not decode: {exc}") from None
