"""Memory budget: what one series will allocate, checked before anything is allocated.

A size claimed on the wire (a scan of 65536^2 positions, a 10^6 x 10^6 detector) or on the
command line must be refused with a reason, never discovered by a failing allocation that takes
the ingest thread down. Pure: numbers in, bytes or a refusal reason out.

The budget defaults to half of the machine's memory (the smaller of the physical RAM and a
cgroup limit), overridden by the environment variable `TCBF_MEMORY_BUDGET` or a flag
(`--memory-budget`); both take bytes with an optional unit (`8G`, `512MiB`, `2e9`).

What a series allocates (n scan positions, P detector pixels, f upsampling factor):
- per-position maps: totals, BF, axial BF (float64), hits (uint32), their read-out copies,
  the frames-seen flags (one byte per expected frame), ring images (8 float32);
- the per-BF-pixel stack (n x N_bf, uint16 for unsigned frames, float32 otherwise) and the
  alignment tile sums (n x tiles, float32). N_bf is only known once the series is calibrated:
  `n_bf=None` leaves both out, a lower bound. The engine checks that lower bound at the series
  start and the exact figure at calibration, before either is allocated; bounding N_bf by the
  detector's pixel count instead would refuse ordinary series (a 256^2 scan on a 256^2
  detector would claim 8.6 GB for a disk that covers a few thousand pixels);
- the shift-and-add grid: numerator and denominator, (rows f, cols f, 2 halves) float64 each,
  plus two float64 read-out images of (rows f, cols f);
- the calibration frames held until the series calibrates (and their concatenated copy) with
  float64 work images of one frame.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields

import numpy as np

ENV_VAR = "TCBF_MEMORY_BUDGET"
RAM_FRACTION = 0.5  # default budget: this fraction of the machine's memory
FALLBACK_BYTES = 4 << 30  # when the machine's memory cannot be read
CALIBRATION_FRAMES = 64  # ProcessingSettings' default
RING_IMAGES = 8  # annular vBF images kept for the viewer (stream.tcbf.RINGS)
ALIGNMENT_FIELD_PX = 128  # the alignment window's side (AlignmentSettings.max_field_px)
STAGE_FRAMES = 36  # staging buffer of small messages plus one decompression scratch frame
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}  # fmt: skip


class BudgetError(ValueError):
    """A memory budget that is not a positive size (bad flag or environment value)."""


class BudgetExceeded(ValueError):
    """A series whose allocations would not fit the memory budget (the message says why)."""


def parse_bytes(text: str) -> int:
    """'8G', '8 GiB', '512M', '2e9', '1073741824' -> bytes (decimal k/M/G/T, binary Ki/Mi/...).
    BudgetError for anything else or a size below 1 MiB."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise BudgetError(f"not a memory size: {text!r} (e.g. 8G, 512MiB, 2e9)")
    value = float(match.group(1)) * _UNITS[match.group(2) or ""]
    if not math.isfinite(value) or value < 1 << 20:
        raise BudgetError(f"memory budget {text!r} is below 1 MiB")
    return int(value)


def machine_memory_bytes() -> int | None:
    """Physical memory, or the cgroup (container) limit when that is smaller; None if unknown."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 1 << 60:  # "max" / huge: no limit
            sizes.append(int(text))
    sizes = [s for s in sizes if s > 0]
    return min(sizes) if sizes else None


def memory_budget_bytes(override: int | None = None) -> int:
    """The budget in bytes: `override` (a flag), else $TCBF_MEMORY_BUDGET, else RAM_FRACTION
    of the machine's memory. BudgetError for an unusable environment value."""
    if override is not None:
        if override < 1 << 20:
            raise BudgetError(f"memory budget of {override} bytes is below 1 MiB")
        return int(override)
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return parse_bytes(env)
        except BudgetError as err:
            raise BudgetError(f"{ENV_VAR}: {err}") from None
    total = machine_memory_bytes()
    return int(total * RAM_FRACTION) if total else FALLBACK_BYTES


@dataclass(frozen=True)
class SeriesFootprint:
    """Bytes one series allocates, by component (see the module docstring)."""

    position_maps: int
    stack: int
    tile_sums: int
    shift_and_add: int
    frame_buffers: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        parts = ", ".join(f"{f.name.replace('_', ' ')} {format_bytes(getattr(self, f.name))}"
                          for f in fields(self) if getattr(self, f.name))  # fmt: skip
        return f"{format_bytes(self.total)} ({parts})"


