"""Native protocol: bit-exact round trips over real sockets, and bad input counted and skipped."""

import threading

import lz4.block
import msgpack
import numpy as np
import pytest

from tcbf_live.detectors import DecodeError, FrameBatch, NativeDecoder, SeriesEnd, SeriesStart
from tcbf_live.detectors.native import encode_end, encode_frames, encode_start
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.simulators.sender import SendSettings
from tcbf_live.stream.cli.sending import LinkSettings, serve
from tcbf_live.stream.receiver import (
    StreamCounters,
    SubscriberSettings,
    open_socket,
    receive_events,
)


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=(6, 10), bad_pixels=5))


def collect(endpoint, socket_type, sim, **send):
    """Run the sender in a thread and decode everything a subscriber receives."""
    sock = open_socket(SubscriberSettings(endpoint=endpoint, socket_type=socket_type))
    link = LinkSettings(bind=endpoint, socket_type="pub" if socket_type == "sub" else "push",
                        wait_subscriber_s=5.0, join_wait_s=0.2)  # fmt: skip
    t = threading.Thread(target=serve, args=(sim, SendSettings(**send), link),
                         kwargs={"show_progress": False})  # fmt: skip
    t.start()
    counters = StreamCounters()
    events = []
    for ev in receive_events(sock, NativeDecoder(), counters, timeout_s=10):
        events.append(ev)
        if isinstance(ev, SeriesEnd):
            break
    t.join()
    sock.close()
    return events, counters


@pytest.mark.parametrize(
    "socket_type,encoding,batch",
    [("sub", "raw", 1), ("sub", "lz4", 7), ("pull", "raw", 16), ("pull", "lz4", 60)],
)
def test_stream_round_trip_is_bit_exact(endpoint, sim, socket_type, encoding, batch):
    events, counters = collect(endpoint, socket_type, sim, encoding=encoding, batch=batch)
    starts = [e for e in events if isinstance(e, SeriesStart)]
    assert starts and starts[0].info.scan_shape == (6, 10)
    assert starts[0].info.ground_truth["defocus_A"] == 15000.0
    frames = np.zeros((sim.n_frames, 128, 128), np.uint16)
    got = np.zeros(sim.n_frames, int)
    for e in events:
        if isinstance(e, FrameBatch):
            assert len(e.frames) <= batch
            frames[e.first : e.first + len(e.frames)] = e.frames
            got[e.first : e.first + len(e.frames)] += 1
    assert np.all(got == 1) and not counters.rejected
    np.testing.assert_array_equal(frames, sim.frames(0, sim.n_frames))
    assert events[-1] == SeriesEnd(starts[0].info.series_id, sim.n_frames)


@pytest.fixture
def stream(sim):
    info = sim.series_info(42)
    frames = sim.frames(0, 8)
    return info, frames


def test_late_joiner_never_misreads(stream):
    info, frames = stream
    dec = NativeDecoder()
    with pytest.raises(DecodeError) as err:
        dec.decode(encode_frames(42, 0, frames[:4], seq=1))
    assert err.value.reason == "no_start"
    ev = dec.decode(encode_start(info, repeat=True))
    assert isinstance(ev, SeriesStart) and ev.repeat  # the receiver can tell it joined late
    batch = dec.decode(encode_frames(42, 4, frames[4:], seq=2))
    assert batch.first == 4 and np.array_equal(batch.frames, frames[4:])
    assert dec.decode(encode_start(info, repeat=True)).repeat
    # frames of another series are rejected, not decoded against the wrong metadata
    with pytest.raises(DecodeError) as err:
        dec.decode(encode_frames(43, 0, frames[:1]))
    assert err.value.reason == "wrong_series"


def _header(parts):
    return msgpack.unpackb(parts[0])


def _with_header(parts, **changes):
    h = {**_header(parts), **changes}
    return [msgpack.packb(h), parts[1]]


def zeros(n):
    return lz4.block.compress(b"\0" * n, store_size=False)


