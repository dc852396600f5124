"""Fault injection: the faults of a live session against `tcbf-live run` and `reconstruct`.

Each case takes the tutorial series (simulators.tutorial_config: 24x48 scan, 128^2 detector,
defocus 15,000 A, rotation -15 deg), injects one fault with `simulators.faults` (pure, seeded),
and
  live:    streams it from a sender thread (native protocol, PUSH on loopback, unpaced unless
           --rate) into a `tcbf-live run --headless` subprocess with its own output folder;
  offline: for faults of the frames themselves, writes the faulty dataset (.npy + .json) and
           runs `tcbf-live reconstruct` on it (stream faults have no offline counterpart).
Results are read from the HDF5 files written (/aberrations attrs defocus_A, rotation_rad;
/acquisition attrs) and compared with the clean run of the same mode: relative defocus error
and rotation difference. The table gives, per case and mode: frames kept (received/expected,
frames excluded), the result vs clean, the exit code (stream/cli/exitcodes.py), the files written,
and whether that is what a trustworthy engine does (each case's `Expect`: exit code, files
written, every frame sent received, the frames excluded (exactly the anomalous ones, none for a
clean stream), a missed trigger flagged, and the fit within 3 % defocus and 1 deg rotation of
the clean run). Exit status 0 when every run is as expected.

Run: OMP_NUM_THREADS=1 python benchmarks/fault_injection.py [--quick] [--cases a,b,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import zmq

from tcbf_live.detectors.base import FrameBatch, SeriesInfo
from tcbf_live.detectors.files import write_dataset
from tcbf_live.simulators import Simulator, faults, tutorial_config
from tcbf_live.stream.cli.exitcodes import ExitCode

DEFOCUS_TOL_PCT = 3.0
ROTATION_TOL_DEG = 1.0
IDLE_TIMEOUT_S = 5.0  # `run --timeout`: a series that never ends is closed after this idle
PROCESS_TIMEOUT_S = 240.0  # a subprocess still running after this is killed (a hang)
SEND_TIMEOUT_MS = 10_000  # a sender blocked this long (receiver gone) gives up
BATCH = 16  # frames per native message, as `tcbf-live simulate`
CLEAN_SERIES_ID = 7001
CALIBRATION_FRAMES = 64  # `run`/`reconstruct --calibration-frames` default
# /acquisition attrs of the screening (docs/result-file.md): frames excluded (and by reason,
# JSON), hot and dead pixels found, and `suspect`, a JSON list of reasons not to trust the image
EXCLUDED_ATTR, REASONS_ATTR, SUSPECT_ATTR = (
    "frames_excluded",
    "frames_excluded_by_reason",
    "suspect",
)
HOT_ATTR, DEAD_ATTR = "hot_pixels", "dead_pixels"


@dataclass(frozen=True)
class Expect:
    """What a trustworthy engine does with a case (checked on the best file written)."""

    exit_codes: tuple[ExitCode, ...] = (ExitCode.COMPLETE,)
    files: tuple[int, ...] = (1,)  # result files written (any of these counts)
    science: bool = True  # defocus and rotation match the clean run of the same mode
    excluded: tuple[int, int] | None = (0, 0)  # frames excluded, min and max (None: any)
    hot_dead: tuple[int, int] = (0, 0)  # persistent hot and dead pixels found
    flagged: bool = False  # the result says why not to trust it (SUSPECT_ATTR)

    def describe(self) -> str:
        codes = "/".join(str(int(c)) for c in self.exit_codes)
        text = f"exit {codes}, {'/'.join(str(n) for n in self.files)} file(s)"
        if self.excluded is not None:
            lo, hi = self.excluded
            text += f", {lo if lo == hi else f'{lo}-{hi}'} frame(s) excluded"
        if any(self.hot_dead):
            text += f", {self.hot_dead[0]} hot / {self.hot_dead[1]} dead pixel(s) found"
        return (
            text
            + (", fit as clean" if self.science else "")
            + (", flagged" if self.flagged else "")
        )


@dataclass(frozen=True)
class Faulty:
    """One case's input: the frames a detector recorded (offline) and the stream sent (live)."""

    frames: np.ndarray  # acquisition order; what `reconstruct` reads when `offline`
    events: list  # simulators.faults stream events, sent live
    detail: str  # where the fault sits, in words
    offline: bool = True
    expect: Expect = Expect()
    expect_offline: Expect | None = None  # None: as `expect`


