"""The receiver side of the merge phase: a receiver's growth taken out of its state as
`StateDelta`s, each frame sent once (a worker's deltas to the coordinator, `stream.worker`)."""

from __future__ import annotations

import numpy as np

from tcbf_live.stream.tcbf.accumulators import (
    NEXT_INDEX,
    ROW_FIELDS,
    SENT,
    STATS_SLOTS,
    AccumulatorState,
    StateDelta,
    carve,
)
from tcbf_live.stream.tcbf.row_block import RowBlock


class DeltaTaker:
    """Takes a receiver's growth out of its state as `StateDelta`s: the touched rows are
    copied and zeroed (so the next delta holds only what came after), the claimed indices are
    marked sent (still claimed: later duplicates are still caught). Between two takes the
    state holds only the frames since the last one, so a receiver sends each frame once.
    With a `RowBlock` (a worker's: `Accumulators(block=)`) the rows are the block's used
    ones, taken in position order and freed."""

    def __init__(self, state: AccumulatorState, rows: RowBlock | None = None):
        self.state, self.rows = state, rows
        self._sent_stats = np.zeros(STATS_SLOTS, np.int64)

    def buffers_layout(self) -> dict[str, tuple[tuple, np.dtype]]:
        """The layout (`AccumulatorState.layout`) of `buffers`: the state's row fields."""
        arrays = self.state.arrays()
        return {name: (arrays[name].shape, arrays[name].dtype) for name in ROW_FIELDS}

    def buffers(self, memory: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Arrays a delta of this state's rows can be taken into (`take(out=)`), one per row
        field, as many rows as the state (a worker's: its block), carved from `memory` (uint8,
        `AccumulatorState.block_bytes(buffers_layout())`) when given. Reused from delta to
        delta they stay in memory, where new arrays each time meet fresh pages (the kernel
        zeroes each one on its first write; on the benchmarks' VM at ~0.5 GB/s)."""
        if memory is not None:
            return carve(self.buffers_layout(), memory)
        return {name: np.empty(*spec) for name, spec in self.buffers_layout().items()}

    def take(self, out: dict[str, np.ndarray] | None = None) -> StateDelta:
        """The growth since the last take (its values views of `out`, from `buffers()`, when
        given; else new arrays); the state's rows are zeroed."""
        s, arrays = self.state, self.state.arrays()
        if self.rows is None:
            rows = src = clear = np.flatnonzero(s.hits)
        else:
            positions = self.rows.release()
            clear = slice(0, positions.size)
            ordered = positions.size < 2 or bool((positions[1:] > positions[:-1]).all())
            src = clear if ordered else np.argsort(positions)  # an in-order stream: a copy
            rows = positions if ordered else positions[src]
        values = {}
        for name in ROW_FIELDS:
            a = arrays[name]
            if out is None:
                values[name] = a[src].copy() if isinstance(src, slice) else a[src]
            elif isinstance(src, slice):
                values[name] = out[name][: rows.size]
                values[name][...] = a[src]
            else:
                values[name] = np.take(a, src, axis=0, out=out[name][: rows.size], mode="clip")
        for name in ROW_FIELDS:
            arrays[name][clear] = 0
        seen = np.flatnonzero(s.seen == 1)
        s.seen[seen] = SENT
        stats = s.stats - self._sent_stats
        stats[NEXT_INDEX] = s.stats[NEXT_INDEX]
        self._sent_stats = s.stats.copy()
        return StateDelta(rows, values, seen, stats)
