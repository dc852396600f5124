"""The accumulate and merge phases: the state one receiver accumulates, and how states merge.

`AccumulatorState` declares every per-position sum once (with its merge rule); `Accumulators`
holds the kernel geometry of one series (scan, calibration, tile layout) and folds frame
batches into a state with one numba call (`kernels.accumulate_frames`, no Python per frame).
Several receivers each fill a state of the same geometry; `AccumulatorState.merge` combines
them into exactly what one receiver fed every frame would hold (tests/test_phases.py). The
phases follow LiberTEM's UDF split (process_partition / merge / get_results): docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field, fields, replace

import numpy as np

from tcbf_live.stream.tcbf.calibration import Calibration
from tcbf_live.stream.tcbf.kernels import (
    ACCEPTED,
    DUPLICATE,
    NEXT_INDEX,
    OUT_OF_ORDER,
    OUT_OF_RANGE,
    accumulate_frames,
    add_rows,
)
from tcbf_live.stream.tcbf.row_block import RowBlock
from tcbf_live.stream.tcbf.tiles import TileLevels, default_bins


def prepare(
    cal: Calibration,
    bins: tuple[int, ...] | None = None,
    semiangle_mrad: float | None = None,
    angular_sampling_mrad: float | None = None,
) -> tuple[Calibration, TileLevels]:
    """The tile layout of a calibration's BF pixels, and the calibration with its BF pixels in
    tile-contiguous order (stack columns, tiles and the result file line up) and its angular
    sampling resolved: the given one, else the calibration's, else the semi-angle over the
    measured disk radius (one value for the aberrations and the file)."""
    anchor = (round(cal.center_px[0]), round(cal.center_px[1]))
    layout = TileLevels.build(cal.bf_pixels, anchor, bins or default_bins(cal.radius_px))
    sampling = angular_sampling_mrad or cal.angular_sampling_mrad
    if not sampling and semiangle_mrad:
        sampling = semiangle_mrad / cal.radius_px
    return replace(cal, bf_pixels=cal.bf_pixels[layout.order],
                   angular_sampling_mrad=sampling), layout  # fmt: skip


STATS_SLOTS = 5  # accepted, duplicate, out of range, out of order, next index
ALIGN_BYTES = 64  # arrays carved from one block of memory start on a cache line


def carve(layout: dict[str, tuple[tuple, np.dtype]], memory: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of `layout` as views of the uint8 `memory` (at least
    `AccumulatorState.block_bytes(layout)`), each starting on a cache line."""
    if memory.nbytes < AccumulatorState.block_bytes(layout):
        raise ValueError(f"{memory.nbytes} bytes do not hold "
                         f"{AccumulatorState.block_bytes(layout)}")  # fmt: skip
    at, arrays = -memory.ctypes.data % ALIGN_BYTES, {}
    for name, (shape, dtype) in layout.items():
        n = int(np.prod(shape)) * dtype.itemsize
        arrays[name] = memory[at : at + n].view(dtype).reshape(shape)
        at += -(-n // ALIGN_BYTES) * ALIGN_BYTES
    return arrays


@dataclass
class AccumulatorState:
    """Everything one receiver accumulates for one series, declared once: the partition-local
    state of the *accumulate* phase, and what the *merge* phase combines.

    Arrays are position-major ((positions, ...)) so a frame's writes are contiguous. Each field
    says how partial states merge (`metadata["merge"]`):
    - "add": per-position sums. Disjoint scan positions (receivers taking different frames)
      assign, repeat passes over a position add; both are one addition, done only where the
      other state has frames;
    - "add_capped": the uint16 stack saturates at its maximum, as the kernel does (saturating
      addition of non-negative values is associative: merged equals sequential, bit for bit);
    - "or": the acquisition-index bitmap;
    - "stats": counters add, the highest index seen is the maximum.
    Integer frames give bit-identical sums in any split (sums exact in int64/float64; tile
    sums are exact in float32 while a tile's counts at one position stay below 2**24).
    """

    totals: np.ndarray = field(metadata={"merge": "add", "unit": "counts"})  # (n_pos,) f64
    bf_sum: np.ndarray = field(metadata={"merge": "add", "unit": "counts"})  # (n_pos,) f64
    axial_sum: np.ndarray = field(metadata={"merge": "add", "unit": "counts"})  # (n_pos,) f64
    hits: np.ndarray = field(metadata={"merge": "add", "unit": "frames"})  # (n_pos,) u32
    stack: np.ndarray = field(metadata={"merge": "add_capped", "unit": "counts"})  # (n_pos, N_bf)
    tiles: np.ndarray = field(metadata={"merge": "add", "unit": "counts"})  # (n_pos, tiles) f32
    seen: np.ndarray = field(metadata={"merge": "or", "unit": "flag"})  # (frame limit,) u8
    stats: np.ndarray = field(metadata={"merge": "stats", "unit": "frames"})  # int64[5]
    # (n_pos, 2) f64: counts x detector (row, col) of the unmasked pixels, summed over frames
    # (the disk's centre of mass per position; folded only with descan compensation)
    moments: np.ndarray = field(metadata={"merge": "add", "unit": "counts px"})

    @staticmethod
    def layout(n_pos: int, n_bf: int, n_tiles: int, frame_limit: int,
               integer_stack: bool = True) -> dict[str, tuple[tuple, np.dtype]]:  # fmt: skip
        """Field name -> (shape, dtype) of a state of this geometry (uint16 stack for
        unsigned-integer frames, else float32), in declaration order."""
        f8, stack = np.dtype(np.float64), np.dtype(np.uint16 if integer_stack else np.float32)
        return {
            "totals": ((n_pos,), f8), "bf_sum": ((n_pos,), f8), "axial_sum": ((n_pos,), f8),
            "hits": ((n_pos,), np.dtype(np.uint32)), "stack": ((n_pos, n_bf), stack),
            "tiles": ((n_pos, n_tiles), np.dtype(np.float32)),
            "seen": ((frame_limit,), np.dtype(np.uint8)),
            "stats": ((STATS_SLOTS,), np.dtype(np.int64)), "moments": ((n_pos, 2), f8),
        }  # fmt: skip

    @staticmethod
    def block_bytes(layout: dict[str, tuple[tuple, np.dtype]]) -> int:
        """Bytes of one block that holds every array of `layout`, each on its own cache line
        (`zeros(..., memory=)`)."""
        sizes = (int(np.prod(shape)) * dtype.itemsize for shape, dtype in layout.values())
        return ALIGN_BYTES + sum(-(-n // ALIGN_BYTES) * ALIGN_BYTES for n in sizes)

    @classmethod
    def zeros(cls, n_pos: int, n_bf: int, n_tiles: int, frame_limit: int,
              integer_stack: bool = True,
              memory: np.ndarray | None = None) -> AccumulatorState:  # fmt: skip
        """An empty state (`layout`). Where `memory` is given (uint8, all zero, at least
        `block_bytes`: memory touched beforehand, `stream.memory_reserve`), every array is a
        view of it, each starting on a cache line."""
        layout = cls.layout(n_pos, n_bf, n_tiles, frame_limit, integer_stack)
        if memory is None:
            return cls(**{name: np.zeros(shape, dtype) for name, (shape, dtype) in layout.items()})
        return cls(**carve(layout, memory))

    def arrays(self) -> dict[str, np.ndarray]:
        """Field name -> array, in declaration order (for loops that must not re-list them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays().values()))

    def merge(self, other: AccumulatorState, *, stack: bool = True) -> int:
        """Fold another receiver's partial state of the same series into this one (in place).

        Only the positions where `other` has frames are touched, so merging a partition costs
        its share of the scan. `stack=False` leaves the per-BF-pixel stack out (it is the
        largest array and only the final image needs it: cheap enough for every alignment
        update without it). Returns the frames both states had folded (a sender's duplicate
        that reached two receivers): counted as duplicates, not as accepted; unlike one
        receiver, which drops a duplicate, their counts are in the sums twice, as are their
        hits, so per-frame values stay consistent.

        It adds in place: merge each partial state into a target once. To follow partitions
        that keep growing, merge them afresh at every update (into a new `partition()`, or
        with `merged`), or send their growth as `StateDelta`s (`DeltaTaker`)."""
        mine, theirs = self.arrays(), other.arrays()
        for name, a in mine.items():
            if a.shape != theirs[name].shape or a.dtype != theirs[name].dtype:
                raise ValueError(f"cannot merge {name}: {theirs[name].shape} "
                                 f"{theirs[name].dtype} into {a.shape} {a.dtype}")  # fmt: skip
        rows = np.flatnonzero(other.hits)
        values = {n: theirs[n][rows] for n in ROW_FIELDS}
        return self.apply(StateDelta(rows, values, np.flatnonzero(other.seen), other.stats),
                          stack=stack)  # fmt: skip

    def apply(self, delta: StateDelta, *, stack: bool = True) -> int:
        """Add a `StateDelta` (another receiver's growth, or its whole state) by each field's
        merge rule; the one code path of `merge`. Returns the frames both had claimed."""
        mine = self.arrays()
        twice = int(np.count_nonzero(self.seen[delta.seen]))
        fresh = self.hits[delta.rows] == 0  # rows this state has no frames at: copied
        for f in fields(self):
            rule, a = f.metadata["merge"], mine[f.name]
            if rule == "add" and a.ndim == 1:
                a[delta.rows] += delta.values[f.name]
            elif rule == "add" or (rule == "add_capped" and stack):
                top = np.iinfo(a.dtype).max if rule == "add_capped" and a.dtype.kind == "u" else -1
                add_rows(a, delta.rows, delta.values[f.name], fresh, top)
            elif rule == "or":
                a[delta.seen] = 1
            elif rule == "stats":
                a[:NEXT_INDEX] += delta.stats[:NEXT_INDEX]
                a[NEXT_INDEX] = max(a[NEXT_INDEX], delta.stats[NEXT_INDEX])
                a[ACCEPTED] -= twice
                a[DUPLICATE] += twice
        return twice


NO_BLOCK = RowBlock.identity()  # kernel arguments of a state with a row per position
ROW_FIELDS = tuple(f.name for f in fields(AccumulatorState)
                   if f.metadata["merge"] in ("add", "add_capped"))  # fmt: skip
SENT = 2  # `seen` value of an index already sent in a delta (still non-zero: a duplicate)


@dataclass(frozen=True)
class StateDelta:
    """What one receiver folded since its last delta: the scan positions (`rows`) it touched
    with their per-position sums (`values`, one array per field of ROW_FIELDS, `rows`
    first), the acquisition indices it newly claimed (`seen`) and its counters' growth
    (`stats`; NEXT_INDEX: the highest index so far). `AccumulatorState.apply` adds it."""

    rows: np.ndarray  # (k,) int64 positions
    values: dict[str, np.ndarray]
    seen: np.ndarray  # (m,) int64 acquisition indices
    stats: np.ndarray  # int64[STATS_SLOTS]

    @property
    def nbytes(self) -> int:
        arrays = (self.rows, self.seen, *self.values.values())
        return int(sum(a.nbytes for a in arrays))

    def check(self, like: AccumulatorState) -> str | None:
        """Why this delta does not fit a state of `like`'s geometry (None: it fits); a peer's
        delta is checked before any of it is added."""
        n_pos = like.hits.size
        if any(a.dtype != np.int64 for a in (self.rows, self.seen, self.stats)) or (
                self.stats.shape != (STATS_SLOTS,) or self.stats[ACCEPTED] < 0):  # fmt: skip
            return "index arrays must be int64, stats int64[5]"
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n_pos):
            return "a row outside the scan"
        if self.seen.size and (self.seen.min() < 0 or self.seen.max() >= like.seen.size):
            return "a frame index beyond the series"
        if any(np.unique(a).size != a.size for a in (self.rows, self.seen)):
            return "repeated rows or frame indices"
        arrays = like.arrays()
        for name in ROW_FIELDS:
            v, a = self.values.get(name), arrays[name]
            if v is None or v.dtype != a.dtype or v.shape != (self.rows.size, *a.shape[1:]):
                return f"{name} does not match the series' geometry"
        return None


def merged(states: list[AccumulatorState], *, stack: bool = True) -> AccumulatorState:
    """A new state holding the merge of `states` (the inputs are left untouched)."""
    first = states[0]
    out = AccumulatorState(**{k: v.copy() for k, v in first.arrays().items()})
    for s in states[1:]:
        out.merge(s, stack=stack)
    return out


@dataclass
class Accumulators:
    """The accumulate phase for one series: the kernel geometry (scan, calibration, tile
    layout) and the `AccumulatorState` it folds frames into.

    The calibration's BF pixels must already be in `tiles_layout.order`, so stack columns,
    tile members and `calibration.bf_pixels` all line up (`for_calibration` does this).
    """

    scan_shape: tuple[int, int]
    calibration: Calibration
    tiles_layout: TileLevels
    axial_radius_px: float
    serpentine: bool = False
    frame_limit: int | None = None  # frames accepted (repeat scans: several passes)
    integer_stack: bool = True  # unsigned integer frames: uint16 stack, exact int64 sums
    moments: bool = False  # fold each frame's first moments (descan compensation)
    memory: InitVar[np.ndarray | None] = None  # one block for the state: AccumulatorState.zeros
    # a worker: only a `RowBlock` of this many rows is allocated (`block_rows`), touched now
    # (in `memory` when given: touched before)
    block: InitVar[int | None] = None
    # the arrays to fold into (e.g. a LiberTEM UDF's partition buffers); None: new zeros
    state: AccumulatorState | None = None

    def __post_init__(self, memory: np.ndarray | None, block: int | None):
        cal = self.calibration
        sizes = (self.n_positions, cal.n_bf, self.tiles_layout.total_tiles,
                 self.frame_limit or self.n_positions, self.integer_stack)  # fmt: skip
        if block is not None:
            sizes = (block, *sizes[1:])
        if self.state is None:
            self.state = AccumulatorState.zeros(*sizes, memory)
        arrays = self.state.arrays()
        for name, want in AccumulatorState.layout(*sizes).items():  # given arrays must fit
            a = arrays[name]
            if (a.shape, a.dtype) != want:
                raise ValueError(f"state.{name} is {a.shape} {a.dtype}, the geometry needs "
                                 f"{want[0]} {want[1]}")  # fmt: skip
        self.rows = None if block is None else RowBlock.empty(self.n_positions, sizes[0])
        for a in self.state.arrays().values() if block is not None and memory is None else ():
            a.fill(0)  # touched now, not while frames arrive
        self._bf_index = cal.bf_flat_index
        d = cal.bf_pixels - np.asarray(cal.center_px)
        self.axial = np.hypot(d[:, 0], d[:, 1]) <= self.axial_radius_px
        self._axial_index = np.flatnonzero(self.axial).astype(np.int32)
        self._masked = cal.masked_flat_index
        self._masked_flag = cal.mask.ravel().astype(np.uint8)
        # where each position's BF pixels are read, relative to the calibrated disk: whole
        # detector px (row, col) and the flat offset the kernel adds (`set_read_shift`)
        self.read_shift_px = np.zeros((self.n_positions, 2), np.int16)
        self._read_offset = np.zeros(self.n_positions, np.int64)
        self.clipped = np.zeros(self.n_positions, bool)  # its shift would leave the detector
        lo, hi = cal.bf_pixels.min(axis=0), cal.bf_pixels.max(axis=0)
        self._shift_range = (-lo, np.asarray(cal.detector_shape) - 1 - hi)  # stays on the chip
        self._zero = np.int64(0) if self.integer_stack else 0.0
        self._stack_max = float(np.iinfo(np.uint16).max if self.integer_stack else np.inf)

    @staticmethod
    def block_rows(layout: dict[str, tuple[tuple, np.dtype]], rows: int = 0) -> int:
        """Rows of a worker's `RowBlock` for the state `layout` (a row per position): `rows`,
        or (0) `RowBlock.capacity` of its row fields' bytes per row."""
        n_pos, row_bytes = layout["totals"][0][0], 0
        for name in ROW_FIELDS:
            shape, dtype = layout[name]
            row_bytes += int(np.prod(shape[1:])) * dtype.itemsize
        return rows or RowBlock.capacity(n_pos, row_bytes)

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    def nbytes(self) -> int:
        return self.state.nbytes()

    def empty_state(self, rows: int | None = None) -> AccumulatorState:
        """A fresh state of this geometry (another receiver's partition, for `merge`), with
        one row per position or `rows` rows."""
        s, n = self.state, rows or self.n_positions
        return AccumulatorState.zeros(n, s.stack.shape[1], s.tiles.shape[1], s.seen.size,
                                      self.integer_stack)  # fmt: skip

    def set_read_shift(self, shift_px: np.ndarray, where: np.ndarray) -> int:
        """Read the BF pixels of the positions `where` (bool, (n_pos,)) at the whole-pixel
        displacements `shift_px` ((n_pos, 2) detector px, rounded) from now on; a shift that
        would take the BF disk off the detector is clipped to its edge. Returns how many
        positions were clipped. (Call it from the thread that folds frames.)"""
        want = np.rint(np.nan_to_num(shift_px[where])).astype(np.int64)
        got = np.clip(want, *self._shift_range)
        self.read_shift_px[where] = got
        self._read_offset[where] = got[:, 0] * self.calibration.detector_shape[1] + got[:, 1]
        self.clipped[where] = np.any(got != want, axis=1)
        return int(self.clipped[where].sum())

    def add(self, first: int, frames: np.ndarray) -> None:
        """Fold frames (B, Qx, Qy) with acquisition indices first, first+1, ... into the sums."""
        self.add_indexed(np.arange(first, first + frames.shape[0], dtype=np.int64), frames)

    def add_indexed(self, indices: np.ndarray, frames: np.ndarray,
                    into: AccumulatorState | None = None) -> None:  # fmt: skip
        """Fold frames (B, Qx, Qy) with arbitrary acquisition indices (B,) into the sums (of
        `into`, another state of this geometry, when given)."""
        flat = frames.reshape(frames.shape[0], -1)
        if flat.dtype.kind == "f" and flat.dtype.itemsize == 2:  # (no float16 kernels: a copy)
            flat = flat.astype("=f4")
        accumulate_frames(flat, indices, *self.kernel_args(into))

    def kernel_args(self, into: AccumulatorState | None = None) -> tuple:
        """The accumulate kernels' arguments after the frames and their indices."""
        lay, s = self.tiles_layout, into or self.state
        return (
            self.n_positions, self.scan_shape[1], self.serpentine, self._bf_index,
            lay.tile_start, lay.tile_stop, self._axial_index, self._masked, self._stack_max,
            self._zero, self.integer_stack, s.totals, s.bf_sum, s.axial_sum, s.hits,
            s.stack, s.tiles, s.seen, s.stats, s.moments, self._read_offset,
            self._masked_flag, self.calibration.detector_shape[1] if self.moments else 0,
            *(self.rows if into is None and self.rows is not None else NO_BLOCK).kernel_args(),
        )  # fmt: skip

    def merge(self, other: AccumulatorState, *, stack: bool = True) -> int:
        """The merge phase: fold another receiver's partial state into this one (returns the
        frames both had folded, see `AccumulatorState.merge`)."""
        return self.state.merge(other, stack=stack)

    # ---------------------------------------------------------------- read-outs (copies)
    def as_image(self, values: np.ndarray) -> np.ndarray:
        return values.reshape(self.scan_shape).copy()

    def tile_images(self, level: int) -> np.ndarray:
        """(n_tiles, rows, cols) binned virtual-BF images of bin level index `level`."""
        lay = self.tiles_layout
        cols = self.state.tiles[:, lay.offsets[level] : lay.offsets[level] + lay.n_tiles[level]]
        return np.ascontiguousarray(cols.T).reshape(lay.n_tiles[level], *self.scan_shape)

    @property
    def frames_accepted(self) -> int:
        return int(self.state.stats[ACCEPTED])

    @property
    def duplicates(self) -> int:
        return int(self.state.stats[DUPLICATE])

    @property
    def out_of_range(self) -> int:
        return int(self.state.stats[OUT_OF_RANGE])

    @property
    def out_of_order(self) -> int:
        return int(self.state.stats[OUT_OF_ORDER])
