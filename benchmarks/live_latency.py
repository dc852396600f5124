"""Live alignment latency (issue 14: "alignment update latency with workers <= 0.3 s for a 128x128
scan, tutorial schedule"): how long each live update takes while frames arrive, in one process
and with workers, on the same paced stream.

The series: the simulator's tutorial sample and optics on a 128x128 scan (128x128 detector),
saved once under --cache (`tcbf-live simulate --save`) and replayed as the native protocol over
PUSH at --rate frames/s (`simulate --replay`), loopback. The receiver is
`tcbf-live -v run --bins 32,32,16,16,8,8 --workers N`; each live update's latency is read from
its debug line ("update 0.283 s": the time from the copy of the state to the result the viewer
gets, `Engine._align_loop`). The final update at the series end is not a live one and is not
counted. The sender and the receiver share this machine's cores, as at a one-PC setup. A first,
untimed run loads numba's cache (a kernel compiled during a live update would count).

Run: OMP_NUM_THREADS=1 python benchmarks/live_latency.py [--workers 0 2] [--rate 5000]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UPDATE = re.compile(r"; update (\d+\.\d+) s\)")
SUMMARY = re.compile(r"(\d+)/(\d+) frames.*?(\d+) frames/s")
SCHEDULE = "32,32,16,16,8,8"


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcbf_live", *args]


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def dataset(cache: Path) -> Path:
    path = cache / "tutorial_128x128.h5"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        subprocess.run(cli("simulate", "--scan", "128x128", "--no-stream", "--quiet",
                           "--save", str(path)), check=True, env=_env())  # fmt: skip
        print(f"simulated the 128x128 tutorial scan in {time.perf_counter() - t:.0f} s")
    return path


def one_run(data: Path, workers: int, rate: float, out_dir: Path) -> tuple[list[float], str]:
    """(the live updates' latencies in s, the run's summary line). The receiver's log goes to
    a file: a pipe nobody reads while the sender runs would fill and stall it."""
    endpoint = free_endpoint()
    log_path = out_dir / f"w{workers}.log"
    with open(log_path, "w") as log:
        rx = subprocess.Popen(
            cli("-v", "run", "--protocol", "native", "--connect", endpoint, "--socket", "pull",
                "--bins", SCHEDULE, "--workers", str(workers), "--headless", "--timeout", "10",
                "--output", str(out_dir / f"w{workers}.h5"), "--overwrite"),
            stdout=subprocess.DEVNULL, stderr=log, text=True, env=_env(),
        )  # fmt: skip
        time.sleep(3.0 if workers else 1.0)  # every receiver connected before the series starts
        try:
            sender = subprocess.run(
                cli("simulate", "--replay", str(data), "--protocol", "native", "--socket",
                    "push", "--bind", endpoint, "--rate", str(rate), "--quiet"),
                capture_output=True, text=True, env=_env(), timeout=300,
            )  # fmt: skip
            rx.wait(timeout=300)
        except subprocess.TimeoutExpired:
            rx.kill()
            rx.wait()
            raise
    err = log_path.read_text()
    if rx.returncode != 0 or sender.returncode != 0:
        print(f"workers {workers}: rc {rx.returncode} / sender {sender.returncode}\n{err[-3000:]}")
    summary = next((line for line in err.splitlines() if SUMMARY.search(line)), "")
    return [float(x) for x in UPDATE.findall(err)], summary.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--rate", type=float, default=5000.0, help="frames/s sent")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tcbf-latency")
    args = ap.parse_args()
    data = dataset(args.cache)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one_run(data, 0, args.rate, Path(tmp))  # untimed: numba's cache loaded (or compiled)
        for k in range(args.rounds):
            for w in args.workers:
                lat, summary = one_run(data, w, args.rate, Path(tmp))
                rate = m[3] if (m := SUMMARY.search(summary)) else "?"
                print(f"  round {k + 1}, {w} workers: {rate} frames/s received; live updates "
                      f"(s): {' '.join(f'{x:.3f}' for x in lat)}")  # fmt: skip
                rows.append((w, lat))
    print(f"\n128x128 tutorial scan, native PUSH paced at {args.rate:.0f} frames/s, schedule "
          f"{SCHEDULE}, {os.cpu_count()} cores; live update latency, s")  # fmt: skip
    print(f"{'workers':>7} {'updates':>7} {'median':>7} {'min':>7} {'max':>7} {'<=0.3 s':>8}")
    for w in args.workers:
        lat = [x for ww, xs in rows if ww == w for x in xs]
        if not lat:
            print(f"{w:>7} {0:>7}")
            continue
        within = sum(x <= 0.3 for x in lat) / len(lat)
        print(f"{w:>7} {len(lat):>7} {statistics.median(lat):7.3f} {min(lat):7.3f} "
              f"{max(lat):7.3f} {within:8.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
