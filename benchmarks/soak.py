"""Soak: `tcbf-live demo --headless` for N minutes, resident memory reported every minute.

The demo loops the tutorial series (simulator -> engine -> offscreen viewer) in one process,
so every series the engine takes starts, aligns, ends and is dropped again: a leak per series
or per redraw shows up as RSS growth. RSS is that of the demo process and all its children
(psutil when installed, else /proc VmRSS over the process tree). After the warm-up minutes
(numba compilation, Qt and the caches filling) RSS must stay flat: drift = (max - min) / min
over minutes warmup+1..N, target within 5 %.

Run: OMP_NUM_THREADS=1 python benchmarks/soak.py [--minutes 10] [--rate 400]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import tree_rss_mb

SERIES_STARTED = re.compile(rb"series \d+ started")
DRIFT_TARGET_PCT = 5.0
EXIT_MARGIN_S = 30.0  # the demo runs this much past the last sample, so the last one is live


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=int, default=10, help="samples, one per minute (>= 3)")
    p.add_argument("--rate", type=float, default=400.0, help="demo frames/s (default 400)")
    p.add_argument("--warmup-minutes", type=int, default=1,
                   help="minutes left out of the drift (default 1: drift over 2..N)")  # fmt: skip
    p.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples")
    args = p.parse_args(argv)
    if args.minutes < args.warmup_minutes + 2:
        p.error("--minutes must leave at least 2 samples after the warm-up")
    if not args.rate > 0 or not args.sample_s > 0:
        p.error("--rate and --sample-s must be positive")
    return args


def drift_pct(rss_mb: list[float]) -> float:
    """(max - min) / min in percent."""
    return 100.0 * (max(rss_mb) - min(rss_mb)) / min(rss_mb)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "OMP_NUM_THREADS": "1"}
    seconds = args.minutes * args.sample_s + EXIT_MARGIN_S
    with tempfile.TemporaryDirectory(prefix="tcbf-soak-") as tmp:
        log_path = Path(tmp) / "demo.log"
        out = str(Path(tmp) / "soak.h5")
        cmd = [sys.executable, "-m", "tcbf_live", "demo", "--headless", "--seconds",
               f"{seconds:g}", "--rate", f"{args.rate:g}", "--output", out]  # fmt: skip
        print(f"soak: {' '.join(cmd[2:])}", flush=True)
        print(f"{'minute':>6} {'RSS MB':>9} {'series':>7}", flush=True)
        with open(log_path, "wb") as log:
            t0 = time.monotonic()
            demo = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            samples = sample_loop(demo, t0, args, log_path)
            try:
                rc = demo.wait(timeout=EXIT_MARGIN_S + 60)
            except subprocess.TimeoutExpired:
                demo.kill()
                rc = demo.wait()
        tail = log_path.read_bytes().decode(errors="replace").strip().splitlines()[-5:]
    if rc != 0 or len(samples) < args.minutes:
        print(f"demo exit code {rc} after {len(samples)} samples; last lines:")
        print("\n".join(f"  {line}" for line in tail))
        return 1
    after = samples[args.warmup_minutes :]
    drift = drift_pct(after)
    verdict = "flat" if drift <= DRIFT_TARGET_PCT else "NOT flat"
    print(f"drift over minutes {args.warmup_minutes + 1}..{args.minutes}: {drift:.2f} % "
          f"(min {min(after):.1f} MB, max {max(after):.1f} MB; target <= "
          f"{DRIFT_TARGET_PCT:g} %: {verdict}); demo exit code {rc}")  # fmt: skip
    return 0 if drift <= DRIFT_TARGET_PCT else 1


def sample_loop(demo: subprocess.Popen, t0: float, args: argparse.Namespace,
                log_path: Path) -> list[float]:  # fmt: skip
    """Sample RSS at each minute mark from launch while the demo runs; print one row each."""
    samples: list[float] = []
    for minute in range(1, args.minutes + 1):
        wait = t0 + minute * args.sample_s - time.monotonic()
        if wait > 0:
            try:
                demo.wait(timeout=wait)
                break  # exited before this sample
            except subprocess.TimeoutExpired:
                pass
        rss = tree_rss_mb(demo.pid)
        if rss != rss:  # NaN: the process has gone
            break
        series = len(SERIES_STARTED.findall(log_path.read_bytes()))
        samples.append(rss)
        print(f"{minute:>6} {rss:>9.1f} {series:>7}", flush=True)
    return samples


if __name__ == "__main__":
    sys.exit(main())
