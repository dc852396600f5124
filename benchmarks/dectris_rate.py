"""DECTRIS V1 / V2 ingest rate (issue 14): `tcbf-live run` vs a bare pyzmq receive, same stream.

The series: 256x256 scan positions of 96x96 uint16 frames (the simulator's tutorial sample and
optics, BF disk radius ~26 px), bslz4-compressed once and cached under --cache as a dump of
stream V1 messages (each an int64 little-endian length, then its bytes: dheader with
header_detail basic, detector config, four parts per image), the file LiberTEM's DectrisSim
replays.
  V1: `libertem_dectris.DectrisSim` replays the dump, unpaced, as stream V1 over PUSH; it runs
      in its own environment (--peer-python, e.g. a venv with libertem-dectris; it is never
      installed next to tcbf-live).
  V2: the same bslz4 blobs, pre-encoded as stream V2 (CBOR) by our encoder (registry
      "dectris-v2") in a child process, sent by a tight PUSH loop.
Each stream goes, alternately, to
  bare:       `common.bare_receive` in a child process (recv_multipart(copy=False) and nothing
              else, RCVHWM as the engine's);
  libertem-dectris (V1 only, in the peer Python; --no-peer-receiver leaves it out): LiberTEM's
              Rust receiver (`DectrisConnection`, passive), its stacks of 64 frames only handed
              back ("receive") or also decompressed into a numpy batch ("+ decode");
  tcbf-live:  `python -m tcbf_live run --protocol dectris-vN --connect ... --headless`, with
              `--workers N` when that flag exists (N = 0 without it: today's engine).
Rates (k frames/s):
  outside:  frames / the sender's own duration, first frame to the last one handed to its
            socket. The queues (sender SNDHWM 1024, kernel buffers, the receiver's RCVHWM
            10,000, the engine's) hide the last ~10^4 frames of a receiver slower than the
            sender, so for tcbf-live this is an upper bound of its rate;
  own:      bare: (frames - 1) / its timed loop; tcbf-live: its summary line's frames/s
            (first to last frame received).
Memory (--memory): this VM's host reclaims guest memory that stays free for ~2 s (free page
reporting), and touching reclaimed memory the first time runs at ~0.5 GB/s against ~8 GB/s
once it is backed, so a receiver's accumulators (274 MB of stack at 256x256 scan positions
and 2091 BF px) cost it ~0.5 s or ~0.04 s depending on what ran before it. Each run is
therefore started in a stated state: "cold", after 4 s of rest (the first series of a
receiver on such a VM), or "warm", right after a child touched and freed 2 GB (a later series,
and any bare-metal host); the bare receive allocates nothing and is timed alike.
The receiver's process wall time is no measure of ingest: tcbf-live's holds the end of the
series too (final alignment, 2-4 s at 256x256, and the result file), and subtracting that tail
as measured on a paced run was tried and disagreed with the own rate by 40 %. The ratio to
bare uses the best of --rounds rounds of each; every frame must be received.

Run: OMP_NUM_THREADS=1 python benchmarks/dectris_rate.py [--workers 0 1 2] [--rounds 3]
(V1 needs: python -m venv /tmp/peerenv && /tmp/peerenv/bin/pip install libertem-dectris)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SERIES_ID = 7
DETECTOR_PX = 96
DUMP_FORMAT = "-md5"  # dimage parts carry the blob's MD5 (as a DCU; LiberTEM's receiver needs it)
WARMUP_SCAN = (64, 64)  # an untimed first run: numba cache load, first calibration
RUN_TIMEOUT_S = 120.0
WORKERS_READY_S = 4.0  # workers started and connected (spawn, imports) before the sender
SENDERS = {"v1": "DectrisSim", "v2": "pre-encoded send_multipart(copy=False) loop"}
SUMMARY = re.compile(r"series \d+: (\d+)/(\d+) frames, .* (\d+) frames/s")
RUN_ARGS: list[str] = []  # --run-args
LOGS: list[Path] = []  # --logs
STAGES = re.compile(r"((?:worker \d+: \d+ frames|coordinator: merge).*)")

PEER_SENDER = """
import json, sys, time
import libertem_dectris
uri, path = sys.argv[1], sys.argv[2]
sim = libertem_dectris.DectrisSim(uri, path)  # unpaced
n = sim.get_detector_config().get_num_frames()
sim.send_headers()  # blocks until a receiver has connected
t0 = time.perf_counter()
sim.send_frames()
t1 = time.perf_counter()
sim.send_footer()
print(json.dumps({"sender_s": t1 - t0, "frames": n}), flush=True)
sys.stdin.read()  # stay (the footer in flight) until the receiver is done
"""


# LiberTEM's Rust receiver (libertem-dectris, V1 only), in the peer Python: its background
# thread receives into shared memory; "peer-recv" only hands each stack back, "peer-decode"
# also decompresses it into a numpy batch (what a caller needs before anything else)
PEER_RECEIVER = """
import json, os, sys, time
import numpy as np
import libertem_dectris
uri, n, decode, frame_bytes = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
conn = libertem_dectris.DectrisConnection(uri=uri, frame_stack_size=64,
    handle_path=f"/tmp/tcbf-bench-shm-{os.getpid()}", num_slots=4000,
    bytes_per_frame=frame_bytes, huge=False)