def bad_messages(info, frames):
    good = encode_frames(42, 0, frames[:2])
    lz = encode_frames(42, 0, frames[:2], encoding="lz4")
    bomb = [msgpack.packb({**_header(lz), "count": 1 << 30, "nbytes": (1 << 30) * 32768}), lz[1]]
    return {
        "garbage": ([b"\x93\xff\x00garbage", b""], "bad_header"),
        "pickle": ([b"\x80\x04\x95", b""], "bad_header"),
        "one_part": ([good[0]], "bad_framing"),
        "truncated": ([good[0], bytes(good[1])[:-10]], "size_mismatch"),
        "size_lie": (_with_header(good, nbytes=999), "size_mismatch"),
        "dtype": (_with_header(good, dtype="<f8"), "bad_dtype"),
        "index": (_with_header(good, first=59), "index_out_of_range"),
        "negative": (_with_header(good, first=-1), "index_out_of_range"),
        "series": (_with_header(good, series=7), "wrong_series"),
        "encoding": (_with_header(good, encoding="zstd"), "bad_encoding"),
        "lz4_corrupt": ([lz[0], b"\xff" * 64], "bad_payload"),
        "lz4_bomb": (bomb, "index_out_of_range"),
        "lz4_bomb_in_range": (
            [msgpack.packb({**_header(lz), "count": 1, "nbytes": 32768}), zeros(10**7)],
            "size_mismatch",
        ),
        "lz4_expands_past_header": (
            [msgpack.packb({**_header(lz), "count": 1, "nbytes": 32768}), zeros(10**6)],
            "bad_payload",
        ),
        "version": (_with_header(good, v=99), "bad_version"),
        "kind": (_with_header(good, kind="gossip"), "bad_header"),
    }


def test_malformed_messages_are_rejected_and_stream_continues(stream):
    info, frames = stream
    dec = NativeDecoder()
    dec.decode(encode_start(info))
    for name, (parts, reason) in bad_messages(info, frames).items():
        with pytest.raises(DecodeError) as err:
            dec.decode(parts)
        assert err.value.reason == reason, name
        # the next valid message still decodes
        ok = dec.decode(encode_frames(42, 3, frames[3:5]))
        assert np.array_equal(ok.frames, frames[3:5])


def test_several_series_side_by_side_and_changed_starts_refused(stream):
    """Frames decode against the start of their own series, so another series' start (a stray
    or restarted sender) costs the open one nothing; a start changing a known series' metadata
    is refused, naming the change, and the series keeps its geometry."""
    from dataclasses import replace

    from tcbf_live.detectors.native import KNOWN_SERIES

    info, frames = stream
    dec = NativeDecoder()
    dec.decode(encode_start(info))
    dec.decode(encode_start(replace(info, series_id=43, detector_shape=(64, 64))))
    small = np.ones((2, 64, 64), np.uint16)
    assert np.array_equal(dec.decode(encode_frames(42, 0, frames[:2])).frames, frames[:2])
    assert dec.decode(encode_frames(43, 0, small)).frames.shape == (2, 64, 64)
    for change in ({"detector_shape": (64, 64)}, {"dtype": "<f4"}, {"scan_shape": (5, 12)}):
        with pytest.raises(DecodeError) as err:
            dec.decode(encode_start(replace(info, **change), repeat=True))
        assert err.value.reason == "metadata_changed" and next(iter(change)) in str(err.value)
    with pytest.raises(DecodeError) as err:  # frames matching the refused claim
        dec.decode(encode_frames(42, 2, small))
    assert err.value.reason == "size_mismatch"
    assert dec.decode(encode_frames(42, 2, frames[2:4])).first == 2
    assert dec.decode(encode_start(info, repeat=True)).repeat  # the same start: a repeat
    assert dec.decode(encode_end(42, 4)) == SeriesEnd(42, 4)
    for k in range(KNOWN_SERIES - 1):  # remembered: a bounded number, the oldest forgotten
        dec.decode(encode_start(replace(info, series_id=100 + k)))
    assert dec.decode(encode_frames(42, 4, frames[4:5])).first == 4
    dec.decode(encode_start(replace(info, series_id=99)))
    with pytest.raises(DecodeError, match="wrong_series"):
        dec.decode(encode_frames(43, 2, small))


def test_impossible_sizes_are_refused_before_anything_is_allocated(stream, monkeypatch):
    """A detector of 10^6 x 10^6 pixels, and an LZ4 payload claiming more than LZ4 can expand
    to: refused from the numbers, before a buffer of the claimed size exists."""
    info, frames = stream
    head = msgpack.unpackb(encode_start(info)[0])
    with pytest.raises(DecodeError, match="oversized"):
        NativeDecoder().decode([msgpack.packb({**head, "detector_shape": [10**6, 10**6]}), b""])
    dec = NativeDecoder()
    dec.decode(encode_start(info))
    calls = []
    monkeypatch.setattr(lz4.block, "decompress", lambda *a, **k: calls.append(1))
    lz = encode_frames(42, 0, frames[:8], encoding="lz4")
    with pytest.raises(DecodeError, match="cannot hold"):
        dec.decode([lz[0], b"\x00" * 64])  # 64 bytes cannot hold 8 frames of 32 kB
    assert not calls


