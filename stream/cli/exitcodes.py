"""Exit codes of `tcbf-live run` and `reconstruct`, so a facility's scripts can act on them.

The numbers are part of the interface (docs/reliability.md, `tcbf-live run --help`): never
renumber them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a `run` or `reconstruct` ended with."""

    COMPLETE = 0  # a complete result was written (with a model or an explicit "no model")
    INTERNAL = 1  # an unexpected error (a bug): one line, the traceback with -v
    USAGE = 2  # refused input: bad flag, would overwrite, output is the input, impossible size
    INCOMPLETE = 3  # a result was written, but the series ended early, frames are missing, or
    #                 it is suspect (e.g. a missed trigger): do not present it as good
    EMPTY = 4  # no series, or no frames, received: no file written
    UNUSABLE = 5  # a series was refused or could not be processed (calibration failed, over
    #               the memory budget, inconsistent metadata); no file for it


EPILOG = """exit codes:
  0  complete: a complete result was written
  1  internal error (a bug; -v shows the traceback)
  2  refused input: bad flag, the output exists (see --overwrite) or is the input,
     a size that cannot fit the memory budget
  3  incomplete: a result was written, but the series ended early, frames are
     missing or it is suspect (e.g. a missed trigger)
  4  empty: no series or no frames received; no file written
  5  unusable: a series was refused or could not be processed (calibration
     failed, over the memory budget, inconsistent metadata); no file for it"""


def series_code(result) -> ExitCode:
    """COMPLETE or INCOMPLETE for one written result: complete means the series ended normally,
    no expected frame is missing and nothing makes it suspect (`result.suspect`)."""
    if result.complete and not result.frames_missing and not result.suspect:
        return ExitCode.COMPLETE
    return ExitCode.INCOMPLETE


def incomplete_reasons(result) -> str:
    """Why a written result is not complete (the INCOMPLETE exit code), in words."""
    reasons = []
    if not result.complete:
        reasons.append("the series ended before its end message or last frame")
    if result.frames_missing:
        reasons.append(f"{result.frames_missing} of {result.frames_expected} frames missing")
    reasons += [f"suspect: {s}" for s in result.suspect]
    return "; ".join(reasons)


def run_code(written: list[ExitCode], refused: int) -> ExitCode:
    """A run's code from the codes of the results it wrote and the series it refused or could
    not process: the best outcome (a complete result beats an incomplete one, e.g. a restarted
    sender's partial series before its complete one); with no file written, UNUSABLE when a
    series was refused, else EMPTY."""
    if written:
        return min(written)
    return ExitCode.UNUSABLE if refused else ExitCode.EMPTY
