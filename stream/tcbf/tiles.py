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
    once; every level's tiles are then sums of those (`tile_kernels`).

    The group images hold raw counts, divided by each position's exposure only when moved, so
    a later update with the same grouping (`refresh`) sums again only the positions whose
    frame count changed or that are new to its window: the rows that arrived since. This rests
    on a stack row changing only together with its frame count in `hits` (every writer: the
    ingest kernel, a merged delta). A grouping is reused while no pixel moved by more than
    `regroup_px` from the model it was formed with, so a pixel's integer move lags the current
    model by at most regroup_px + 0.5 px, as between the levels of one update."""

    def __init__(self, stack, hits, exposure, rows, cols, scan_cols, finest_tile, move,
                 matrix_px=None):  # fmt: skip
        self.matrix_px = matrix_px  # the model the integer shifts came from
        self.move_px = move  # (N_bf, 2) each pixel's integer shift (OUTSIDE_PX: left out)
        keys = np.column_stack([finest_tile, move])
        uniq, group_of = np.unique(keys, axis=0, return_inverse=True)
        self.finest_tile = finest_tile  # (N_bf,) finest tile of each BF pixel
        self.fine_of_group = np.ascontiguousarray(uniq[:, 0], dtype=np.int64)
        self.move = np.ascontiguousarray(uniq[:, 1:], dtype=np.int64)
        counts = np.bincount(group_of.ravel(), minlength=len(uniq))
        self.members = counts.astype(np.float32)
        self._order = np.argsort(group_of.ravel(), kind="stable").astype(np.int64)
        self._bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.sums_t = np.zeros((len(uniq), 0), np.float32)  # (groups, window positions)
        self.window = ((0, 0), (0, 0))
        self._hits = np.zeros(0, np.int64)  # each window position's frames when summed
        self.summed = 0  # positions summed by the last refresh (for the log and the tests)
        self._finest: tuple[np.ndarray, np.ndarray] | None = None  # tile sums, member counts
        self.refresh(stack, hits, exposure, rows, cols, scan_cols)

    def refresh(self, stack, hits, exposure, rows, cols, scan_cols) -> None:
        """The group images over the window rows x cols: positions summed before with the
        same frame count are kept, the others summed from the stack."""
        shape = (rows[1] - rows[0], cols[1] - cols[0])
        pos = (np.arange(*rows)[:, None] * scan_cols + np.arange(*cols)[None, :]).ravel()
        now = hits[pos].astype(np.int64)
        if (tuple(rows), tuple(cols)) == self.window:
            sums, done = self.sums_t, self._hits == now
        else:
            sums = np.zeros((len(self.members), pos.size), np.float32)
            done = np.zeros(pos.size, bool)
            (o0, o1), _ = self.window
            lo, hi = max(rows[0], o0), min(rows[1], o1)
            if lo < hi and tuple(cols) == self.window[1]:  # rows shared with the last window
                new = slice((lo - rows[0]) * shape[1], (hi - rows[0]) * shape[1])
                old = slice((lo - o0) * shape[1], (hi - o0) * shape[1])
                sums[:, new] = self.sums_t[:, old]
                done[new] = self._hits[old] == now[new]
        todo = np.flatnonzero(~done & (now > 0))
        exact = bool(np.issubdtype(stack.dtype, np.integer))
        group_sums(stack, pos[todo], todo, self._order, self._bounds, exact,
                   np.int64(0) if exact else 0.0, sums)  # fmt: skip
        sums[:, np.flatnonzero(now == 0)] = 0.0
        self.sums_t, self._hits, self.window = sums, now, (tuple(rows), tuple(cols))
        self.summed = todo.size
        self.shape = shape
        w = exposure[pos]
        self.scale = np.divide(1.0, w, out=np.zeros(w.shape), where=w > 0)  # 0: left out
        self.release_tiles()

    def release_tiles(self) -> None:
        """Drop the finest tiles' sums (formed again by the next `tile_images`)."""
        self._finest = None

    def tile_images(self, pixel_tile: np.ndarray, n_tiles: int) -> np.ndarray:
        """(n_tiles, rows, cols): mean per member of each tile, every pixel moved by its shift."""
        if self._finest is None:
            n_fine = int(self.finest_tile.max()) + 1
            fine = np.zeros((n_fine, *self.shape), np.float32)
            fine_count = np.zeros_like(fine)
            scatter_groups(self.sums_t, self.scale, self.fine_of_group, self.move, self.members,
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
    a model moves some pixel by more than `regroup_px` from where they were formed; `previous`
    (the last update's `groups`) is reused the same way, refreshed where frames arrived since,
    when no pixel was excluded in between. Holds the stack it reads."""

    def __init__(self, stack: np.ndarray, hits: np.ndarray, exposure: np.ndarray,
                 window: Window, scan_cols: int, layout: TileLevels, k_px: np.ndarray,
                 excluded_px: np.ndarray, regroup_px: float,
                 previous: PixelGroups | None = None):  # fmt: skip
        self._args = (stack, hits, exposure, window[0], window[1], scan_cols)
        self.layout = layout
        self.k_px = k_px
        self.excluded_px = excluded_px  # (N_bf,) bool: moved off every tile
        self.regroup_px = regroup_px
        self.groups: PixelGroups | None = None
        self.previous = previous

    def tile_images(self, bin_px: int, matrix_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images (n_tiles, rows, cols) of level `bin_px`, the model their shifts came from)."""
        shifts = self.k_px @ matrix_px.T
        if self.groups is None and self.previous is not None and self.fits(self.previous, shifts):
            self.previous.refresh(*self._args)
            self.groups = self.previous
        self.previous = None
        if self.groups is None or not self.fits(self.groups, shifts):
            move = np.rint(shifts).astype(np.int64)
            move[self.excluded_px] = OUTSIDE_PX
            self.groups = PixelGroups(*self._args, self.layout.member_tile[-1], move,
                                      matrix_px.copy())  # fmt: skip
        lvl = self.layout.bins.index(bin_px)
        images = self.groups.tile_images(self.layout.member_tile[lvl], self.layout.n_tiles[lvl])
        return images, self.groups.matrix_px

    def kept(self) -> PixelGroups | None:
        """The groups, to be refreshed by a later update, without their tile sums (formed
        again after a refresh): what stays in memory between updates is the group images.
        An update that formed no tile images (no trusted level) keeps `previous`."""
        kept = self.groups if self.groups is not None else self.previous
        if kept is not None:
            kept.release_tiles()
        return kept

    def fits(self, groups: PixelGroups, shifts: np.ndarray) -> bool:
        """Whether `groups` serve the model shifts: the same pixels left out, and none moved
        by more than `regroup_px` from the model they were formed with."""
        out = groups.move_px[:, 0] == OUTSIDE_PX
        if not np.array_equal(out, self.excluded_px):
            return False
        moved = np.abs(shifts - self.k_px @ groups.matrix_px.T)[~out]
        return moved.size == 0 or moved.max() <= self.regroup_px