@dataclass(frozen=True)
class Clean:
    """The clean tutorial series and what the faults need to know about it."""

    frames: np.ndarray
    info: SeriesInfo
    meta: dict  # the dataset's metadata (ground truth)
    scan_shape: tuple[int, int]
    mask_value: int | None
    protocol: str  # the wire protocol of the live runs


@dataclass(frozen=True)
class Outcome:
    """What one run (live or offline) of one case left behind."""

    mode: str
    exit_code: int | None
    files: list[str]
    seconds: float
    stderr_tail: list[str]
    acquisition: dict = field(default_factory=dict)
    defocus_A: float | None = None
    rotation_deg: float | None = None


# ------------------------------------------------------------------------------ the cases
def _index(rng: np.random.Generator, n: int, avoid: set[int] = frozenset()) -> int:
    while True:
        i = int(rng.integers(0, n))
        if i not in avoid:
            return i


def _framewise(f: np.ndarray, c: Clean, detail: str, excluded: tuple[int, int] | None = (0, 0),
               hot_dead: tuple[int, int] = (0, 0)) -> Faulty:  # fmt: skip
    """A fault of the frames themselves: the same frames live and offline."""
    return Faulty(f, faults.series_events(c.info, f, BATCH), detail,
                  expect=Expect(excluded=excluded, hot_dead=hot_dead))  # fmt: skip


def case_clean(c: Clean, rng) -> Faulty:
    return _framewise(c.frames, c, "reference")


def case_zero_frame(c: Clean, rng) -> Faulty:
    i = _index(rng, len(c.frames))
    f = faults.zero_frame(c.frames, i)
    return _framewise(f, c, f"frame {i} all zero", (1, 1))


def case_flat_frame(c: Clean, rng) -> Faulty:
    i = _index(rng, len(c.frames))
    f = faults.flat_frame(c.frames, i)
    return _framewise(f, c, f"frame {i} flat at its mean", (1, 1))


def case_hot_pixel(c: Clean, rng) -> Faulty:
    i = _index(rng, len(c.frames))
    px = faults.pick_bf_pixels(c.frames, 1, rng)[0]
    f = faults.hot_pixel(c.frames, i, tuple(px))
    detail = f"frame {i}, BF pixel {tuple(int(v) for v in px)} = {faults.HOT_PIXEL_COUNTS}"
    return _framewise(f, c, detail, (1, 1))


def case_hot_pixel_persistent(c: Clean, rng) -> Faulty:
    px = faults.pick_bf_pixels(c.frames, 1, rng)[0]
    f = faults.persistent_pixel(c.frames, tuple(px), faults.HOT_PIXEL_COUNTS)
    detail = f"BF pixel {tuple(int(v) for v in px)} = {faults.HOT_PIXEL_COUNTS} in every frame"
    return _framewise(f, c, detail, hot_dead=(1, 0))


def case_dead_pixel(c: Clean, rng) -> Faulty:
    px = faults.pick_bf_pixels(c.frames, 1, rng)[0]
    f = faults.persistent_pixel(c.frames, tuple(px), 0)
    detail = f"BF pixel {tuple(int(v) for v in px)} = 0 in every frame"
    return _framewise(f, c, detail, hot_dead=(0, 1))