def test_bad_messages_on_the_wire_are_counted_and_valid_frames_kept(endpoint, stream):
    import zmq

    info, frames = stream
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.bind(endpoint)
    sock = open_socket(SubscriberSettings(endpoint=endpoint, socket_type="pull"))
    bad = bad_messages(info, frames)
    push.send_multipart(encode_start(info))
    for i in range(8):
        parts = list(bad.values())[i][0]
        push.send_multipart(parts)
        push.send_multipart(encode_frames(42, i, frames[i : i + 1]))
    push.send_multipart(encode_end(42, 8))
    counters = StreamCounters()
    received = {}
    for ev in receive_events(sock, NativeDecoder(), counters, timeout_s=5):
        if isinstance(ev, FrameBatch):
            received[ev.first] = ev.frames[0].copy()
        if isinstance(ev, SeriesEnd):
            break
    push.close()
    sock.close()
    assert sum(counters.rejected.values()) == 8
    assert sorted(received) == list(range(8))
    for i, f in received.items():
        np.testing.assert_array_equal(f, frames[i])


def test_oversized_messages_are_dropped_by_the_socket(endpoint, stream):
    import zmq

    info, frames = stream
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.bind(endpoint)
    sock = open_socket(
        SubscriberSettings(endpoint=endpoint, socket_type="pull", max_message_bytes=100_000)
    )
    push.send_multipart(encode_start(info))
    push.send_multipart(encode_frames(42, 0, frames[:2]))  # 65 kB: fits
    counters = StreamCounters()
    events = list(receive_events(sock, NativeDecoder(), counters, timeout_s=1.0))
    assert [type(e) for e in events] == [SeriesStart, FrameBatch]
    push.send_multipart(encode_frames(42, 2, frames[2:8]))  # 196 kB: over the cap
    # libzmq drops the connection of a peer exceeding MAXMSGSIZE: nothing arrives
    assert list(receive_events(sock, NativeDecoder(), counters, timeout_s=1.0)) == []
    push.close()
    sock.close()


def test_loop_sends_new_series_ids(endpoint, sim):
    done = threading.Event()
    settings = SendSettings(loop=True, batch=20)
    link = LinkSettings(bind=endpoint, wait_subscriber_s=5.0, join_wait_s=0.2)
    t = threading.Thread(
        target=serve, args=(sim, settings, link),
        kwargs={"show_progress": False, "should_stop": done.is_set},
    )  # fmt: skip
    sock = open_socket(SubscriberSettings(endpoint=endpoint))
    t.start()
    ends = []
    for ev in receive_events(sock, NativeDecoder(), StreamCounters(), timeout_s=10):
        if isinstance(ev, SeriesEnd):
            ends.append(ev)
            if len(ends) == 3:
                done.set()
                break
    t.join(timeout=10)
    sock.close()
    assert not t.is_alive()
    assert len({e.series_id for e in ends}) == 3
    assert all(e.frames_sent == sim.n_frames for e in ends)


# ---------------------------------------------------------------- fuzzing the decoder
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
VALUES = st.recursive(
    SCALARS | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
KEYS = ["proto", "v", "kind", "series", "first", "count", "nbytes", "dtype", "encoding",
        "scan_shape", "detector_shape", "frames_expected", "scan_order", "mask_value",
        "repeat", "seq", "frames_sent", "ground_truth", "energy_eV"]  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4),
    kind=st.sampled_from(["start", "frames", "end"]),
    payload=st.binary(max_size=64) | st.just(b"\0" * 32768),
    raw=st.binary(max_size=40),
)
def test_decoder_never_crashes(mutations, kind, payload, raw):
    """Random and mutated headers: a valid event or a DecodeError, nothing else."""
    base = {"proto": "tcbf-live", "v": 1, "kind": kind, "series": 42, "first": 0, "count": 1,
            "nbytes": 32768, "dtype": "<u2", "encoding": "raw", "scan_shape": [6, 10],
            "detector_shape": [128, 128], "frames_expected": 60, "frames_sent": 1}  # fmt: skip
    dec = NativeDecoder()
    dec.decode(encode_start(SIM_INFO))
    for parts in ([msgpack.packb({**base, **mutations}), payload], [raw, payload]):
        try:
            ev = dec.decode(parts)
        except DecodeError:
            continue
        if isinstance(ev, FrameBatch):
            assert ev.frames.nbytes == len(ev.frames) * 32768


SIM_INFO = Simulator(tutorial_config(scan_shape=(6, 10))).series_info(42)
