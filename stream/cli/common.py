"""Command-line helpers shared by every subcommand: one-line errors, value parsers."""

from __future__ import annotations

import argparse
import math
import sys


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