def case_overload(c: Clean, rng) -> Faulty:
    idx = sorted(int(i) for i in rng.choice(len(c.frames), 3, replace=False))
    f = faults.overload_pixels(c.frames, idx, faults.pick_bf_pixels(c.frames, 3, rng))
    detail = f"one BF pixel = {faults.overload_value(f.dtype)} in frames {idx}"
    return _framewise(f, c, detail, (3, 3))


def case_drift(c: Clean, rng) -> Faulty:
    f = faults.beam_current_drift(c.frames, rng, 0.10, keep_value=c.mask_value)
    return _framewise(f, c, "beam current ramp 0.9 -> 1.1")


def case_fluctuation(c: Clean, rng) -> Faulty:
    period = 5 * c.scan_shape[1] + 14  # several lines, not locked to them
    f = faults.beam_current_drift(c.frames, rng, 0.10, "sine", period, c.mask_value)
    detail = f"beam current 1 +- 0.1 sine, period {period} frames"
    return _framewise(f, c, detail)


def case_line_blank(c: Clean, rng) -> Faulty:
    f = faults.line_starts(c.frames, c.scan_shape[1], 2, 0.0, rng, c.mask_value)
    return _framewise(f, c, "first 2 columns of each row zero", None)


def case_line_dim(c: Clean, rng) -> Faulty:
    f = faults.line_starts(c.frames, c.scan_shape[1], 2, 0.5, rng, c.mask_value)
    return _framewise(f, c, "first 2 columns of each row x0.5")


def case_missed_trigger(c: Clean, rng) -> Faulty:
    i = len(c.frames) // 3 + int(rng.integers(0, c.scan_shape[1]))
    f = faults.missed_trigger(c.frames, i)
    return Faulty(
        f, faults.series_events(c.info, f, BATCH),
        f"frame {i} never recorded, later frames one index early; {len(f)} sent",
        expect=Expect((ExitCode.INCOMPLETE,), (1,), science=False, excluded=None, flagged=True),
        # the recording is one frame short of its scan: refused, or read and flagged
        expect_offline=Expect((ExitCode.USAGE, ExitCode.INCOMPLETE), (0, 1), science=False,
                              excluded=None, flagged=True),
    )  # fmt: skip


def case_sender_restart(c: Clean, rng) -> Faulty:
    at = len(c.frames) // 2
    events = faults.sender_restart(faults.series_events(c.info, c.frames, BATCH), at,
                                   CLEAN_SERIES_ID + 1)  # fmt: skip
    return Faulty(
        c.frames, events, f"restart at frame {at}: partial series, then the whole series anew",
        offline=False, expect=Expect((ExitCode.COMPLETE,), (2,)),
    )  # fmt: skip


def case_stray_start(c: Clean, rng) -> Faulty:
    at = len(c.frames) // 2
    events = faults.stray_start(faults.series_events(c.info, c.frames, BATCH), at,
                                CLEAN_SERIES_ID + 99)  # fmt: skip
    return Faulty(c.frames, events, f"another series' start at frame {at}, no frames",
                  offline=False)  # fmt: skip


def case_reshaped_start(c: Clean, rng) -> Faulty:
    at = len(c.frames) // 2
    events = faults.reshaped_repeat_start(faults.series_events(c.info, c.frames, BATCH), at,
                                          detector_shape=(64, 64))  # fmt: skip
    return Faulty(c.frames, events, f"repeat start at frame {at} claiming a 64x64 detector",
                  offline=False)  # fmt: skip


def case_foreign_header(c: Clean, rng) -> Faulty:
    at = len(c.frames) // 2
    messages = faults.foreign_header_messages(CLEAN_SERIES_ID, c.protocol)
    events = faults.foreign_messages(faults.series_events(c.info, c.frames, BATCH), at, messages)
    return Faulty(c.frames, events, f"another producer's header at frame {at}", offline=False)