conn.start_passive()
until = time.monotonic() + 60
while conn.wait_for_arm(timeout=1.0) is None:
    if time.monotonic() > until:
        conn.close()
        sys.exit("no series armed within 60 s")
cam = libertem_dectris.CamClient(conn.get_socket_path())
got, first, buf = 0, 0, None
t0 = t1 = time.perf_counter()
c0 = time.process_time()
while got < n and (stack := conn.get_next_stack(max_size=64)) is not None:
    if got == 0:
        t0, c0, first = time.perf_counter(), time.process_time(), len(stack)
    if decode:
        if buf is None:
            shape = (64, *reversed(stack.get_shape()))
            buf = np.zeros(shape, np.dtype(stack.get_dtype_string()))
        cam.decode_range_into_buffer(stack, buf, 0, len(stack))
    got += len(stack)
    cam.done(stack)
    t1 = time.perf_counter()
cpu = time.process_time() - c0
conn.close()
print(json.dumps({"frames": got, "fps": (got - first) / (t1 - t0) if t1 > t0 else 0.0,
                  "cpu_us": cpu / max(got, 1) * 1e6}), flush=True)
"""
PEER_RECEIVERS = {"peer-recv": "0", "peer-decode": "1"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One stream into one receiver: frames received, the sender's and the receiver's rates."""

    frames: int
    sender_s: float  # the sender's duration, first frame to the last one handed to its socket
    own_fps: float  # the receiver's own rate
    rc: int

    @property
    def outside_fps(self) -> float:
        return self.frames / self.sender_s if self.sender_s > 0 else 0.0


COLD_REST_S = 4.0  # > the guest's free page reporting delay (2 s)
WARM_BYTES = 2 << 30


def prepare_memory(state: str) -> None:
    """Start the next run on reclaimed ("cold") or backed ("warm") memory (see above)."""
    if state == "cold":
        time.sleep(COLD_REST_S)
    else:
        touch = f"import numpy as np; np.ones({WARM_BYTES}, np.uint8)"
        subprocess.run([sys.executable, "-c", touch], check=True)


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _write_msg(f, msg: bytes) -> None:
    f.write(struct.pack("<q", len(msg)))
    f.write(msg)


