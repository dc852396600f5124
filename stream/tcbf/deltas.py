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

    def take(self) -> StateDelta:
        s, arrays = self.state, self.state.arrays()
        if self.rows is None:
            rows = src = clear = np.flatnonzero(s.hits)
        else:
            positions = self.rows.release()
            src, clear = np.argsort(positions), slice(0, positions.size)
            rows = positions[src]
        values = {name: arrays[name][src] for name in ROW_FIELDS}
        for name in ROW_FIELDS:
            arrays[name][clear] = 0
        seen = np.flatnonzero(s.seen == 1)
        s.seen[seen] = SENT
        stats = s.stats - self._sent_stats
        stats[NEXT_INDEX] = s.stats[NEXT_INDEX]
        self._sent_stats = s.stats.copy()
        return StateDelta(rows, values, seen, stats)
