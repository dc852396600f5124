"""Tiles: BF pixels binned into nested levels, their geometry and their virtual-BF images.

One home for everything about tiles (tcbf-physics.md sect. 7.2):
- `TileLevels`: which tile of every level each BF pixel falls in (label = floor((pixel -
  anchor) / bin) per axis, the anchor the disk centre rounded to a pixel; levels nest, each bin
  dividing every coarser one; the first level with bin >= radius is the four quadrants). BF
  pixels are ordered so every tile, at every level, is one contiguous run (the ingest kernel's
  prefix sums);
- `TileGeometry`: intensity-weighted tile centres and pixel counts (fixed for a series);
- `TileSet`: one level's tile images over the alignment window, as the alignment reads them;
- `tile_sets`: every level's `TileSet` from the accumulated tile sums (per unit exposure);
- `PixelGroups` / `RegroupedTiles`: tile images re-formed from the per-pixel stack with each
  pixel moved by its own model shift, so tiles are not blurred by the shift spread inside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tcbf_live.stream.tcbf.tile_kernels import (
    group_sums,
    merge_tiles,
    normalise_tiles,
    scatter_groups,
)

OUTSIDE_PX = 1 << 30  # a pixel group moved this far lands on no tile (left out)
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


def disk_tile_counts(radius_px: float, bins: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Pixels (x, y integers with x^2 + y^2 <= radius^2) of a disk centred on a pixel, and
    the tiles of each bin level (coarse to fine) that hold at least one of them: what
    `TileLevels.build` gives for that pixel set anchored at its centre, in O(radius) without
    listing the pixels (sizing memory before a calibration). Per column x the disk spans
    |y| <= floor(sqrt(r^2 - x^2)); a column of tiles is reached from its x closest to 0."""
    reach = math.floor(radius_px)
    x = np.arange(-reach, reach + 1)
    half = np.floor(np.sqrt(np.maximum(radius_px**2 - x**2, 0.0))).astype(np.int64)
    n_pixels = int(np.sum(2 * half + 1))
    counts = []
    for b in validate_bins(tuple(bins)):
        u = np.arange(-reach // b, reach // b + 1)
        closest = np.clip(0, u * b, u * b + b - 1)
        span = np.floor(np.sqrt(np.maximum(radius_px**2 - closest**2, 0.0))).astype(np.int64)
        reached = closest**2 <= radius_px**2
        counts.append(int(np.sum(np.where(reached, span // b - (-span) // b + 1, 0))))
    return n_pixels, tuple(counts)


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


@dataclass(frozen=True)
class TileGeometry:
    """Per-level tile centres and sizes from the BF pixels (fixed for a series)."""

    bins: tuple[int, ...]
    k_px: dict[int, np.ndarray] = field(default_factory=dict)  # (n_tiles, 2) weighted centres
    n_pixels: dict[int, np.ndarray] = field(default_factory=dict)  # (n_tiles,) BF pixels

    @classmethod
    def build(cls, bins, member_tile, bf_k_px: np.ndarray, pixel_weight: np.ndarray):
        """`member_tile[l]` (N_bf,) tile of each BF pixel at level l; weights ~ mean intensity."""
        k_px, n_pixels = {}, {}
        w = np.asarray(pixel_weight, float)
        if not np.any(w > 0):
            w = np.ones(len(bf_k_px))
        for b, members in zip(bins, member_tile, strict=True):
            n = int(members.max()) + 1
            wsum = np.bincount(members, w, n)
            k = np.stack([np.bincount(members, w * bf_k_px[:, c], n) for c in (0, 1)], axis=1)
            k_px[b] = k / np.maximum(wsum, 1e-30)[:, None]
            n_pixels[b] = np.bincount(members, minlength=n)
        return cls(tuple(bins), k_px, n_pixels)


@dataclass(frozen=True)
class TileSet:
    """The binned virtual-BF images of one bin level over the acquired region."""

    bin_px: int
    images: np.ndarray  # (n_tiles, rows, cols) counts
    valid: np.ndarray  # (rows, cols) bool: positions acquired
    k_px: np.ndarray  # (n_tiles, 2) intensity-weighted tile centre rel. to the disk centre
    electrons: np.ndarray  # (n_tiles,) electrons in each tile image
    n_pixels: np.ndarray  # (n_tiles,) BF pixels per tile
    labels: np.ndarray | None = None  # (n_tiles, 2) integer tile coordinates (grid position)
    disk_radius_px: float | None = None  # BF disk radius; None: the farthest tile centre

    @property
    def radius_px(self) -> float:
        if self.disk_radius_px:
            return float(self.disk_radius_px)
        return float(np.hypot(*self.k_px.T).max())

    def within(self, fraction: float) -> np.ndarray:
        """Tiles whose centre lies within `fraction` of the disk radius."""
        return np.hypot(*self.k_px.T) <= fraction * self.radius_px

    def trusted_tiles(self, min_electrons: float) -> np.ndarray:
        return self.electrons >= min_electrons

    def is_trusted(self, min_electrons: float) -> bool:
        """Every tile holding at least half as many pixels as the largest one has enough
        electrons (small rim tiles may lag; they are then simply left out)."""
        full = self.n_pixels >= 0.5 * self.n_pixels.max()
        return bool(np.all(self.electrons[full] >= min_electrons))


Window = tuple[tuple[int, int], tuple[int, int]]  # scan rows [r0, r1), cols [c0, c1)


def without_excluded(tiles: np.ndarray, stack: np.ndarray, window: Window, scan_cols: int,
                     layout: TileLevels, excluded_px: np.ndarray) -> np.ndarray:  # fmt: skip
    """The window's tile sums (rows, cols, total tiles) with the excluded BF pixels' values
    taken out (every level)."""
    if not excluded_px.any():
        return tiles
    (r0, r1), (c0, c1) = window
    block = tiles.astype(np.float32, copy=True)
    per_position = stack.reshape(-1, scan_cols, stack.shape[1])
    for i in np.flatnonzero(excluded_px):
        values = per_position[r0:r1, c0:c1, i].astype(np.float32)
        for lvl in range(len(layout.bins)):
            block[:, :, layout.offsets[lvl] + layout.member_tile[lvl][i]] -= values
    return block


def tile_sets(block: np.ndarray, exposure: np.ndarray, layout: TileLevels,
              geometry: TileGeometry, counts_per_electron: float,
              disk_radius_px: float) -> dict[int, TileSet]:  # fmt: skip
    """Every level's tile images from the window's tile sums `block` (rows, cols, total tiles),
    per unit exposure (`exposure` (rows, cols): frames x relative dose, 0 where excluded);
    electrons are the raw sums over the positions kept."""
    valid = exposure > 0
    per_frame = np.divide(1.0, exposure, out=np.zeros(exposure.shape), where=valid)
    per_frame = per_frame.astype(np.float32)
    out = {}
    for lvl, b in enumerate(layout.bins):
        sub = block[:, :, layout.offsets[lvl] : layout.offsets[lvl] + layout.n_tiles[lvl]]
        with np.errstate(invalid="ignore"):  # inf x 0 at excluded non-finite frames
            images = np.ascontiguousarray(np.moveaxis(sub, 2, 0)) * per_frame
        images[:, ~valid] = 0.0  # excluded frames: no signal (and no non-finite values)
        electrons = sub[valid].sum(axis=0, dtype=np.float64) / counts_per_electron
        out[b] = TileSet(b, images, valid, geometry.k_px[b], electrons, geometry.n_pixels[b],
                         layout.labels[lvl], disk_radius_px)  # fmt: skip
    return out


class TileSource(Protocol):
    """Tile images re-formed from per-pixel data, each pixel moved by its model shift."""

    def tile_images(self, bin_px: int, matrix_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images (n_tiles, rows, cols) of level `bin_px`, the model their shifts came from)."""


class PixelGroups:
    """BF pixels grouped by (finest tile, integer shift), with their summed images over a scan
    window: one pass over the per-pixel stack serves every bin level (levels nest, so each
    group lies in one tile of every level), and the groups are moved into the finest tiles
    once; every level's tiles are then sums of those (`tile_kernels`)."""

    def __init__(self, stack, exposure, rows, cols, scan_cols, finest_tile, move, matrix_px=None):
        self.matrix_px = matrix_px  # the model the integer shifts came from
        keys = np.column_stack([finest_tile, move])
        uniq, first, group_of = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        self.finest_tile = finest_tile  # (N_bf,) finest tile of each BF pixel
        self.fine_of_group = np.ascontiguousarray(uniq[:, 0], dtype=np.int64)
        self.move = np.ascontiguousarray(uniq[:, 1:], dtype=np.int64)
        counts = np.bincount(group_of.ravel(), minlength=len(uniq))
        self.members = counts.astype(np.float32)
        self.shape = (rows[1] - rows[0], cols[1] - cols[0])
        order = np.argsort(group_of.ravel(), kind="stable").astype(np.int64)  # group by group
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        exact = bool(np.issubdtype(stack.dtype, np.integer))
        # (groups, positions): the group images, for the scatter
        self.sums_t = np.empty((len(uniq), self.shape[0] * self.shape[1]), np.float32)
        group_sums(stack, exposure, np.asarray(rows, np.int64), np.asarray(cols, np.int64),
                   scan_cols, order, bounds, exact, np.int64(0) if exact else 0.0,
                   self.sums_t)  # fmt: skip
        window = exposure.reshape(-1, scan_cols)[rows[0] : rows[1], cols[0] : cols[1]]
        self.valid = np.ascontiguousarray(window.ravel() > 0)
        self._finest: tuple[np.ndarray, np.ndarray] | None = None  # sums, member counts

    def tile_images(self, pixel_tile: np.ndarray, n_tiles: int) -> np.ndarray:
        """(n_tiles, rows, cols): mean per member of each tile, every pixel moved by its shift."""
        if self._finest is None:
            n_fine = int(self.finest_tile.max()) + 1
            fine = np.zeros((n_fine, *self.shape), np.float32)
            fine_count = np.zeros_like(fine)
            scatter_groups(self.sums_t, self.valid, self.fine_of_group, self.move, self.members,
                           fine, fine_count)  # fmt: skip
            self._finest = (fine, fine_count)
        fine, fine_count = self._finest
        tile_of_fine = np.zeros(len(fine), np.int64)
        tile_of_fine[self.finest_tile] = pixel_tile  # levels nest: one tile per finest tile
        out = np.zeros((n_tiles, *self.shape), np.float32)
        count = np.zeros_like(out)
        merge_tiles(fine, fine_count, tile_of_fine, out, count)
        normalise_tiles(out, count)
        return out


class RegroupedTiles(TileSource):
    """Tile images of any level from the per-pixel stack over one window, each pixel's image
    moved by its model shift (nearest scan px): tiles are then sharp and share one window (see
    `alignment.align`). The grouped pixel sums are formed once and reused by every level until
    a model moves some pixel by more than `regroup_px` from where they were formed. Holds the
    stack it reads: make one per update and drop it afterwards."""

    def __init__(self, stack: np.ndarray, exposure: np.ndarray, window: Window, scan_cols: int,
                 layout: TileLevels, k_px: np.ndarray, excluded_px: np.ndarray,
                 regroup_px: float):  # fmt: skip
        self._args = (stack, exposure, window[0], window[1], scan_cols, layout.member_tile[-1])
        self.layout = layout
        self.k_px = k_px
        self.excluded_px = excluded_px  # (N_bf,) bool: moved off every tile
        self.regroup_px = regroup_px
        self.groups: PixelGroups | None = None

    def tile_images(self, bin_px: int, matrix_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images (n_tiles, rows, cols) of level `bin_px`, the model their shifts came from)."""
        shifts = self.k_px @ matrix_px.T
        if (
            self.groups is None
            or np.abs(shifts - self.k_px @ self.groups.matrix_px.T).max() > self.regroup_px
        ):
            move = np.rint(shifts).astype(np.int64)
            move[self.excluded_px] = OUTSIDE_PX
            self.groups = PixelGroups(*self._args, move, matrix_px.copy())
        lvl = self.layout.bins.index(bin_px)
        images = self.groups.tile_images(self.layout.member_tile[lvl], self.layout.n_tiles[lvl])
        return images, self.groups.matrix_px