def tile_series(cache: Path, scan: tuple[int, int], small: Path) -> Path:
    """The series' dump built from a smaller one's frames repeated over the scan (a periodic
    sample: the same wire data and rates, no simulation; for machines where the simulator
    cannot run)."""
    dump = cache / f"series_{scan[0]}x{scan[1]}_{DETECTOR_PX}px{DUMP_FORMAT}.dump"
    if dump.exists() and dump.with_suffix(".json").exists():
        return dump
    import numpy as np

    from tcbf_live.detectors.dectris_v1_encoder import encode_image

    meta = json.loads(small.with_suffix(".json").read_text())
    rows, cols = meta["scan"]
    blobs = read_blobs(small, rows * cols)
    data, offset, first = memoryview(small.read_bytes()), 0, []
    for _ in range(2):  # the header messages, unchanged
        (size,) = struct.unpack_from("<q", data, offset)
        first.append(bytes(data[offset + 8 : offset + 8 + size]))
        offset += 8 + size
    cache.mkdir(parents=True, exist_ok=True)
    like = np.empty((DETECTOR_PX, DETECTOR_PX), meta["dtype"])
    with open(dump.with_suffix(".tmp"), "wb") as f:
        for m in first:
            _write_msg(f, m)
        for i in range(scan[0] * scan[1]):
            blob = blobs[(i // scan[1] % rows) * cols + i % scan[1] % cols]
            for part in encode_image(SERIES_ID, i, like, blob=blob):
                _write_msg(f, part)
    meta |= {"scan": list(scan), "frames": scan[0] * scan[1]}
    dump.with_suffix(".json").write_text(json.dumps(meta))
    dump.with_suffix(".tmp").rename(dump)
    return dump


def make_series(cache: Path, scan: tuple[int, int]) -> Path:
    """The cached V1 message dump of the series (built once, ~1 min for 256x256), with its
    metadata beside it (.json)."""
    dump = cache / f"series_{scan[0]}x{scan[1]}_{DETECTOR_PX}px{DUMP_FORMAT}.dump"
    if dump.exists() and dump.with_suffix(".json").exists():
        return dump
    from tcbf_live.detectors.compression import compress_bslz4
    from tcbf_live.detectors.dectris_v1_encoder import encode_header, encode_image
    from tcbf_live.simulators import Simulator, tutorial_config

    print(f"building {dump} (once) ...", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    sim = Simulator(tutorial_config(scan_shape=scan, detector_shape=(DETECTOR_PX,) * 2))
    info = sim.series_info(SERIES_ID)
    tmp = dump.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        head = {"htype": "dheader-1.0", "series": SERIES_ID, "header_detail": "basic"}
        _write_msg(f, json.dumps(head).encode())
        _write_msg(f, encode_header(info)[1][0])  # the detector config alone
        for first, frames in sim.iter_batches(1024):
            for k, frame in enumerate(frames):
                for part in encode_image(SERIES_ID, first + k, frame, blob=compress_bslz4(frame)):
                    _write_msg(f, part)
    keys = ("energy_eV", "step_A", "semiangle_mrad", "angular_sampling_mrad", "dtype")
    meta = {k: getattr(info, k) for k in keys} | {"scan": list(scan), "frames": sim.n_frames}
    dump.with_suffix(".json").write_text(json.dumps(meta))
    tmp.rename(dump)
    return dump


def read_blobs(dump: Path, n_frames: int) -> list[bytes]:
    """The first `n_frames` bslz4 blobs of a dump (the third part of each image)."""
    data, offset, messages = memoryview(dump.read_bytes()), 0, []
    while offset < len(data) and len(messages) < 2 + 4 * n_frames:
        (size,) = struct.unpack_from("<q", data, offset)
        messages.append(data[offset + 8 : offset + 8 + size])
        offset += 8 + size
    return [bytes(m) for m in messages[2 + 2 :: 4]]


def v2_sender(endpoint: str, dump: str, n_frames: int, scan: tuple[int, int]) -> None:
    """Child process: pre-encode the series as stream V2, then push it as fast as the socket
    takes it; prints its duration as JSON, stays until stdin closes."""
    import numpy as np
    import zmq

    from tcbf_live.detectors.base import SeriesInfo
    from tcbf_live.detectors.registry import protocol

    meta = json.loads(Path(dump).with_suffix(".json").read_text())
    info = SeriesInfo(
        series_id=SERIES_ID, scan_shape=tuple(scan), detector_shape=(DETECTOR_PX,) * 2,
        dtype=meta["dtype"], energy_eV=meta["energy_eV"], step_A=meta["step_A"],
        semiangle_mrad=meta["semiangle_mrad"], counts_per_electron=1.0,
        angular_sampling_mrad=meta["angular_sampling_mrad"], mask_value=65535,
        frames_expected=n_frames,
    )  # fmt: skip
    enc = protocol("dectris-v2").encoder
    like = np.empty(info.detector_shape, info.dtype)
    images = [
        enc.image(SERIES_ID, i, like, blob=b)
        for i, b in enumerate(read_blobs(Path(dump), n_frames))
    ]
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1024)  # as DectrisSim
    push.bind(endpoint)
    for parts in enc.start(info):
        push.send_multipart(parts)  # blocks until a receiver has connected
    t0 = time.perf_counter()
    for parts in images:
        push.send_multipart(parts, copy=False)
    t1 = time.perf_counter()
    for parts in enc.end(SERIES_ID, n_frames):
        push.send_multipart(parts)
    print(json.dumps({"sender_s": t1 - t0, "frames": len(images)}), flush=True)
    sys.stdin.read()
    push.close(linger=0)


def bare_child(endpoint: str, header_messages: int, n_frames: int, rcvhwm: int) -> None:
    """Child process: `common.bare_receive` of the whole series; prints its rate as JSON."""
    sys.path.insert(0, str(BENCH_DIR))
    from common import bare_receive

    wall, _ = bare_receive(endpoint, header_messages, n_frames - 1, rcvhwm)
    print(json.dumps({"frames": n_frames, "fps": (n_frames - 1) / wall}), flush=True)


def _child(func: str, *args) -> list[str]:
    """argv running `func(*args)` of this module in a fresh interpreter."""
    code = (f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import dectris_rate as m; "
            f"m.{func}(*{args!r})")  # fmt: skip
    return [sys.executable, "-c", code]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_sender(proto: str, endpoint: str, dump: Path, n_frames: int, scan: tuple[int, int],
                 peer: str) -> subprocess.Popen:  # fmt: skip
    """The sender of `proto` (v1: DectrisSim in the peer Python, v2: our replay), binding."""
    if proto == "v1":
        argv = [peer, "-c", PEER_SENDER, endpoint, str(dump)]
    else:
        argv = _child("v2_sender", endpoint, str(dump), n_frames, scan)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=_env())  # fmt: skip


def receiver_argv(proto: str, receiver: str, endpoint: str, n_frames: int, scan: tuple[int, int],
                  meta: dict, out: Path, peer: str) -> list[str]:  # fmt: skip
    """bare, LiberTEM's receiver (peer-*, in the Python `peer`), or tcbf-live with N workers
    ("tcbf-0": no --workers flag)."""
    if receiver in PEER_RECEIVERS:
        return [peer, "-c", PEER_RECEIVER, endpoint, str(n_frames), PEER_RECEIVERS[receiver],
                str(2 * DETECTOR_PX**2)]  # fmt: skip
    if receiver == "bare":
        from tcbf_live.stream.receiver import SubscriberSettings

        return _child("bare_child", endpoint, 2 if proto == "v1" else 1, n_frames,
                      SubscriberSettings().rcvhwm)  # fmt: skip
    argv = [sys.executable, "-m", "tcbf_live", "run", "--protocol", f"dectris-{proto}",
            "--connect", endpoint, "--socket", "pull", "--scan", f"{scan[0]}x{scan[1]}",
            "--energy", str(meta["energy_eV"]), "--step", str(meta["step_A"]),
            "--semiangle", str(meta["semiangle_mrad"]),
            "--angular-sampling", str(meta["angular_sampling_mrad"]),
            "--headless", "--timeout", "10", "--output", str(out), "--overwrite"]  # fmt: skip
    workers = receiver.removeprefix("tcbf-")
    return argv + ([] if workers == "" else ["--workers", workers]) + RUN_ARGS


def one_run(proto: str, receiver: str, dump: Path, meta: dict, peer: str, out_dir: Path,
            scan: tuple[int, int] | None = None) -> Run:  # fmt: skip
    """One series from the sender into the receiver; the receiver's count and rate parsed."""
    scan = scan or tuple(meta["scan"])
    n = scan[0] * scan[1]
    endpoint = free_endpoint()
    argv = receiver_argv(proto, receiver, endpoint, n, scan, meta, out_dir / "result.h5", peer)
    rx = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_env())  # fmt: skip
    if receiver not in ("bare", "tcbf-", "tcbf-0"):  # as at a detector: every worker connected
        time.sleep(WORKERS_READY_S)  # before the series is armed (else the first takes most)
    sender = start_sender(proto, endpoint, dump, n, scan, peer)
    try:
        out, err = rx.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rx.kill()
        out, err = rx.communicate()
    try:
        sent, _ = sender.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        sender.kill()
        sent, _ = sender.communicate()
    times = json.loads(sent.strip().splitlines()[-1]) if sent.strip() else {}
    if receiver == "bare" or receiver in PEER_RECEIVERS:
        got = json.loads(out.strip().splitlines()[-1]) if rx.returncode == 0 else {}
        frames, own = got.get("frames", 0), got.get("fps", 0.0)
        if "cpu_us" in got:
            print(f"    {proto} {label(receiver)}: {got['cpu_us']:.1f} us of CPU per frame")
    else:
        m = SUMMARY.search(err)
        frames, own = (int(m[1]), float(m[3])) if m else (0, 0.0)
    if LOGS:  # --logs DIR: every receiver's stderr kept
        LOGS[0].mkdir(parents=True, exist_ok=True)
        (LOGS[0] / f"{proto}-{receiver}-{time.time_ns()}.log").write_text(err)
    if rx.returncode != 0 or frames != n or not times:
        print(f"  {proto} {receiver}: rc {rx.returncode}, {frames}/{n} frames\n{err[-2000:]}")
    for line in STAGES.findall(err):  # workers' and the coordinator's CPU per frame by stage
        print(f"    {proto} {receiver}: {line}")
    return Run(frames, times.get("sender_s", 0.0), own, rx.returncode)


