"""Transport safety: exposure warnings, whole-message caps, CURVE, IPv6 loopback, replay that
never truncates, and a viewer that validates every state it receives."""

import os
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from conftest import free_port
from tcbf_live.detectors import dectris_v1_encoder as dectris_v1
from tcbf_live.detectors.base import FrameBatch, SeriesEnd, SeriesStart
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder
from tcbf_live.detectors.native import NativeDecoder, encode_end, encode_frames, encode_start
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.simulators.sender import SendSettings
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.cli.sending import LinkSettings, serve
from tcbf_live.stream.publisher import subscribe_states
from tcbf_live.stream.receiver import (
    StreamCounters,
    SubscriberSettings,
    open_socket,
    receive_events,
)
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.alignment import AlignmentSettings
from tcbf_live.stream.tcbf.pipeline import PipelineSettings
from tcbf_live.stream.transport import CurveKeys, bind, connect, is_loopback, recv_capped
from tcbf_live.stream.view_state import StateError, decode_state, encode_state, view_state

CLI = [sys.executable, "-m", "tcbf_live"]
SMALL_DETECTOR = {"detector_shape": (32, 32), "angular_sampling_mrad": 0.6}  # BF radius 6.7 px
SMALL = ["--detector", "32", "--angular-sampling", "0.6", "--quiet"]


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=(4, 6), **SMALL_DETECTOR, seed=1))


def collect(sock, decoder=None, timeout_s=5.0, counters=None):
    """Frames by index (each kept once; duplicates counted), whether the end came, counters."""
    counters = counters or StreamCounters()
    frames, seen, ended = {}, [], False
    for ev in receive_events(sock, decoder or NativeDecoder(), counters, timeout_s=timeout_s):
        if isinstance(ev, FrameBatch):
            for k, f in enumerate(ev.frames):
                frames[ev.first + k] = f.copy()
                seen.append(ev.first + k)
        elif isinstance(ev, SeriesEnd):
            ended = True
            break
    return frames, seen, ended, counters


