"""Every numba kernel of the science core (except the ingest kernels of `accumulators`).

Compiled once and cached (`cache=True`); each releases the GIL (`nogil=True`) so the
alignment thread runs beside ingest. Plain loops over the per-BF-pixel stack:
- `deposit`: bilinear splat of BF-pixel values onto the upsampled shift-and-add grid;
- `group_sums`, `scatter_groups`: tile images re-formed from pixel groups moved by their shift;
- `ring_sums`: annular virtual-BF images;
- `window_column_sums`: each BF pixel's sum over a scan window.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, fastmath=True)
def deposit(
    stack: np.ndarray,  # (n_pos, N_bf) per-BF-pixel values
    exposure: np.ndarray,  # (n_pos,) exposure per position (frames x relative dose; 0: none)
    positions: np.ndarray,  # (M,) flat positions to deposit
    cols: int,
    factor: int,
    offsets: np.ndarray,  # (N_bf, 2) int64 from splat_weights
    weights: np.ndarray,  # (N_bf, 4)
    inv_gain: np.ndarray,  # (N_bf,) 1 / mean value of each BF pixel
    half: np.ndarray,  # (N_bf,) int: which half-set accumulator the pixel feeds (0 or 1)
    num: np.ndarray,  # (rows f, cols f, 2) float64: the halves interleaved (cache locality)
    den: np.ndarray,  # (rows f, cols f, 2) float64
) -> None:
    n_bf = stack.shape[1]
    h_max, w_max = num.shape[0], num.shape[1]
    for j in positions:
        h = exposure[j]
        if h == 0:
            continue
        r = j // cols
        c = j - r * cols
        scale = 1.0 / h
        row = stack[j]
        for i in range(n_bf):
            v = row[i] * inv_gain[i] * scale
            pr = r * factor + offsets[i, 0]
            pc = c * factor + offsets[i, 1]
            hh = half[i]
            if 0 <= pr and pr + 1 < h_max and 0 <= pc and pc + 1 < w_max:
                num[pr, pc, hh] += weights[i, 0] * v
                den[pr, pc, hh] += weights[i, 0]
                num[pr, pc + 1, hh] += weights[i, 1] * v
                den[pr, pc + 1, hh] += weights[i, 1]
                num[pr + 1, pc, hh] += weights[i, 2] * v
                den[pr + 1, pc, hh] += weights[i, 2]
                num[pr + 1, pc + 1, hh] += weights[i, 3] * v
                den[pr + 1, pc + 1, hh] += weights[i, 3]
            else:
                for q in range(4):
                    rr = pr + q // 2
                    cc = pc + q % 2
                    if 0 <= rr < h_max and 0 <= cc < w_max:
                        num[rr, cc, hh] += weights[i, q] * v
                        den[rr, cc, hh] += weights[i, q]


@numba.njit(nogil=True, cache=True)
def group_sums(stack, exposure, rows, cols, scan_cols, group_of, out):
    """out[p, g] = sum over BF pixels i of group g of stack[p, i] / exposure[p] (frames x
    relative dose), for the positions
    p of the window rows [rows[0], rows[1]) x cols [cols[0], cols[1]) (row-major)."""
    width = cols[1] - cols[0]
    for r in range(rows[0], rows[1]):
        for c in range(cols[0], cols[1]):
            p = r * scan_cols + c
            h = exposure[p]
            if h == 0:
                continue
            scale = 1.0 / h
            dst = out[(r - rows[0]) * width + (c - cols[0])]
            row = stack[p]
            for i in range(row.shape[0]):
                dst[group_of[i]] += row[i] * scale


@numba.njit(nogil=True, cache=True)
def scatter_groups(groups_t, valid, tile_of_group, move, members, out, count):
    """Add every group image (groups_t[g], row-major over the window) moved by its integer
    shift into its tile; then mean per member, and the tile's mean where nothing landed."""
    n_tiles, n_rows, width = out.shape
    for g in range(groups_t.shape[0]):
        t = tile_of_group[g]
        dr = move[g, 0]
        dc = move[g, 1]
        m = members[g]
        src = groups_t[g]
        for r in range(max(0, -dr), min(n_rows, n_rows - dr)):
            base = r * width
            for c in range(max(0, -dc), min(width, width - dc)):
                if valid[base + c]:
                    out[t, r + dr, c + dc] += src[base + c]
                    count[t, r + dr, c + dc] += m
    for t in range(n_tiles):
        total = 0.0
        covered = 0
        for r in range(n_rows):
            for c in range(width):
                if count[t, r, c] > 0:
                    out[t, r, c] /= count[t, r, c]
                    total += out[t, r, c]
                    covered += 1
        fill = total / covered if covered else 0.0
        for r in range(n_rows):
            for c in range(width):
                if count[t, r, c] == 0:
                    out[t, r, c] = fill


@numba.njit(nogil=True, cache=True)
def ring_sums(stack, exposure, positions, ring_of, out) -> None:
    """out[r, p] = counts per frame at position p of the BF pixels in ring r (annuli of the
    disk), recomputed for the given positions: virtual-BF images of any radius are cumulative
    sums of these."""
    for p in positions:
        for r in range(out.shape[0]):
            out[r, p] = 0.0
        h = exposure[p]
        if h == 0:
            continue
        row = stack[p]
        scale = 1.0 / h
        for i in range(row.shape[0]):
            out[ring_of[i], p] += row[i] * scale


@numba.njit(nogil=True, cache=True)
def window_column_sums(stack, exposure, rows, cols, scan_cols, out) -> float:
    """out[i] = sum of stack[p, i] over the window's positions with exposure; returns the
    exposure summed."""
    total = 0.0
    for r in range(rows[0], rows[1]):
        for c in range(cols[0], cols[1]):
            p = r * scan_cols + c
            if exposure[p] == 0:
                continue
            total += exposure[p]
            row = stack[p]
            for i in range(row.shape[0]):
                out[i] += row[i]
    return total