def case_bad_start(c: Clean, rng) -> Faulty:
    at = len(c.frames) // 2
    messages = faults.bad_start_messages(CLEAN_SERIES_ID, c.protocol)
    events = faults.foreign_messages(faults.series_events(c.info, c.frames, BATCH), at, messages)
    return Faulty(c.frames, events, f"malformed start of the same series at frame {at}",
                  offline=False)  # fmt: skip


def case_combined(c: Clean, rng) -> Faulty:
    """The issue's case: one zero frame, one flat frame, one hot pixel, +-10 % drift."""
    f = faults.beam_current_drift(c.frames, rng, 0.10, keep_value=c.mask_value)
    zero = _index(rng, len(f))
    flat = _index(rng, len(f), {zero})
    hot = _index(rng, len(f), {zero, flat})
    px = faults.pick_bf_pixels(c.frames, 1, rng)[0]
    f = faults.hot_pixel(faults.flat_frame(faults.zero_frame(f, zero), flat), hot, tuple(px))
    detail = f"zero frame {zero}, flat frame {flat}, hot pixel in frame {hot}, ramp +-10 %"
    return _framewise(f, c, detail, (3, 3))


def case_early(c: Clean, rng) -> Faulty:
    """Anomalies among the first frames, the ones a series is calibrated on."""
    zero, flat, hot = (int(i) for i in rng.choice(CALIBRATION_FRAMES, 3, replace=False))
    px = faults.pick_bf_pixels(c.frames, 1, rng)[0]
    f = faults.hot_pixel(faults.flat_frame(faults.zero_frame(c.frames, zero), flat), hot,
                         tuple(px))  # fmt: skip
    detail = f"zero frame {zero}, flat frame {flat}, hot pixel in frame {hot} (calibration)"
    return _framewise(f, c, detail, (3, 3))


CASES: dict[str, Callable[[Clean, np.random.Generator], Faulty]] = {
    "clean": case_clean,
    "zero-frame": case_zero_frame,
    "flat-frame": case_flat_frame,
    "hot-pixel": case_hot_pixel,
    "hot-pixel-persistent": case_hot_pixel_persistent,
    "dead-pixel": case_dead_pixel,
    "overload": case_overload,
    "drift": case_drift,
    "fluctuation": case_fluctuation,
    "line-start-blank": case_line_blank,
    "line-start-dim": case_line_dim,
    "missed-trigger": case_missed_trigger,
    "sender-restart": case_sender_restart,
    "stray-start": case_stray_start,
    "reshaped-start": case_reshaped_start,
    "foreign-header": case_foreign_header,
    "bad-start": case_bad_start,
    "early-faults": case_early,
    "combined": case_combined,
}
QUICK = ("clean", "zero-frame", "hot-pixel", "drift", "missed-trigger", "sender-restart",
         "reshaped-start", "combined")  # fmt: skip


