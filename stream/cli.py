"""`tcbf-live` console script: one parser, one subcommand per job.

Errors in flags or inputs are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from detectors.files import DatasetError
from simulators.simulate import SimulationError

from .series import SeriesError


class UsageError(Exception):
    """A bad flag combination or input, reported as one line with exit code 2."""


def parse_pair(text: str, sep: str = "x") -> tuple[int, int]:
    parts = text.lower().replace(",", sep).split(sep)
    try:
        if len(parts) == 1:
            n = int(parts[0])
            values = (n, n)
        elif len(parts) == 2:
            values = (int(parts[0]), int(parts[1]))
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or NxM, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def parse_finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return v


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> OneLineParser:
    from simulators import cli as sim_cli

    from . import listen, run

    parser = OneLineParser(prog="tcbf-live", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim_cli.add_parser(sub)
    run.add_parser(sub)
    listen.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.run(args) or 0)
    except (UsageError, DatasetError, SimulationError, SeriesError) as exc:
        sys.stderr.write(f"tcbf-live {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"tcbf-live {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
