"""The numba kernels of ingest and of the solve's passes over the per-BF-pixel stack.

Compiled once and cached (`cache=True`); each releases the GIL (`nogil=True`) so ingest and
the alignment thread run on two cores.

Accumulate (one pass per frame, no Python per frame): `accumulate_frames` claims each frame's
scan position (`claim`: out-of-range and duplicate indices counted, serpentine scans mapped)
and folds it into every per-position sum (`fold`): total counts (masked pixels excluded), BF
counts, axial virtual BF, the frame's BF-pixel values into the per-BF-pixel stack, and the
binned tile sums of every alignment level. The BF pixels are ordered so that every tile, at
every level, is one contiguous run (`tiles.TileLevels`); one running (prefix) sum of the
frame's BF values then gives every tile of every level as a difference of two entries, so each
BF pixel is read once and short per-tile loops are avoided (27 % of the kernel's time at 96x96).

Solve (plain loops over the per-BF-pixel stack):
- `deposit`: bilinear splat of BF-pixel values onto the upsampled shift-and-add grid;
- `ring_sums`: annular virtual-BF images;
- `window_column_sums`: each BF pixel's sum over a scan window.

The weak-phase transfer of a chi to third order has its own module (`chi_kernels.py`), the
tile images re-formed from pixel groups theirs (`tile_kernels.py`), and the kernels over
spectra theirs (`spectral_kernels.py`).
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


# fast-math without "no NaN / no inf": sums may be reordered (vectorised), but a float frame's
# non-finite values are still seen as such (screening excludes that frame, not its neighbours)
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

# stats slots of the kernel
ACCEPTED, DUPLICATE, OUT_OF_RANGE, OUT_OF_ORDER, NEXT_INDEX = range(5)


# RowBlock.count slots: rows in use, frames that found no free row
ROWS_USED, NO_ROOM = range(2)


@numba.njit(nogil=True, cache=True)
def claim(idx, n_pos, cols, serpentine, seen, stats, slot_of, slot_pos, slot_count):
    """(scan position (flat, raster), accumulator row) of acquisition index `idx`, or (-1, -1)
    for an index out of range or already seen (counted in `stats`). The row is the position,
    or with a row block (`slot_of` not empty, `RowBlock`) the position's row since the last
    delta, else the next free one. A block that is full (its owner lets no call fold more
    frames than it has rows free, so this is a defect) leaves the frame unclaimed, as if it
    had not arrived, and counts it in `slot_count[NO_ROOM]`."""
    if idx < 0 or idx >= seen.shape[0]:
        stats[OUT_OF_RANGE] += 1
        return -1, -1
    if seen[idx]:
        stats[DUPLICATE] += 1
        return -1, -1
    k = idx % n_pos
    row = k // cols
    col = k - row * cols
    if serpentine and (row & 1) == 1:
        col = cols - 1 - col
    j = row * cols + col
    r = j
    if slot_of.shape[0] > 0:
        r = slot_of[j]
        if r < 0:
            r = slot_count[ROWS_USED]
            if r >= slot_pos.shape[0]:
                slot_count[NO_ROOM] += 1
                return -1, -1
            slot_of[j] = r
            slot_pos[r] = j
            slot_count[ROWS_USED] = r + 1
    seen[idx] = 1
    if idx < stats[NEXT_INDEX]:
        stats[OUT_OF_ORDER] += 1
    else:
        stats[NEXT_INDEX] = idx + 1
    return j, r


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def fold(f, j, r, bf_index, tile_start, tile_stop, axial_index, masked_index, cap, zero,
          exact, vals, cum, totals, bf_sum, axial_sum, hits, stack, tiles, stats, moments,
          read_offset, masked_flag, det_cols) -> None:  # fmt: skip
    """Add one flat frame `f` of position `j` into row `r` of every accumulator (`claim`: `j`
    itself, or a recycled row of a `RowBlock`). Tile sums are prefix-sum
    differences for integer frames (exact in int64); float frames sum each tile, so that one
    non-finite pixel spoils only its own tiles.

    Descan compensation (`descan_compensation.py`): the BF pixels are read at the flat offset
    `read_offset[j]` (the disk's whole-pixel displacement there; a masked pixel under the
    shifted disk reads its unshifted BF pixel), and when `det_cols` > 0 the frame's first
    moments (unmasked counts x detector row, col) are added to `moments[j]`."""
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
    if det_cols > 0:
        frame_moments(f, det_cols, masked_index, moments[r])
    off = read_offset[j]
    run = zero
    if off == 0:
        for i in range(n_bf):
            v = f[bf_index[i]]
            vals[i] = v
            run += v
            cum[i + 1] = run
    else:
        for i in range(n_bf):
            p = bf_index[i] + off
            v = f[bf_index[i]] if masked_flag[p] else f[p]
            vals[i] = v
            run += v
            cum[i + 1] = run
    srow = stack[r]
    for i in range(n_bf):  # separate loop: vectorises
        s = srow[i] + vals[i]
        srow[i] = s if s < cap else cap
    ax = zero
    for i in axial_index:
        ax += vals[i]
    trow = tiles[r]
    if exact:
        for t in range(tile_start.shape[0]):
            trow[t] += cum[tile_stop[t]] - cum[tile_start[t]]
    else:
        for t in range(tile_start.shape[0]):
            acc = zero
            for i in range(tile_start[t], tile_stop[t]):
                acc += vals[i]
            trow[t] += acc
    totals[r] += tot
    bf_sum[r] += run
    axial_sum[r] += ax
    hits[r] += 1
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
    moments: np.ndarray,  # (n_pos, 2) float64: first moments (when det_cols > 0)
    read_offset: np.ndarray,  # (n_pos,) int64 flat offset the BF pixels are read at
    masked_flag: np.ndarray,  # (Qx*Qy,) uint8: 1 = masked
    det_cols: int,  # detector columns; 0: no moments
    slot_of: np.ndarray,  # RowBlock (n_pos,) int64, or empty: the arrays above are per position
    slot_pos: np.ndarray,  # RowBlock (capacity,) int64
    slot_count: np.ndarray,  # RowBlock int64[2]
) -> None:
    vals = np.zeros(bf_index.shape[0], type(zero))  # a frame's BF values
    cum = np.zeros(bf_index.shape[0] + 1, type(zero))  # their running sum (exact for integers)
    cap = type(zero)(stack_max)
    for b in range(frames.shape[0]):
        j, r = claim(indices[b], n_pos, cols, serpentine, seen, stats, slot_of, slot_pos,
                     slot_count)  # fmt: skip
        if j >= 0:
            fold(frames[b], j, r, bf_index, tile_start, tile_stop, axial_index, masked_index,
                  cap, zero, exact, vals, cum, totals, bf_sum, axial_sum, hits, stack, tiles,
                  stats, moments, read_offset, masked_flag, det_cols)  # fmt: skip


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def frame_moments(f, det_cols, masked_index, out) -> None:
    """out += (sum of counts x detector row, sum of counts x detector col) of the flat frame
    `f` over its unmasked pixels (the frame's centre of mass times its counts). In float64,
    which vectorises where 64-bit integer products do not (AVX2): exact for whole counts
    while a frame's sums stay below 2**53."""
    mr = 0.0
    mc = 0.0
    for r in range(f.shape[0] // det_cols):
        rs = 0.0
        cs = 0.0
        row = f[r * det_cols : (r + 1) * det_cols]
        for c in range(det_cols):
            v = np.float64(row[c])
            rs += v
            cs += v * np.float64(c)
        mr += rs * r
        mc += cs
    for m in masked_index:
        mr -= np.float64(f[m]) * (m // det_cols)
        mc -= np.float64(f[m]) * (m % det_cols)
    out[0] += mr
    out[1] += mc


@numba.njit(nogil=True, cache=True)
def add_rows(target, rows, values, fresh, top) -> None:
    """target[rows[i]] += values[i] for a 2-D per-position sum (merge of a receiver's rows):
    a row the target has no frames at yet (`fresh`) is copied; otherwise the values add in
    their own type, saturating at `top` when it is >= 0 (the uint16 stack, as the accumulate
    kernel does). Bit for bit what numpy's row-wise addition gives, at memory speed."""
    saturate = top >= 0
    for i in range(rows.shape[0]):
        r = rows[i]
        if fresh[i]:
            target[r, :] = values[i, :]
        elif saturate:
            for j in range(target.shape[1]):
                s = np.int64(target[r, j]) + np.int64(values[i, j])
                target[r, j] = s if s < top else top
        else:
            for j in range(target.shape[1]):
                target[r, j] += values[i, j]


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def stack_moments(stack: np.ndarray, rows: np.ndarray, k_px: np.ndarray, out: np.ndarray) -> None:
    """For the positions `rows` of `stack` (n_pos, N_bf): out[j] = (sum of the counts, sum
    counts x k_row, sum counts x k_col) of position rows[j], `k_px` (N_bf, 2) float64; one
    pass, no copy of the stack (the descan's first moments: `descan.disk_moments`)."""
    for j in range(rows.shape[0]):
        row = stack[rows[j]]
        t = r = c = 0.0
        for i in range(row.shape[0]):
            v = np.float64(row[i])
            t += v
            r += v * k_px[i, 0]
            c += v * k_px[i, 1]
        out[j, 0], out[j, 1], out[j, 2] = t, r, c