def workers_flag() -> bool:
    """Whether `tcbf-live run` takes --workers."""
    argv = [sys.executable, "-m", "tcbf_live", "run", "--help"]
    return "--workers" in subprocess.run(argv, capture_output=True, text=True, env=_env()).stdout


def peer_has_dectris(python: str) -> bool:
    """Whether `python` exists and imports libertem_dectris."""
    argv = [python, "-c", "import libertem_dectris"]
    return Path(python).exists() and subprocess.run(argv, capture_output=True).returncode == 0


def receivers(workers: list[int], has_flag: bool) -> list[str]:
    if has_flag:
        return ["bare"] + [f"tcbf-{n}" for n in workers]
    skipped = [n for n in workers if n != 0]
    if skipped:
        print(f"`tcbf-live run` has no --workers flag: skipping N = {skipped}")
    return ["bare"] + (["tcbf-"] if 0 in workers else [])


def label(receiver: str) -> str:
    if receiver == "bare":
        return "bare pyzmq"
    if receiver in PEER_RECEIVERS:
        return "libertem-dectris " + ("+ decode" if receiver == "peer-decode" else "receive")
    n = receiver.removeprefix("tcbf-") or "0"
    return f"tcbf-live, {n} worker{'s' if n != '1' else ''}"


Results = dict[tuple[str, str, str], list[Run]]  # (protocol, memory, receiver) -> runs