def format_bytes(n: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def series_footprint(
    scan_shape: tuple[int, int],
    detector_shape: tuple[int, int] | None,
    itemsize: int,
    n_bf: int | None = None,
    upsample: int = 8,
    *,
    frames_expected: int | None = None,
    n_tiles: int | None = None,
    calibration_frames: int = CALIBRATION_FRAMES,
    integer_stack: bool = True,
) -> SeriesFootprint:
    """Bytes by component for a scan of `scan_shape` positions on a `detector_shape` detector
    (None: unknown, its buffers left out) with `itemsize`-byte pixels. `n_bf` BF pixels (None:
    not known yet, stack and tile sums left out), `upsample` the shift-and-add factor,
    `frames_expected` the frames-seen flags (default one per position), `n_tiles` the alignment
    tile count (default an upper bound from n_bf), `integer_stack` a uint16 stack (unsigned
    frames) rather than float32. Python integers: no overflow for any claim."""
    n = int(scan_shape[0]) * int(scan_shape[1])
    f = max(int(upsample), 1)
    seen = int(frames_expected) if frames_expected is not None else n
    # totals/BF/axial float64 + hits uint32, the same again as read-out copies, ring images
    # (float32) and their copy, the shift-and-add deposit counts (uint32)
    maps = n * (2 * (3 * 8 + 4) + 2 * RING_IMAGES * 4 + 4) + seen
    stack = tiles = 0
    if n_bf is not None:
        stack = n * int(n_bf) * (2 if integer_stack else 4)
        t = int(n_tiles) if n_tiles is not None else int(n_bf) // 8 + 16
        window = min(n, ALIGNMENT_FIELD_PX**2)  # the alignment's copy of its window
        tiles = (n + window) * t * 4
    # num and den (rows f, cols f, 2) float64, image and shift-and-add read-outs float64
    grid = n * f * f * (2 * 2 * 8 + 2 * 8)
    buffers = 0
    if detector_shape is not None:
        pixels = int(detector_shape[0]) * int(detector_shape[1])
        held = 2 * calibration_frames + STAGE_FRAMES  # held + concatenated, staging/scratch
        buffers = pixels * (held * int(itemsize) + 3 * 8)  # + float64 mean, filter, mask
    return SeriesFootprint(maps, stack, tiles, grid, buffers)


def series_bytes(
    scan_shape: tuple[int, int],
    detector_shape: tuple[int, int] | None,
    itemsize: int,
    n_bf: int | None = None,
    upsample: int = 8,
    **kwargs,
) -> int:
    """Total bytes of `series_footprint` (same arguments)."""
    return series_footprint(scan_shape, detector_shape, itemsize, n_bf, upsample,
                            **kwargs).total  # fmt: skip


def check_series(
    scan_shape: tuple[int, int],
    detector_shape: tuple[int, int] | None,
    itemsize: int,
    budget_bytes: int,
    n_bf: int | None = None,
    upsample: int = 8,
    **kwargs,
) -> str | None:
    """None if the series fits in `budget_bytes`, else the one-line reason it is refused."""
    fp = series_footprint(scan_shape, detector_shape, itemsize, n_bf, upsample, **kwargs)
    if fp.total <= budget_bytes:
        return None
    rows, cols = scan_shape
    det = f" on a {detector_shape[0]}x{detector_shape[1]} detector" if detector_shape else ""
    bf = f", {n_bf} BF px" if n_bf is not None else ""
    return (f"a {rows}x{cols} scan{det}{bf} needs {fp.describe()}, over the "
            f"memory budget of {format_bytes(budget_bytes)} (set --memory-budget or "
            f"{ENV_VAR})")  # fmt: skip


def upsampling_bound(info, upsample: int | None = None,
                     angular_sampling_mrad: float | None = None) -> int:  # fmt: skip
    """The shift-and-add factor of a series (`info`: detectors.base.SeriesInfo), by the tcBF
    processor's rule: `upsample` when set, else from the optics. Before calibration (no angular
    sampling) an upper bound: the calibrated sampling can only lower it."""
    if upsample:
        return int(upsample)
    from tcbf_live.stream.tcbf.optics import wavelength_A
    from tcbf_live.stream.tcbf.reconstruction import default_upsampling

    sampling = angular_sampling_mrad or info.angular_sampling_mrad
    wavelength = wavelength_A(info.energy_eV) if info.energy_eV else None
    return default_upsampling(info.step_A, wavelength, info.semiangle_mrad,
                              max(info.detector_shape), sampling)  # fmt: skip


WORKER_BYTES_PER_POSITION = 21  # a worker's row of each position (8), read offsets (8 + 4, 1)


def check_info(info, budget_bytes: int, *, n_bf: int | None = None, n_tiles: int | None = None,
               frame_limit: int | None = None, upsample: int | None = None,
               angular_sampling_mrad: float | None = None,
               calibration_frames: int = CALIBRATION_FRAMES,
               block_rows: int | None = None) -> str | None:  # fmt: skip
    """`check_series` for an announced series (SeriesInfo with its scan shape): pixel size,
    stack type and upsampling factor from its metadata. None if it fits. `block_rows`: a
    worker's, which holds a state of that many rows (`RowBlock`) and reconstructs nothing."""
    kind = np.dtype(info.dtype)
    if block_rows is not None:  # the block, a delta's copy of it, the per-position maps
        from tcbf_live.stream.tcbf.accumulators import AccumulatorState

        n_pos = math.prod(info.scan_shape)
        block = AccumulatorState.block_bytes(AccumulatorState.layout(
            block_rows, n_bf or 0, n_tiles or 0, frame_limit or n_pos, kind.kind == "u"))
        need = 2 * block + WORKER_BYTES_PER_POSITION * n_pos
        return None if need <= budget_bytes else (
            f"a worker's block of {block_rows} rows needs {format_bytes(need)}, over the "
            f"memory budget of {format_bytes(budget_bytes)} (set --memory-budget or {ENV_VAR})")
    return check_series(
        info.scan_shape, info.detector_shape, kind.itemsize, budget_bytes, n_bf,
        upsampling_bound(info, upsample, angular_sampling_mrad),
        frames_expected=frame_limit, n_tiles=n_tiles, calibration_frames=calibration_frames,
        integer_stack=kind.kind == "u",
    )  # fmt: skip
