"""Where `run` writes each series: every finished series with frames to its own file.

`--output r.h5` names the first result written, the next ones go beside it as r.series-2.h5,
r.series-3.h5 ... (`outputs.series_output`); a file that appeared meanwhile is never replaced
(the series goes to r.kept-1.h5 instead). Each series' outcome feeds the exit code.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import replace
from pathlib import Path

from tcbf_live.stream.cli.exitcodes import ExitCode, incomplete_reasons, run_code, series_code
from tcbf_live.stream.cli.options import report
from tcbf_live.stream.outputs import OutputExists, series_output

log = logging.getLogger(__name__)


class SeriesFiles:
    """`on_series_end` of a run: each finished series with frames to its own file (the n-th
    written to `series_output(output, n)`), and the outcome of each for the exit code.
    Called on the ingest thread; `run` reads it once the engine has stopped."""

    def __init__(self, output: str | Path, protocol: str, overwrite: bool):
        self.output = Path(output)
        self.output_text = str(output)  # as given: the `wrote` line of the first file
        self.protocol = protocol
        self.overwrite = overwrite
        self.written: list[tuple[Path, ExitCode]] = []
        self.unusable = 0  # series with frames but no calibration: no file
        self.empty = 0  # series without frames: no file
        self.errors: list[str] = []  # a file that could not be written where asked
        self.internal: list[str] = []  # a result that could not be written at all (a bug)
        self.detector = None  # active mode: the SIMPLON client, asked for its dropped count
        self._lock = threading.Lock()

    def __call__(self, result) -> None:
        with self._lock:
            self._take(result)

    def _take(self, result) -> None:
        from tcbf_live.stream.hdf5 import write_result

        result = self.with_detector_counts(result)
        sid = result.info.series_id
        if not result.frames_received:
            self.empty += 1
            sys.stderr.write(f"series {sid}: no frames received: no file written\n")
            return
        if result.calibration is None:  # the reason was logged when calibration failed
            self.unusable += 1
            sys.stderr.write(f"series {sid}: {result.frames_received} frames but no usable "
                             "bright-field disk (see above): no file written\n")  # fmt: skip
            return
        target = series_output(self.output, len(self.written) + 1)
        try:
            try:
                path = write_result(target, result, self.protocol, self.overwrite)
            except OutputExists:  # created while the run went on: keep both
                path = write_result(kept_name(target), result, self.protocol)
                self.errors.append(f"{target} appeared during the run and was not replaced; "
                                   f"series {sid} went to {path}")  # fmt: skip
        except OSError as exc:
            self.errors.append(f"cannot write {target}: {' '.join(str(exc).split())}")
            return
        except Exception as exc:  # a bug: the run must still end with a code saying so
            log.exception("series %d: writing %s failed", sid, target)
            self.internal.append(f"series {sid}: writing {target} failed: "
                                 f"{type(exc).__name__}: {exc}")  # fmt: skip
            return
        code = series_code(result)
        self.written.append((path, code))
        sys.stderr.write(report(result, self.output_text if path == self.output else str(path)))
        if code is ExitCode.INCOMPLETE:
            sys.stderr.write(f"series {sid} is incomplete: {incomplete_reasons(result)}\n")

    def with_detector_counts(self, result):
        """Active mode: the detector's own dropped-image count beside ours, so missing frames
        can be told apart (dropped in the detector vs lost between it and us)."""
        if self.detector is None:
            return result
        try:
            dropped = self.detector.dropped()
        except Exception as exc:  # the count is a bonus: never lose the result over it
            log.warning("detector dropped-image count unavailable: %s", exc)
            return result
        return replace(result, detector_dropped=dropped)

    def exit_code(self, refused: int) -> ExitCode:
        """INTERNAL if a result could not be written (a bug), USAGE if a file could not go
        where asked; else the best series outcome."""
        if self.internal:
            return ExitCode.INTERNAL
        if self.errors:
            return ExitCode.USAGE
        return run_code([code for _, code in self.written], refused + self.unusable)


def kept_name(target: Path) -> Path:
    """A free name beside `target` for a result that must not replace it: r.kept-1.h5 ..."""
    n = 1
    while (path := target.with_name(f"{target.stem}.kept-{n}{target.suffix}")).exists():
        n += 1
    return path