def measure(protos: list[str], names: list[str], memory: list[str], rounds: int, dump: Path,
            meta: dict, peer: str, out_dir: Path) -> Results:  # fmt: skip
    """Alternating rounds of every (protocol, memory state, receiver)."""
    keys = [(p, m, r) for p in protos for m in memory for r in names
            if p == "v1" or r not in PEER_RECEIVERS]  # LiberTEM's receiver reads V1 only
    runs: Results = {k: [] for k in keys}
    for k in range(rounds):
        for p, m, r in keys:
            prepare_memory(m)
            runs[p, m, r].append(one_run(p, r, dump, meta, peer, out_dir))
            print(f"  round {k + 1} {p} {m} {label(r)}: {runs[p, m, r][-1].own_fps / 1e3:.1f} "
                  "k frames/s (own)", flush=True)  # fmt: skip
    return runs


def best_outside(runs: list[Run]) -> float:
    """The best sender rate of the runs, k frames/s."""
    return max((x.outside_fps for x in runs), default=0.0) / 1e3


def print_table(results: Results, n: int) -> None:
    """One row per (protocol, memory, receiver): frames of each round, best rates, ratios to
    bare in the same memory state."""
    print(f"\n{n} frames of {DETECTOR_PX}x{DETECTOR_PX} uint16 bslz4, tcp loopback, PUSH -> PULL; "
          f"{os.cpu_count()} cores; k frames/s, best of the rounds (outside: the sender's "
          f"duration; own: the receiver's)\n"
          f"{'protocol':8s} {'memory':6s} {'receiver':22s} {'frames (each round)':>20s} "
          f"{'outside':>8s} "
          f"{'own':>6s} {'ratio out':>9s} {'ratio own':>9s}")  # fmt: skip
    best: dict[tuple[str, str, str], tuple[float, float]] = {}
    for (p, m, r), rs in results.items():
        ok = [x for x in rs if x.frames == n and x.rc == 0]
        out = max((x.outside_fps for x in ok), default=0.0)
        own = max((x.own_fps for x in ok), default=0.0)
        best[p, m, r] = (out, own)
        bare_out, bare_own = best.get((p, m, "bare"), (out, own))
        frames = "/".join(str(x.frames) for x in rs)
        if own and bare_own:
            own_text, own_ratio = f"{own / 1e3:6.1f}", f"{own / bare_own:9.2f}"
        else:  # no own rate: a summary line saying 0 frames/s
            own_text, own_ratio = f"{'n/a':>6s}", f"{'n/a':>9s}"
        print(f"{'V' + p[1:]:8s} {m:6s} {label(r):22s} {frames:>20s} {out / 1e3:8.1f} {own_text} "
              f"{out / bare_out if bare_out else 0:9.2f} {own_ratio}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--protocols", nargs="+", choices=("v1", "v2"), default=["v1", "v2"])
    ap.add_argument("--scan", type=int, default=256, help="scan side (>= 256 for the issue)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/dectris_rate"))
    ap.add_argument("--peer-python", default="/tmp/peerenv/bin/python",
                    help="a Python with libertem-dectris (for V1)")  # fmt: skip
    ap.add_argument("--tile-from", type=Path, metavar="DUMP",
                    help="build the series from a smaller dump's frames, repeated (no "
                    "simulation: e.g. `make_series` of a 32x32 scan made elsewhere)")  # fmt: skip
    ap.add_argument("--run-args", default="", help="more flags for `tcbf-live run`, e.g. "
                    "'--align-interval 0' (quote them)")  # fmt: skip
    ap.add_argument("--logs", type=Path, metavar="DIR", help="keep each receiver's log here")
    ap.add_argument("--no-peer-receiver", dest="peer_receiver", action="store_false",
                    help="V1: leave out LiberTEM's Rust receiver (libertem-dectris in the peer "
                    "Python), receiving alone and with its decompression")  # fmt: skip
    ap.add_argument("--memory", nargs="+", choices=("cold", "warm"), default=["cold", "warm"],
                    help="the memory state each run starts in (see above)")  # fmt: skip
    args = ap.parse_args()
    RUN_ARGS.extend(args.run_args.split())
    LOGS.extend([args.logs] if args.logs else [])
    protos = list(args.protocols)
    if "v1" in protos and not peer_has_dectris(args.peer_python):
        print(f"{args.peer_python} cannot import libertem_dectris: V1 skipped")
        protos.remove("v1")
    scan = (args.scan, args.scan)
    dump = tile_series(args.cache, scan, args.tile_from) if args.tile_from else make_series(
        args.cache, scan)  # fmt: skip
    meta = json.loads(dump.with_suffix(".json").read_text())
    names = receivers(args.workers, workers_flag())
    if args.peer_receiver and "v1" in protos:
        names += list(PEER_RECEIVERS)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        for r in names[1:]:  # warm-up, untimed (ours: numba's cache; LiberTEM's reads V1 only)
            if r in PEER_RECEIVERS:
                continue
            one_run("v2", r, dump, meta, args.peer_python, Path(tmp), scan=WARMUP_SCAN)
        results = measure(protos, names, args.memory, args.rounds, dump, meta, args.peer_python,
                          Path(tmp))  # fmt: skip
    print_table(results, meta["frames"])
    rates = ", ".join(f"{'V' + p[1:]} {SENDERS[p]} "
                      f"{max(best_outside(results[p, m, 'bare']) for m in args.memory):.1f}"
                      for p in protos)  # fmt: skip
    print(f"the senders' own rates feeding bare (k frames/s): {rates}")


if __name__ == "__main__":
    main()
