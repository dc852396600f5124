"""A receiver's recycled accumulator rows: a worker's state holds the scan positions it folded
since its last delta, in a fixed block of rows, not one row for every position of the scan.

A worker sends what it folds as `StateDelta`s every sync interval, so between two deltas its
state holds only the frames since the last one. With one row per scan position, each delta left
zeros that went back to the OS to keep the worker small, and every frame then wrote into fresh
memory: the kernel's page zeroing cost about 7 µs per frame on the VM the benchmarks ran on,
and since PUSH deals frames round robin, each of N workers touched nearly every page of the
stack. A `RowBlock` gives a position a row of the block when the first of its frames after a
delta arrives (`kernels.claim`); the delta takes the used rows, in position order, and frees
them. The same memory is written again and again, and the worker's memory is the block.

The block's owner lets no kernel call fold more frames than `free` rows (each frame takes at
most one new row); a frame that still finds none is left unclaimed and counted (`lost`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcbf_live.stream.tcbf.kernels import NO_ROOM, ROWS_USED

BLOCK_BYTES = 64 << 20  # rows of about this many bytes in all ...
MIN_ROWS = 2048  # ... but at least this many (more than one call of the compiled lane)


@dataclass(frozen=True)
class RowBlock:
    slot_of: np.ndarray  # (n_pos,) int64: the row of each position, -1: none
    slot_pos: np.ndarray  # (capacity,) int64: the position of each used row
    count: np.ndarray  # int64[2]: rows used (ROWS_USED), frames that found none (NO_ROOM)

    @classmethod
    def empty(cls, n_pos: int, capacity: int) -> RowBlock:
        return cls(np.full(n_pos, -1, np.int64), np.zeros(capacity, np.int64),
                   np.zeros(2, np.int64))  # fmt: skip

    @classmethod
    def identity(cls) -> RowBlock:
        """No block: the kernels fold position j into row j (the arguments for a state with
        one row per position)."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(2, np.int64))

    @staticmethod
    def capacity(n_pos: int, row_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
        """Rows for a state whose rows take `row_bytes` each: about `block_bytes` in all, at
        least MIN_ROWS, at most the scan's positions."""
        return int(min(n_pos, max(MIN_ROWS, block_bytes // max(row_bytes, 1))))

    def kernel_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.slot_of, self.slot_pos, self.count

    @property
    def used(self) -> int:
        return int(self.count[ROWS_USED])

    @property
    def free(self) -> int:
        return self.slot_pos.size - self.used

    @property
    def lost(self) -> int:
        return int(self.count[NO_ROOM])

    def release(self) -> np.ndarray:
        """The positions of the used rows, in row order; every row is free again (the caller
        has taken and zeroed their values)."""
        positions = self.slot_pos[: self.used].copy()
        self.slot_of[positions] = -1
        self.count[ROWS_USED] = 0
        return positions
