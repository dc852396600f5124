"""Virtual-BF accumulators: one numba pass per frame updates everything downstream needs.

Per frame (no Python per frame; the kernel releases the GIL):
- total counts (masked pixels excluded), BF counts (= incoherent BF), axial virtual BF;
  DF = total - BF;
- the frame's BF-pixel values into a per-BF-pixel stack (for the final reconstruction);
- binned virtual-BF tile sums for every alignment bin level. The BF pixels are ordered so that
  every tile, at every level, is one contiguous run; one running (prefix) sum of the frame's BF
  values then gives every tile of every level as a difference of two entries, so each BF pixel
  is read once and short per-tile loops are avoided (27 % of the kernel's time at 96x96).

Arrays are position-major ((positions, ...)), so a frame's writes are contiguous.

Tiles: label = floor((pixel - anchor) / bin) per axis, with the anchor the disk centre rounded to
a pixel. Levels must nest (each bin divides every coarser one); the first level with
bin >= radius is the four quadrants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from tcbf_live.detectors.compression import bslz4_into
from tcbf_live.stream.tcbf.calibration import Calibration

FINEST_DEFAULT_BIN = 4


def default_bins(radius_px: float) -> tuple[int, ...]:
    """Powers of two from 2**(ceil(log2 D) - 1) down to 4, D the disk diameter (px).

    Finer levels (2, 1) hold a few pixels per tile: they are cheaper to form from the
    per-BF-pixel stack when (rarely) the dose makes them usable than to maintain per frame
    (maintaining bin 2 as well costs ~16 % of the kernel's time for the tutorial disk).

    """
    top = max(1, math.ceil(math.log2(max(2.0 * radius_px, 2.0))) - 1)
    return tuple(2**k for k in range(top, 0, -1) if 2**k >= min(FINEST_DEFAULT_BIN, 2**top))


def validate_bins(bins: tuple[int, ...]) -> tuple[int, ...]:
    """Sorted coarse to fine, unique, nested. Raises ValueError with the reason."""
    levels = tuple(sorted({int(b) for b in bins}, reverse=True))
    if not levels or levels[-1] < 1:
        raise ValueError(f"bin sizes must be positive integers, got {bins}")
    for coarse, fine in zip(levels, levels[1:], strict=False):
        if coarse % fine:
            raise ValueError(f"bin levels must nest: {coarse} is not a multiple of {fine}")
    return levels


@dataclass(frozen=True)
class TileLevels:
    """BF pixel -> tile maps for nested bin levels (coarse to fine).

    `order` sorts the BF pixels so that every tile, at every level, is one contiguous run: the
    kernel then gets tile sums from a prefix sum (no scattered writes). All other arrays refer
    to the BF pixels *in that order*.
    """

    bins: tuple[int, ...]
    n_tiles: tuple[int, ...]
    offsets: tuple[int, ...]  # start column of each level in the tile accumulator
    labels: tuple[np.ndarray, ...]  # per level (n_tiles, 2) integer tile coordinates
    order: np.ndarray  # (N_bf,) permutation of the input BF pixels
    member_tile: tuple[np.ndarray, ...]  # per level (N_bf,) tile of each (ordered) BF pixel
    tile_start: np.ndarray  # (total_tiles,) accumulator column c = ordered BF pixels
    tile_stop: np.ndarray  # (total_tiles,)   [tile_start[c], tile_stop[c])

    @property
    def total_tiles(self) -> int:
        return int(sum(self.n_tiles))

    @classmethod
    def build(cls, bf_pixels: np.ndarray, anchor: tuple[int, int], bins) -> TileLevels:
        levels = validate_bins(tuple(bins))
        n = bf_pixels.shape[0]
        rel = bf_pixels.astype(np.int64) - np.asarray(anchor, dtype=np.int64)
        keys = np.concatenate([np.floor_divide(rel, b) for b in levels], axis=1)
        order = np.lexsort(keys.T[::-1])  # coarsest label is the primary key
        keys = keys[order]
        labels, members, starts = [], [], []
        for lvl in range(len(levels)):
            k = keys[:, : 2 * (lvl + 1)]
            new = np.ones(n, bool)
            new[1:] = np.any(k[1:] != k[:-1], axis=1)
            members.append((np.cumsum(new) - 1).astype(np.int32))
            labels.append(k[new][:, -2:].astype(np.int32))
            starts.append(np.flatnonzero(new))
        n_tiles = tuple(len(lab) for lab in labels)
        offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(n_tiles)[:-1]]))
        tile_start = np.concatenate(starts).astype(np.int32)
        tile_stop = np.concatenate([np.append(s[1:], n) for s in starts]).astype(np.int32)
        return cls(levels, n_tiles, offsets, tuple(labels), order.astype(np.int32),
                   tuple(members), tile_start, tile_stop)  # fmt: skip


# fast-math without "no NaN / no inf": sums may be reordered (vectorised), but a float frame's
# non-finite values are still seen as such (screening excludes that frame, not its neighbours)
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

# stats slots of the kernel
ACCEPTED, DUPLICATE, OUT_OF_RANGE, OUT_OF_ORDER, NEXT_INDEX = range(5)


@numba.njit(nogil=True, cache=True)
def _claim(idx, n_pos, cols, serpentine, seen, stats) -> int:
    """Scan position (flat, raster) of acquisition index `idx`, or -1 for an index out of range
    or already seen; counts it in `stats`."""
    if idx < 0 or idx >= seen.shape[0]:
        stats[OUT_OF_RANGE] += 1
        return -1
    if seen[idx]:
        stats[DUPLICATE] += 1
        return -1
    seen[idx] = 1
    if idx < stats[NEXT_INDEX]:
        stats[OUT_OF_ORDER] += 1
    else:
        stats[NEXT_INDEX] = idx + 1
    k = idx % n_pos
    row = k // cols
    col = k - row * cols
    if serpentine and (row & 1) == 1:
        col = cols - 1 - col
    return row * cols + col


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _fold(f, j, bf_index, tile_start, tile_stop, axial_index, masked_index, cap, zero, exact,
          vals, cum, totals, bf_sum, axial_sum, hits, stack, tiles, stats) -> None:  # fmt: skip
    """Add one flat frame `f` into position `j` of every accumulator. Tile sums are prefix-sum
    differences for integer frames (exact in int64); float frames sum each tile, so that one
    non-finite pixel spoils only its own tiles."""
    n_bf = bf_index.shape[0]
    tot = zero
    for p in range(f.shape[0]):
        tot += f[p]
    if exact or np.isfinite(tot):
        for m in masked_index:
            tot -= f[m]
    else:  # a float frame with a non-finite value: sum again around the masked pixels
        tot = zero
        k = 0
        for p in range(f.shape[0]):
            if k < masked_index.shape[0] and masked_index[k] == p:
                k += 1
                continue
            tot += f[p]
    run = zero
    for i in range(n_bf):
        v = f[bf_index[i]]
        vals[i] = v
        run += v
        cum[i + 1] = run
    srow = stack[j]
    for i in range(n_bf):  # separate loop: vectorises
        s = srow[i] + vals[i]
        srow[i] = s if s < cap else cap
    ax = zero
    for i in axial_index:
        ax += vals[i]
    trow = tiles[j]
    if exact:
        for t in range(tile_start.shape[0]):
            trow[t] += cum[tile_stop[t]] - cum[tile_start[t]]
    else:
        for t in range(tile_start.shape[0]):
            acc = zero
            for i in range(tile_start[t], tile_stop[t]):
                acc += vals[i]
            trow[t] += acc
    totals[j] += tot
    bf_sum[j] += run
    axial_sum[j] += ax
    hits[j] += 1
    stats[ACCEPTED] += 1


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def accumulate_frames(
    frames: np.ndarray,  # (B, Qx*Qy) any numeric dtype
    indices: np.ndarray,  # (B,) acquisition index of each frame
    n_pos: int,
    cols: int,
    serpentine: bool,
    bf_index: np.ndarray,  # (N_bf,) flat detector index, tile-contiguous order
    tile_start: np.ndarray,  # (total_tiles,) BF run [start, stop) of each accumulator column
    tile_stop: np.ndarray,
    axial_index: np.ndarray,  # BF-pixel indices inside the axial radius
    masked_index: np.ndarray,  # flat indices excluded from totals
    stack_max: float,
    zero,  # 0 of the frame-sum type: int64 for integer frames (vectorises), float64 otherwise
    exact: bool,  # integer frames: tile sums from prefix sums
    totals: np.ndarray,  # (n_pos,) float64
    bf_sum: np.ndarray,  # (n_pos,) float64
    axial_sum: np.ndarray,  # (n_pos,) float64
    hits: np.ndarray,  # (n_pos,) uint32
    stack: np.ndarray,  # (n_pos, N_bf) uint16 or float32
    tiles: np.ndarray,  # (n_pos, total_tiles) float32
    seen: np.ndarray,  # (frame limit,) uint8
    stats: np.ndarray,  # int64[5]
) -> None:
    vals = np.zeros(bf_index.shape[0], type(zero))  # a frame's BF values
    cum = np.zeros(bf_index.shape[0] + 1, type(zero))  # their running sum (exact for integers)
    cap = type(zero)(stack_max)
    for b in range(frames.shape[0]):
        j = _claim(indices[b], n_pos, cols, serpentine, seen, stats)
        if j >= 0:
            _fold(frames[b], j, bf_index, tile_start, tile_stop, axial_index, masked_index, cap,
                  zero, exact, vals, cum, totals, bf_sum, axial_sum, hits, stack, tiles,
                  stats)  # fmt: skip


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def accumulate_compressed(
    blobs: np.ndarray,  # uint8: the bslz4 blobs back to back
    offsets: np.ndarray,  # (B + 1,) blob b = blobs[offsets[b]:offsets[b + 1]]
    element_size: int,
    scratch: np.ndarray,  # (Qx*Qy,) one frame of the detector's dtype (stays in L1/L2)
    indices: np.ndarray,
    n_pos: int,
    cols: int,
    serpentine: bool,
    bf_index: np.ndarray,
    tile_start: np.ndarray,
    tile_stop: np.ndarray,
    axial_index: np.ndarray,
    masked_index: np.ndarray,
    stack_max: float,
    zero,
    exact: bool,
    totals: np.ndarray,
    bf_sum: np.ndarray,
    axial_sum: np.ndarray,
    hits: np.ndarray,
    stack: np.ndarray,
    tiles: np.ndarray,
    seen: np.ndarray,
    stats: np.ndarray,
) -> int:
    """`accumulate_frames` for bslz4-compressed frames: each is decompressed into `scratch` and
    folded in while it is still in cache. A blob that does not decompress to exactly one frame
    is skipped (its position stays empty, it is not marked seen); returns how many were."""
    vals = np.zeros(bf_index.shape[0], type(zero))
    cum = np.zeros(bf_index.shape[0] + 1, type(zero))
    cap = type(zero)(stack_max)
    failed = 0
    for b in range(indices.shape[0]):
        if not bslz4_into(blobs, offsets[b], offsets[b + 1], scratch, element_size):
            failed += 1
            continue
        j = _claim(indices[b], n_pos, cols, serpentine, seen, stats)
        if j >= 0:
            _fold(scratch, j, bf_index, tile_start, tile_stop, axial_index, masked_index, cap,
                  zero, exact, vals, cum, totals, bf_sum, axial_sum, hits, stack, tiles,
                  stats)  # fmt: skip
    return failed


@dataclass
class Accumulators:
    """All per-position sums for one series; sized from the scan and the calibration.

    The calibration's BF pixels must already be in `tiles_layout.order`, so stack columns,
    tile members and `calibration.bf_pixels` all line up (SeriesProcessor does this).
    """

    scan_shape: tuple[int, int]
    calibration: Calibration
    tiles_layout: TileLevels
    axial_radius_px: float
    serpentine: bool = False
    frame_limit: int | None = None  # frames accepted (repeat scans: several passes)
    integer_stack: bool = True  # unsigned integer frames: uint16 stack, exact int64 sums
    totals: np.ndarray = field(init=False)
    bf_sum: np.ndarray = field(init=False)
    axial_sum: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)
    stack: np.ndarray = field(init=False)
    tiles: np.ndarray = field(init=False)
    seen: np.ndarray = field(init=False)
    stats: np.ndarray = field(init=False)

    def __post_init__(self):
        n_pos = self.n_positions
        cal = self.calibration
        self.totals = np.zeros(n_pos, np.float64)
        self.bf_sum = np.zeros(n_pos, np.float64)
        self.axial_sum = np.zeros(n_pos, np.float64)
        self.hits = np.zeros(n_pos, np.uint32)
        self.stack = np.zeros((n_pos, cal.n_bf), np.uint16 if self.integer_stack else np.float32)
        self.tiles = np.zeros((n_pos, self.tiles_layout.total_tiles), np.float32)
        self.seen = np.zeros(self.frame_limit or n_pos, np.uint8)
        self.stats = np.zeros(5, np.int64)
        self._bf_index = cal.bf_flat_index
        d = cal.bf_pixels - np.asarray(cal.center_px)
        self.axial = np.hypot(d[:, 0], d[:, 1]) <= self.axial_radius_px
        self._axial_index = np.flatnonzero(self.axial).astype(np.int32)
        self._masked = cal.masked_flat_index
        self._zero = np.int64(0) if self.integer_stack else 0.0
        self._stack_max = float(np.iinfo(np.uint16).max if self.integer_stack else np.inf)
        self._scratch: np.ndarray | None = None  # one decompressed frame (add_compressed)

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    def nbytes(self) -> int:
        arrays = (self.totals, self.bf_sum, self.axial_sum, self.hits, self.stack, self.tiles)
        return int(sum(a.nbytes for a in arrays) + self.seen.nbytes)

    def add(self, first: int, frames: np.ndarray) -> None:
        """Fold frames (B, Qx, Qy) with acquisition indices first, first+1, ... into the sums."""
        self.add_indexed(np.arange(first, first + frames.shape[0], dtype=np.int64), frames)

    def add_indexed(self, indices: np.ndarray, frames: np.ndarray) -> None:
        """Fold frames (B, Qx, Qy) with arbitrary acquisition indices (B,) into the sums."""
        flat = frames.reshape(frames.shape[0], -1)
        accumulate_frames(flat, indices, *self._kernel_args())

    def add_compressed(self, blobs: list, indices: np.ndarray, element_size: int,
                       dtype: str) -> int:  # fmt: skip
        """Fold bslz4 blobs (one frame of `dtype` each) with acquisition indices (B,) into the
        sums, decompressing each inside the kernel (`detectors.compression.bslz4_into`).
        Returns how many blobs did not decompress (skipped, their positions left empty)."""
        joined = np.frombuffer(b"".join(blobs), np.uint8)
        offsets = np.zeros(len(blobs) + 1, np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        if self._scratch is None or self._scratch.dtype != np.dtype(dtype):
            self._scratch = np.empty(self.calibration.mask.size, dtype)
        return accumulate_compressed(joined, offsets, element_size, self._scratch, indices,
                                     *self._kernel_args())  # fmt: skip

    def _kernel_args(self) -> tuple:
        lay = self.tiles_layout
        return (
            self.n_positions, self.scan_shape[1], self.serpentine, self._bf_index,
            lay.tile_start, lay.tile_stop, self._axial_index, self._masked, self._stack_max,
            self._zero, self.integer_stack, self.totals, self.bf_sum, self.axial_sum, self.hits,
            self.stack, self.tiles, self.seen, self.stats,

        )  # fmt: skip

    # ---------------------------------------------------------------- read-outs (copies)
    def as_image(self, values: np.ndarray) -> np.ndarray:
        return values.reshape(self.scan_shape).copy()

    def tile_images(self, level: int) -> np.ndarray:
        """(n_tiles, rows, cols) binned virtual-BF images of bin level index `level`."""
        lay = self.tiles_layout
        cols = self.tiles[:, lay.offsets[level] : lay.offsets[level] + lay.n_tiles[level]]
        return np.ascontiguousarray(cols.T).reshape(lay.n_tiles[level], *self.scan_shape)

    @property
    def frames_accepted(self) -> int:
        return int(self.stats[ACCEPTED])

    @property
    def duplicates(self) -> int:
        return int(self.stats[DUPLICATE])

    @property
    def out_of_range(self) -> int:
        return int(self.stats[OUT_OF_RANGE])

    @property
    def out_of_order(self) -> int:
        return int(self.stats[OUT_OF_ORDER])