# ------------------------------------------------------------------------- running a case
def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def send(endpoint: str, messages: list, rate_fps: float, frames_per_message: list[int],
         stop: threading.Event, sent: list[int]) -> None:  # fmt: skip
    """Sender thread: bind PUSH on loopback, send every message (paced to `rate_fps` frames/s
    when > 0), give up when the receiver is gone for SEND_TIMEOUT_MS."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.setsockopt(zmq.LINGER, 2000)
    try:
        sock.bind(endpoint)
        t0 = time.perf_counter()
        done = 0
        for parts, n in zip(messages, frames_per_message, strict=True):
            if stop.is_set():
                break
            if rate_fps > 0:
                wait = t0 + (done + n) / rate_fps - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            try:
                sock.send_multipart(parts, copy=False)
            except zmq.Again:
                break
            done += n
        sent.append(done)
    finally:
        sock.close()


def run_cli(argv: list[str], timeout_s: float) -> tuple[int | None, list[str], float]:
    """`tcbf-live ARGV` in a subprocess: (exit code or None on a hang, stderr tail, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QT_QPA_PLATFORM": "offscreen"}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "tcbf_live", *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        code = None
    return code, err.strip().splitlines()[-6:], time.perf_counter() - t0


def encode(events: list, protocol: str) -> tuple[list, list[float]]:
    """Wire messages of `events` and the frames each carries (for pacing)."""
    messages: list = []
    counts: list[float] = []
    for e in events:
        parts = list(faults.encode_events([e], protocol))
        n = len(e.frames) if isinstance(e, FrameBatch) else 0
        messages += parts
        counts += [n / len(parts)] * len(parts)
    return messages, counts


def run_live(case: Faulty, folder: Path, protocol: str, rate_fps: float,
             flags: list[str]) -> Outcome:  # fmt: skip
    folder.mkdir(parents=True)
    messages, counts = encode(case.events, protocol)
    endpoint = free_endpoint()
    stop, sent = threading.Event(), []
    sender = threading.Thread(target=send, args=(endpoint, messages, rate_fps, counts, stop, sent),
                              daemon=True)  # fmt: skip
    sender.start()
    argv = ["run", "--protocol", protocol, "--connect", endpoint, "--socket", "pull",
            "--headless", "--output",
            str(folder / "r.h5"), "--timeout", f"{IDLE_TIMEOUT_S:g}", *flags]  # fmt: skip
    code, tail, seconds = run_cli(argv, PROCESS_TIMEOUT_S)
    stop.set()
    sender.join(SEND_TIMEOUT_MS / 1e3 + 5)
    return read_outcome("live", folder, code, tail, seconds)


def run_offline(case: Faulty, clean: Clean, folder: Path, flags: list[str]) -> Outcome:
    folder.mkdir(parents=True)
    data = folder.parent / "data.npy"
    rows, cols = clean.scan_shape
    if len(case.frames) == rows * cols:
        batches = ((first, case.frames[first : first + 64]) for first in range(0, rows * cols, 64))
        write_dataset(str(data), clean.scan_shape, case.frames.shape[1:], case.frames.dtype,
                      clean.meta, batches)  # fmt: skip
    else:  # a frame stack that does not fill the scan it claims (a missed trigger)
        np.save(data, case.frames)
        data.with_suffix(".json").write_text(json.dumps(clean.meta))
    argv = ["reconstruct", str(data), "--output", str(folder / "r.h5"), *flags]
    code, tail, seconds = run_cli(argv, PROCESS_TIMEOUT_S)
    return read_outcome("offline", folder, code, tail, seconds)


def read_outcome(mode: str, folder: Path, code: int | None, tail: list[str],
                 seconds: float) -> Outcome:  # fmt: skip
    """The files in `folder` and the fit of the best one (most frames received; the first
    written on a tie)."""
    files = sorted(p.name for p in folder.iterdir())
    best: tuple[dict, dict] = ({}, {})
    for name in files:
        if not name.endswith(".h5"):
            continue
        try:
            with h5py.File(folder / name, "r") as f:
                acq = {k: _plain(v) for k, v in f["acquisition"].attrs.items()}
                ab = dict(f["aberrations"].attrs) if "aberrations" in f else {}
        except (OSError, KeyError):
            continue
        if not best[0] or acq.get("frames_received", 0) > best[0].get("frames_received", 0):
            best = (acq, ab)
    acq, ab = best
    fitted = "defocus_A" in ab and bool(np.isfinite(ab["defocus_A"]))
    return Outcome(mode, code, files, seconds, tail, acq,
                   float(ab["defocus_A"]) if fitted else None,
                   math.degrees(float(ab["rotation_rad"])) if fitted else None)  # fmt: skip


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------------- the table
def compare(out: Outcome, ref: Outcome | None) -> tuple[float | None, float | None]:
    """(relative defocus error %, rotation difference deg in (-180, 180]) vs `ref`."""
    if ref is None or out.defocus_A is None or ref.defocus_A is None:
        return None, None
    d = 100.0 * (out.defocus_A - ref.defocus_A) / abs(ref.defocus_A)
    r = (out.rotation_deg - ref.rotation_deg + 180.0) % 360.0 - 180.0
    return d, (180.0 if r == -180.0 else r)


def verdict(out: Outcome, ref: Outcome | None, expect: Expect, frames_sent: int) -> str:
    """'ok', or what differs from `expect`; `frames_sent`: frames of the good series sent."""
    problems = []
    if out.exit_code is None:
        problems.append("hung")
    elif out.exit_code not in [int(c) for c in expect.exit_codes]:
        problems.append("exit")
    results = [f for f in out.files if f.endswith(".h5")]
    if len(results) not in expect.files:
        problems.append("files")
    if len(results) != len(out.files):
        problems.append("stray file")
    acq = out.acquisition
    if acq and acq.get("frames_received") != frames_sent:
        problems.append("frames lost")
    if acq and expect.excluded is not None:
        lo, hi = expect.excluded
        if EXCLUDED_ATTR not in acq:
            if lo > 0:
                problems.append("exclusions not recorded")
        elif not lo <= acq[EXCLUDED_ATTR] <= hi:
            problems.append("excluded")
    if acq and (HOT_ATTR in acq or any(expect.hot_dead)):
        if (acq.get(HOT_ATTR), acq.get(DEAD_ATTR)) != expect.hot_dead:
            problems.append("hot/dead px")
    if acq and expect.flagged != bool(suspicions(acq)):
        problems.append("not flagged" if expect.flagged else "flagged")
    if expect.science:
        d, r = compare(out, ref)
        if d is None or abs(d) > DEFOCUS_TOL_PCT or abs(r) > ROTATION_TOL_DEG:
            problems.append("fit")
    return "ok" if not problems else "NO: " + ", ".join(problems)


def _json(acq: dict, key: str, empty):
    """A JSON-text attribute, or `empty` when absent or unreadable."""
    try:
        return json.loads(acq[key])
    except (KeyError, TypeError, ValueError):
        return empty


def suspicions(acq: dict) -> list[str]:
    return list(_json(acq, SUSPECT_ATTR, []))


def frames_kept(out: Outcome) -> str:
    """received/expected and frames excluded."""
    acq = out.acquisition
    if not acq:
        return "-"
    excluded = acq.get(EXCLUDED_ATTR, "-")
    return f"{acq.get('frames_received', '?')}/{acq.get('frames_expected', '?')} excl {excluded}"


def screening(out: Outcome) -> str:
    """Why frames were excluded, pixels found, and whether the result is flagged suspect."""
    acq = out.acquisition
    words = [f"{k} {v}" for k, v in sorted(_json(acq, REASONS_ATTR, {}).items())]
    words += [f"{acq[k]} {k.split('_')[0]} px" for k in (HOT_ATTR, DEAD_ATTR) if acq.get(k)]
    if suspicions(acq):
        words.append("SUSPECT")
    return ", ".join(words) or "-"


def exit_text(code: int | None) -> str:
    if code is None:
        return "hung"
    try:
        return f"{code} {ExitCode(code).name}"
    except ValueError:
        return str(code)


@dataclass(frozen=True)
class Row:
    """One line of the table: a case run in one mode, judged against its expectation."""

    name: str
    out: Outcome
    ref: Outcome | None
    expect: Expect
    verdict: str


# (title, width): negative widths right-align
COLUMNS = (("fault", 20), ("mode", 7), ("frames kept", 18), ("screening", 26),
           ("defocus A", -9), ("d def %", -7), ("d rot", -6), ("exit", 12), ("files", 18),
           ("s", -4), ("verdict", 0))  # fmt: skip


def _line(cells: list[str]) -> str:
    widths = [w for _, w in COLUMNS]
    return " ".join(
        c.rjust(-w) if w < 0 else c.ljust(w) for c, w in zip(cells, widths, strict=True)
    )


def print_table(rows: list[Row]) -> None:
    head = _line([title for title, _ in COLUMNS])
    print(head)
    print("-" * len(head))
    for row in rows:
        out = row.out
        d, r = compare(out, row.ref)
        print(_line([
            row.name, out.mode, frames_kept(out), screening(out),
            f"{out.defocus_A:.0f}" if out.defocus_A is not None else "no model",
            f"{d:.2f}" if d is not None else "-", f"{r:.2f}" if r is not None else "-",
            exit_text(out.exit_code), ",".join(out.files) or "none", f"{out.seconds:.1f}",
            row.verdict,
        ]))  # fmt: skip


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASES)}")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument(
        "--protocol",
        default="native",
        choices=["native", "dectris-v1", "dectris-v2"],
        help="wire protocol of the live runs (DECTRIS: one bslz4 frame per message)",
    )
    p.add_argument("--no-offline", action="store_true", help="live runs only")
    p.add_argument("--rate", type=float, default=0.0, help="frames/s sent (0: unpaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault positions")
    p.add_argument("--keep", metavar="DIR", help="keep every dataset and result file here")
    p.add_argument("--stderr", action="store_true", help="print each run's last stderr lines")
    args = p.parse_args(argv)
    names = args.cases.split(",") if args.cases else list(QUICK if args.quick else CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    args.names = ["clean", *[n for n in names if n != "clean"]]  # the reference runs first
    if args.rate < 0:
        p.error("--rate must be >= 0")
    return args


def clean_series(protocol: str) -> Clean:
    cfg = tutorial_config()
    sim = Simulator(cfg)
    info = sim.series_info(CLEAN_SERIES_ID)
    frames = sim.frames(0, sim.n_frames)
    return Clean(frames, info, sim.ground_truth(), cfg.scan_shape, cfg.mask_value, protocol)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    clean = clean_series(args.protocol)
    truth = clean.meta
    pace = f"{args.rate:g} frames/s" if args.rate else "unpaced"
    print(f"tutorial series: {clean.scan_shape[0]}x{clean.scan_shape[1]} scan, "
          f"{clean.frames.shape[1]}x{clean.frames.shape[2]} {clean.frames.dtype}, truth defocus "
          f"{truth['defocus_A']:g} A, rotation {truth['rotation_deg']:g} deg; tolerances "
          f"{DEFOCUS_TOL_PCT:g} % / {ROTATION_TOL_DEG:g} deg vs the clean run of the same mode; "
          f"live: {args.protocol}, {pace}")  # fmt: skip
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tcbf-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    refs: dict[str, Outcome] = {}
    details = []
    try:
        for name in args.names:
            rng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])
            case = CASES[name](clean, rng)
            details.append(f"  {name}: {case.detail}; expect {case.expect.describe()}")
            folder = workdir / name
            outcomes = [run_live(case, folder / "live", args.protocol, args.rate, [])]
            if case.offline and not args.no_offline:
                outcomes.append(run_offline(case, clean, folder / "offline", []))
            for out in outcomes:
                if name == "clean":
                    refs[out.mode] = out
                ref = refs.get(out.mode)
                expect = (case.expect_offline if out.mode == "offline" else None) or case.expect
                row = Row(name, out, ref, expect, verdict(out, ref, expect, len(case.frames)))
                rows.append(row)
                if args.stderr or row.verdict != "ok":
                    for line in out.stderr_tail:
                        print(f"    [{name} {out.mode}] {line}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("cases:")
    print("\n".join(details))
    for mode, ref in refs.items():
        fit = (f"defocus {ref.defocus_A:.0f} A, rotation {ref.rotation_deg:.2f} deg"
               if ref.defocus_A is not None else "no model")  # fmt: skip
        print(f"clean {mode}: {fit}, exit {exit_text(ref.exit_code)}")
    print()
    print_table(rows)
    bad = sum(row.verdict != "ok" for row in rows)
    print(f"\n{len(rows) - bad}/{len(rows)} runs as expected; {time.perf_counter() - t0:.0f} s")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