# ---------------------------------------------------------------------------- exposure
@pytest.mark.parametrize(
    "endpoint,loopback",
    [
        ("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:5555", True),
        ("tcp://[::1]:5555", True), ("tcp://localhost:5555", True),
        ("ipc:///tmp/x", True), ("inproc://x", True),
        ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://[::]:5555", False),
        ("tcp://192.168.1.5:5555", False), ("tcp://eth0:5555", False),
        ("tcp://detector.lan:5555", False), ("tcp://127.0.0.1;10.0.0.1:5555", False),
        ("udp://127.0.0.1:5555", False),
    ],
)  # fmt: skip
def test_loopback_is_only_127_8_ipv6_localhost_ipc_inproc(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_every_socket_bound_beyond_loopback_warns_on_stderr(tmp_path):
    """The sender, `run --bind` and `--publish`, as a user runs them: one warning line each
    on stderr; nothing for loopback."""
    wide, ports = "0.0.0.0", [free_port() for _ in range(3)]
    sender = subprocess.run(
        [*CLI, "simulate", "--scan", "2x2", *SMALL,
         "--bind", f"tcp://{wide}:{ports[0]}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sender.returncode == 0, sender.stderr
    lines = [x for x in sender.stderr.splitlines() if "beyond loopback" in x]
    assert len(lines) == 1 and "the sender" in lines[0] and "unauthenticated" in lines[0]
    run = subprocess.run(
        [*CLI, "run", "--headless", "--timeout", "0.5", "--output", str(tmp_path / "r.h5"),
         "--bind", f"tcp://{wide}:{ports[1]}", "--publish", f"tcp://{wide}:{ports[2]}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = [x for x in run.stderr.splitlines() if "beyond loopback" in x]
    assert len(lines) == 2, run.stderr
    assert "receiver (SUB)" in lines[0] and "result stream" in lines[1]
    quiet = subprocess.run(
        [*CLI, "simulate", "--scan", "2x2", *SMALL,
         "--bind", f"tcp://127.0.0.1:{ports[0]}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert quiet.returncode == 0 and "beyond loopback" not in quiet.stderr


# ---------------------------------------------------------------------------- message caps
def test_whole_message_cap_drops_a_many_part_message_and_keeps_the_link(endpoint, sim):
    """ZMQ_MAXMSGSIZE bounds each part only: 4 parts of 40 kB pass a 100 kB part cap. The
    receiver sums the parts, drops the whole message (counted "oversized") and the peer stays
    connected, so the next frames still arrive."""
    ctx = zmq.Context.instance()
    info = sim.series_info(7)
    frames = sim.frames(0, 4)
    hostile = [os.urandom(40_000) for _ in range(4)]

    raw = ctx.socket(zmq.PULL)  # libzmq's per-part cap alone: the 160 kB message gets through
    raw.setsockopt(zmq.MAXMSGSIZE, 100_000)
    raw.bind(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    push.send_multipart(hostile)
    assert raw.poll(2000) and sum(len(p) for p in raw.recv_multipart()) == 160_000
    push.close(linger=0)
    raw.close()

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sock = open_socket(SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True,
                                          max_message_bytes=100_000))  # fmt: skip
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    push.send_multipart(encode_start(info))
    push.send_multipart(encode_frames(7, 0, frames[:2]))
    push.send_multipart(hostile)  # 160 kB in 4 parts, each under the cap
    push.send_multipart([b""] * 300)  # 0 bytes, but more parts than any protocol has
    push.send_multipart(encode_frames(7, 2, frames[2:]))
    push.send_multipart(encode_end(7, 4))
    got, seen, ended, counters = collect(sock)
    push.close(linger=0)
    sock.close()
    assert ended and sorted(seen) == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.stack([got[i] for i in range(4)]), frames)
    assert counters.rejected == {"oversized": 2}


def test_oversized_dectris_v1_message_costs_only_itself(endpoint):
    """A part-wise protocol (SIMPLON V1): the dropped message leaves the decoder in step."""
    sim = Simulator(tutorial_config(scan_shape=(2, 3), **SMALL_DETECTOR, seed=2))
    info = sim.series_info(5)
    frames = sim.frames(0, sim.n_frames)
    big = dectris_v1.encode_image(5, 99, np.zeros((150, 150), "<u2"), "raw")
    cap = max(len(p) for p in big) + 1  # every part fits, the message does not
    sock = open_socket(SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True,
                                          max_message_bytes=cap))  # fmt: skip
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    for message in dectris_v1.encode_header(info):
        push.send_multipart(message)
    for i, frame in enumerate(frames):
        push.send_multipart(dectris_v1.encode_image(5, i, frame, "raw"))
        if i == 2:
            push.send_multipart(big)
    push.send_multipart(dectris_v1.encode_end(5))
    got, seen, ended, counters = collect(sock, DectrisV1Decoder())
    push.close(linger=0)
    sock.close()
    assert ended and sorted(seen) == list(range(sim.n_frames))
    np.testing.assert_array_equal(np.stack([got[i] for i in range(sim.n_frames)]), frames)
    assert counters.rejected == {"oversized": 1}


def test_recv_capped_counts_the_whole_message(endpoint):
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(endpoint)
    push.connect(endpoint)
    push.send_multipart([b"a" * 60, b"b" * 40])  # exactly at the cap: kept
    push.send_multipart([b"a" * 60, b"b" * 41])  # one byte over: dropped whole
    push.send_multipart([b"c"])
    assert pull.poll(2000)
    assert [bytes(f) for f in recv_capped(pull, 100, flags=0)] == [b"a" * 60, b"b" * 40]
    with pytest.raises(Exception, match="2 parts, 101 bytes"):
        recv_capped(pull, 100, flags=0)
    assert [bytes(f) for f in recv_capped(pull, 100, flags=0)] == [b"c"]  # nothing left over
    push.close(linger=0)
    pull.close()


def test_sender_batches_stay_under_the_message_cap(endpoint, sim):
    from tcbf_live.simulators.sender import HEADER_ROOM_BYTES

    cap = HEADER_ROOM_BYTES + 3 * 32 * 32 * 2 + 100  # the same cap on both ends: header counts
    sock = open_socket(SubscriberSettings(endpoint=endpoint, socket_type="pull",
                                          max_message_bytes=cap))  # fmt: skip
    settings = SendSettings(batch=16, max_message_bytes=cap)
    link = LinkSettings(bind=endpoint, socket_type="push", join_wait_s=0.0)
    t = threading.Thread(target=serve, args=(sim, settings, link), kwargs={"show_progress": False})
    t.start()
    counters = StreamCounters()
    sizes, ended = [], False
    for ev in receive_events(sock, NativeDecoder(), counters, timeout_s=5):
        if isinstance(ev, FrameBatch):
            sizes.append(len(ev.frames))
        ended = isinstance(ev, SeriesEnd)
        if ended:
            break
    t.join()
    sock.close()
    assert ended and sum(sizes) == sim.n_frames and max(sizes) == 3 and not counters.rejected


# ---------------------------------------------------------------------------- CURVE
@pytest.fixture
def keys(tmp_path):
    import zmq.auth

    for name in ("sender", "reader", "stranger"):
        zmq.auth.create_certificates(tmp_path, name)
        os.chmod(tmp_path / f"{name}.key_secret", 0o600)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "reader.key").write_bytes((tmp_path / "reader.key").read_bytes())
    return tmp_path


def test_curve_pair_exchanges_a_series_and_nobody_else_receives_anything(keys, endpoint, sim):
    """A CURVE sender with an allow list: the listed reader gets the series bit-exact; a
    plain-text reader, one with a wrong server key and one with an unlisted key of its own
    (but the right server key) get nothing."""
    server = CurveKeys.load(keys / "sender.key_secret", clients_dir=keys / "allowed")
    reader = CurveKeys.load(keys / "reader.key_secret", keys / "sender.key")
    outsiders = {
        "plain": None,
        "wrong server key": CurveKeys.load(keys / "reader.key_secret", keys / "stranger.key"),
        "unlisted": CurveKeys.load(keys / "stranger.key_secret", keys / "sender.key"),
    }
    socks = {name: open_socket(SubscriberSettings(endpoint=endpoint, curve=c))
             for name, c in outsiders.items()}  # fmt: skip
    sock = open_socket(SubscriberSettings(endpoint=endpoint, curve=reader))
    link = LinkSettings(bind=endpoint, curve=server, wait_subscriber_s=5.0, join_wait_s=0.3)
    t = threading.Thread(target=serve, args=(sim, SendSettings(), link),
                         kwargs={"show_progress": False})  # fmt: skip
    t.start()
    got, seen, ended, counters = collect(sock)
    t.join()
    assert ended and sorted(seen) == list(range(sim.n_frames)) and not counters.rejected
    np.testing.assert_array_equal(np.stack([got[i] for i in range(sim.n_frames)]),
                                  sim.frames(0, sim.n_frames))  # fmt: skip
    for name, s in socks.items():
        assert not s.poll(200), name
        s.close()
    sock.close()


def test_curve_from_the_command_line(keys, tmp_path):
    """`simulate` as an authenticated server, `run` as its client: the series arrives whole;
    a `run` with the wrong server key receives nothing and writes no file."""
    import h5py

    for server_key, expect in (("stranger.key", False), ("sender.key", True)):
        port = free_port()
        out = tmp_path / f"{server_key}.h5"
        sender = subprocess.Popen(
            [*CLI, "simulate", "--scan", "4x5", *SMALL,
             "--bind", f"tcp://127.0.0.1:{port}", "--wait-subscriber", "4",
             "--curve-secret", str(keys / "sender.key_secret"),
             "--curve-clients", str(keys / "allowed")],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        run = subprocess.run(
            [*CLI, "run", "--headless", "--timeout", "2", "--output", str(out),
             "--connect", f"tcp://127.0.0.1:{port}",
             "--curve-secret", str(keys / "reader.key_secret"),
             "--curve-server-key", str(keys / server_key)],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        sender.communicate(timeout=60)
        assert out.exists() is expect, run.stderr
        if expect:
            assert run.returncode == 0, run.stderr
            with h5py.File(out) as f:
                assert f["acquisition"].attrs["frames_received"] == 20
        else:
            assert run.returncode != 0


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--curve-secret", "{k}/sender.key"],  # a public key: no secret in it
        ["simulate", "--curve-secret", "{k}/missing.key_secret"],
        ["simulate", "--curve-clients", "{k}/allowed"],  # without --curve-secret
        ["simulate", "--curve-secret", "{k}/sender.key_secret", "--curve-clients", "{k}/none"],
        ["simulate", "--protocol", "dectris-v2", "--curve-secret", "{k}/sender.key_secret"],
        ["run", "--headless", "--output", "{k}/r.h5", "--curve-secret", "{k}/reader.key_secret"],
        ["run", "--headless", "--output", "{k}/r.h5", "--bind", "tcp://127.0.0.1:5",
         "--curve-secret", "{k}/reader.key_secret", "--curve-server-key", "{k}/sender.key"],
        ["run", "--headless", "--output", "{k}/r.h5", "--protocol", "dectris-v2",
         "--curve-secret", "{k}/reader.key_secret"],
        ["view", "--curve-secret", "{k}/reader.key_secret"],
        ["demo", "--curve-secret", "{k}/sender.key_secret"],
    ],
)  # fmt: skip
def test_bad_curve_flags_give_one_line_and_exit_2(keys, argv, expect_usage_error):
    (keys / "none").mkdir()
    expect_usage_error([a.format(k=keys) for a in argv])


# ---------------------------------------------------------------------------- IPv6
def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_ipv6_loopback_links_work(sim):
    """tcp://[::1]:PORT for the sender, a binding receiver, and the result stream."""
    port = free_port()
    endpoint = f"tcp://[::1]:{port}"
    sock = open_socket(SubscriberSettings(endpoint=endpoint))
    link = LinkSettings(bind=endpoint, wait_subscriber_s=5.0, join_wait_s=0.2)
    t = threading.Thread(target=serve, args=(sim, SendSettings(), link),
                         kwargs={"show_progress": False})  # fmt: skip
    t.start()
    got, seen, ended, _ = collect(sock)
    t.join()
    sock.close()
    assert ended and sorted(seen) == list(range(sim.n_frames))

    endpoint = f"tcp://[::1]:{free_port()}"
    pull = open_socket(SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True))
    push = zmq.Context.instance().socket(zmq.PUSH)
    connect(push, endpoint)
    push.send_multipart(encode_start(sim.series_info(1)))
    assert pull.poll(3000) and isinstance(
        NativeDecoder().decode(pull.recv_multipart()), SeriesStart
    )
    push.close(linger=0)
    pull.close()


# ---------------------------------------------------------------------------- replay
@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "tutorial.h5"
    assert main(["simulate", "--save", str(path), "--no-stream", "--quiet"]) == 0
    return path


def test_unpaced_replay_delivers_every_frame_and_the_end_and_exits_0(recording):
    """`simulate --replay FILE.h5:/data` at full speed into a slow receiver, three times:
    the sender exits 0 and every frame and the end arrive. A receive queue of 2 messages
    keeps the series queued in the sender when it is done sending: it used to exit then,
    with a segfault (zero-copy frames freed under libzmq) and ~800 of 1152 frames and the
    end lost, every time."""
    for attempt in range(3):
        port = free_port()
        endpoint = f"tcp://127.0.0.1:{port}"
        sock = open_socket(SubscriberSettings(endpoint=endpoint, rcvhwm=2))
        sender = subprocess.Popen(
            [*CLI, "simulate", "--replay", f"{recording}:/data", "--bind", endpoint,
             "--wait-subscriber", "10", "--quiet"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        counters = StreamCounters()
        seen, ended = [], False
        for ev in receive_events(sock, NativeDecoder(), counters, timeout_s=10):
            if isinstance(ev, FrameBatch):
                seen.extend(range(ev.first, ev.first + len(ev.frames)))
                time.sleep(0.01)  # a slow receiver: the sender is done long before it
            elif isinstance(ev, SeriesEnd):
                ended = ev.frames_sent == 1152
                break
        _, err = sender.communicate(timeout=60)
        sock.close()
        assert sender.returncode == 0, (attempt, sender.returncode, err)
        assert ended and sorted(seen) == list(range(1152)), (attempt, len(seen))
        assert not counters.rejected


# ---------------------------------------------------------------------------- viewer input
@pytest.fixture(scope="module")
def state():
    sim = Simulator(tutorial_config(scan_shape=(16, 24)))
    # the tiles' model (so the state has tile fields), not the global search's that takes
    # over where as few tiles as here leave no uncertainty
    settings = ProcessingSettings(pipeline=PipelineSettings(
        ring_images=True, alignment=AlignmentSettings(global_search=False)))  # fmt: skip
    proc = SeriesProcessor(sim.series_info(3), settings)
    proc.add(FrameBatch(3, 0, sim.frames(0, sim.n_frames)))
    proc.solve(final=True)
    s = view_state(proc.result(final=True, complete=True))
    assert {"tile_members", "ring_bf", "tcbf_image", "frc", "aberrations"} <= set(s)
    decode_state(encode_state(s))  # a real state passes
    return s


def _with(state, **changes):
    s = dict(state)
    for k, v in changes.items():
        if v is None:
            s.pop(k)
        else:
            s[k] = v
    return s


def _big(a, index, value):
    a = a.copy()
    a[index] = value
    return a


HOSTILE = {
    "tile index 10^9": lambda s: _with(s, tile_members=_big(s["tile_members"], (0, 5), 10**9)),
    "negative tile index": lambda s: _with(s, tile_members=_big(s["tile_members"], (1, 0), -1)),
    "tile levels != bins": lambda s: _with(s, tile_members=s["tile_members"][:2]),
    "tiles for other pixels": lambda s: _with(s, tile_members=s["tile_members"][:, :10]),
    "BF pixel off the detector": lambda s: _with(s, bf_pixels=_big(s["bf_pixels"], (3, 1), 128)),
    "negative BF pixel": lambda s: _with(s, bf_pixels=_big(s["bf_pixels"], (0, 0), -5)),
    "no BF pixels": lambda s: _with(s, bf_pixels=s["bf_pixels"][:0], tile_members=None),
    "float BF pixels": lambda s: _with(s, bf_pixels=s["bf_pixels"].astype("<f4")),
    "scan claim 10^5 squared": lambda s: _with(s, scan_shape=[100_000, 100_000]),
    "shifts without their pixels": lambda s: _with(s, bf_k_px=None),
    "tile shifts without their tiles": lambda s: _with(s, tile_k_px=None),
    "scan as text": lambda s: _with(s, scan_shape="16x24"),
    "map off the scan": lambda s: _with(s, dose_map=np.zeros((16, 25), "<f4")),
    "no ring images": lambda s: _with(
        s, ring_bf=s["ring_bf"][:0], ring_radii_px=s["ring_radii_px"][:0]
    ),  # fmt: skip
    "rings without radii": lambda s: _with(s, ring_radii_px=None),
    "upsampling 0": lambda s: _with(s, tcbf_upsampling=0),
    "upsampling as bool": lambda s: _with(s, tcbf_upsampling=True),
    "trust threshold 0": lambda s: _with(s, trust=[[8, 1.0, 0.0, True, None]]),
    "aberrations incomplete": lambda s: _with(s, aberrations={"defocus_A": 1.0}),
    "radius NaN": lambda s: _with(s, radius_px=float("nan")),
    "pattern without centre": lambda s: _with(s, center_px=None),
    "shifts for other pixels": lambda s: _with(s, shifts_px=s["shifts_px"][:5]),
    "tile flags for other tiles": lambda s: _with(s, tile_used=s["tile_used"][:1]),
    "FRC lengths differ": lambda s: _with(s, frc=s["frc"][:3]),
    "5-d array": lambda s: _with(s, extra=np.zeros((1, 1, 1, 1, 1), "<f4")),
    "no dose map": lambda s: _with(s, dose_map=None),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_states_are_refused_before_anything_is_drawn(state, name):
    with pytest.raises(StateError):
        decode_state(encode_state(HOSTILE[name](state)))


def test_hostile_headers_are_refused(state):
    parts = encode_state(state)
    header = msgpack.unpackb(parts[0])
    big = msgpack.packb(dict(header, meta=dict(header["meta"], note="x" * (2 << 20))))
    negative = dict(header, arrays=[[header["arrays"][0][0], "<f4", [-16, -24]],
                                    *header["arrays"][1:]])  # fmt: skip
    huge = dict(header, arrays=[[header["arrays"][0][0], "<f4", [1 << 40, 1 << 40]],
                                *header["arrays"][1:]])  # fmt: skip
    twice = dict(header, arrays=[header["arrays"][0], *header["arrays"][:-1]])
    for broken in (
        [big, *parts[1:]],
        [msgpack.packb(negative), *parts[1:]],
        [msgpack.packb(huge), *parts[1:]],
        [msgpack.packb(twice), parts[1], *parts[1:-1]],
        [parts[0], *parts[1:], *([b""] * 200)],
    ):
        with pytest.raises(StateError):
            decode_state(broken)


def test_result_stream_skips_oversized_and_hostile_states_and_keeps_going(state, endpoint):
    """Over a real socket: an oversized message and a hostile state are counted and skipped,
    the next good state is shown."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    bind(pub, endpoint, "test")
    good = encode_state(state)
    nbytes = sum(memoryview(p).nbytes for p in good)
    source = subscribe_states(endpoint, max_message_bytes=nbytes + 10)

    def deliver(parts, resend=False):
        """Send `parts` (again and again while the subscription settles, with `resend`) and
        return what the source shows once it received something."""
        before = source.received
        pub.send_multipart(parts)
        for i in range(200):
            time.sleep(0.02)
            out = source.latest()
            if source.received > before:
                return out
            if resend and i % 5 == 4:
                pub.send_multipart(parts)
        raise AssertionError("nothing arrived")

    assert deliver(good, resend=True)["series_id"] == 3
    assert deliver(encode_state(HOSTILE["tile index 10^9"](state))) is None
    assert deliver([*good, b"x" * 20]) is None  # 10 bytes over the cap, in an extra part
    shown = deliver(good)
    assert shown is not None and shown["frames_received"] == state["frames_received"]
    assert source.reasons == {"malformed": 1, "oversized": 1} and source.rejected == 2
    source.close()
    pub.close(linger=0)
