"""The compiled V1 ingest lane (`stream.fast_lane`) and its JSON templates
(`detectors.json_template`): a part matches only when the full parse would read the same
fields from it; the lane folds exactly what the decoder path folds and hands back, whole, every
message it does not take."""

import contextlib
import json

import numpy as np
import pytest
import zmq

from tcbf_live.detectors.base import CompressedFrame, FrameBatch, SeriesInfo
from tcbf_live.detectors.compression import compress_bslz4
from tcbf_live.detectors.dectris_v1_fields import LEAN_FIELDS, image_layout, json_part
from tcbf_live.detectors.json_template import NO_MATCH, learn, match_part
from tcbf_live.stream.fast_lane import Lane, LaneTarget, bind_libzmq
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor

DIMAGE = b'{"htype": "dimage-1.0", "series": 7, "frame": 12, "hash": "5d41402abc4b2a76b9719d"}'
IMAGE_D = (b'{"htype":"dimage_d-1.0","shape":[32,32],"type":"uint16","encoding":"bs16-lz4<",'
           b'"size":2000}')  # fmt: skip
DCONFIG = b'{"htype":"dconfig-1.0","start_time":1,"stop_time":2,"real_time":1}'


def v1_image(frame: int, blob: bytes) -> list[bytes]:
    """The four parts of a V1 image message of series 7."""
    return [DIMAGE.replace(b'"frame": 12', b'"frame": %d' % frame),
            IMAGE_D.replace(b"2000", b"%d" % len(blob)), blob, DCONFIG]  # fmt: skip


@contextlib.contextmanager
def queued(stream: list, name: str):
    """A PULL socket with every message of `stream` queued on it (inproc)."""
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    pull.bind(f"inproc://{name}")
    push.connect(f"inproc://{name}")
    for m in stream:
        push.send_multipart(m)
    try:
        yield pull
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


@pytest.mark.parametrize(("part", "expect"), [
    (DIMAGE, 12),
    (b'{"htype":"dimage-1.0","series":7,"frame":0,"hash":""}', 0),
    (b'{\n"htype" :"dimage-1.0",\t"series": 7 ,"frame":99 , "hash":null} ', 99),
    (b' {"htype":"dimage-1.0","series":7,"frame":1,"hash":""}', NO_MATCH),  # (json_part)
    (b'{"htype":"dimage-1.0","series":7,"frame":1,"hash":""}' + b' ' * (1 << 20), NO_MATCH),
    (b'{"htype":"dimage-1.0","series":7,"frame":1,"hash":-1.5e+10}', 1),
    (b'{"htype":"dimage-1.0","series":8,"frame":1,"hash":""}', NO_MATCH),  # another series
    (b'{"htype":"dimage-1.0","series":78,"frame":1,"hash":""}', NO_MATCH),
    (b'{"htype":"dimage-1.0","series":7,"frame":01,"hash":""}', NO_MATCH),  # not JSON
    (b'{"htype":"dimage-1.0","series":7,"frame":1.5,"hash":""}', NO_MATCH),  # not an int
    (b'{"htype":"dimage-1.0","series":7,"frame":-1,"hash":""}', NO_MATCH),
    (b'{"htype":"dimage-1.0","series":7,"frame":1,"hash":"a\\"b"}', NO_MATCH),  # an escape
    (b'{"htype":"dimage-1.0","series":7,"frame":1,"hash":[1]}', NO_MATCH),  # not a scalar
    (b'{"htype":"dimage-1.0","series":7,"frame":1,"hash":tru}', NO_MATCH),
    (b'{"htype":"dimage-1.0","series":7,"frame":1,"hash":true}x', NO_MATCH),
    (b'{"htype":"dimage-1.0","series":7,"frame":1}', NO_MATCH),  # a key missing
    (b'{"htype":"dimage-1.0","series":7,"frame":1,"hash":"","x":1}', NO_MATCH),  # one more
    (b'{"series":7,"htype":"dimage-1.0","frame":1,"hash":""}', NO_MATCH),  # another order
    (b'{"htype":"dimage-1.0","series":7,"frame":1000000000000000000,"hash":""}', NO_MATCH),
])  # fmt: skip
def test_a_part_matches_only_as_the_full_parse_reads_it(part, expect):
    template = learn(DIMAGE, *LEAN_FIELDS[0])
    assert match_part(part, template) == expect


def test_list_literals_allow_whitespace_and_nothing_else():
    template = learn(IMAGE_D, *LEAN_FIELDS[1])
    spaced = IMAGE_D.replace(b"[32,32]", b"[ 32 , 32 ]").replace(b"2000", b"2001")
    assert match_part(spaced, template) == 2001
    for shape in (b"[32,31]", b"[32,32,1]", b"[32]", b"[32.0,32]"):
        assert match_part(IMAGE_D.replace(b"[32,32]", shape), template) == NO_MATCH


def test_whatever_matches_parses_to_the_same_fields():
    """Random byte edits of a part: each one that matches is JSON with the template's literal
    fields and the captured integer the matcher read (the full parse agrees)."""
    template = learn(DIMAGE, *LEAN_FIELDS[0])
    rng = np.random.default_rng(3)
    alphabet = np.frombuffer(b' "0123456789,:{}[]-.eEtrufalsn\\\x00\xff\n', np.uint8)
    matched = 0
    for _ in range(20000):
        part = bytearray(DIMAGE)
        for _ in range(rng.integers(1, 3)):
            part[rng.integers(len(part))] = rng.choice(alphabet)
        got = match_part(bytes(part), template)
        if got == NO_MATCH:
            continue
        matched += 1
        d = json_part(bytes(part))  # (the full parse's reading)
        assert d is not None, part
        assert (d["htype"], d["series"], d["frame"]) == ("dimage-1.0", 7, got), part
    assert matched > 100  # edits of the frame id and the hash that keep the layout


@pytest.mark.skipif(bind_libzmq() is None, reason="pyzmq's libzmq cannot be bound here")
@pytest.mark.parametrize("compensate", [False, True])
def test_the_lane_folds_what_the_decoder_path_folds_and_hands_back_the_rest(compensate):
    """... with descan compensation too: moments folded, half the positions read off-centre."""
    rng = np.random.default_rng(5)
    frames = rng.poisson(0.2, (64, 32, 32)).astype("<u2")
    yy, xx = np.mgrid[:32, :32]
    frames[:, (yy - 16) ** 2 + (xx - 16) ** 2 < 64] += 40  # a bright BF disk
    info = SeriesInfo(series_id=7, scan_shape=(8, 8), detector_shape=(32, 32), dtype="<u2",
                      energy_eV=300e3, step_A=1.0, semiangle_mrad=20.0,
                      angular_sampling_mrad=1.0)  # fmt: skip

    def processor():
        settings = ProcessingSettings(calibration_frames=8, compensate_descan=compensate)
        proc = SeriesProcessor(info, settings)
        proc.add(FrameBatch(7, 0, frames[:8]))  # calibrates
        if compensate:
            proc.descan.next_frames = 10**9  # (no refit: both paths read at the same shifts)
            proc.acc.set_read_shift(np.tile([1, -2], (64, 1)), np.arange(64) % 2 == 1)
        return proc

    stream = [v1_image(i, compress_bslz4(frames[i])) for i in range(8, 64)]
    stream[10][2] = stream[10][2][:16] + b"\xff" * 8 + stream[10][2][24:]  # damaged blocks
    stream[20] = [*stream[20], b'{"htype": "dimage_appendix"}']  # a fifth part
    stream.insert(30, [b'{"htype": "dseries_end-1.0", "series": 8}'])  # a control message
    stream.insert(40, [b"x" * 5000])  # over the cap below
    stream[45][3] = stream[45][3][:-1] + b" " * 4000 + b"}"  # its parts together over the cap
    lane_proc = processor()
    staging = lane_proc.staging
    layout = image_layout(stream[0], json.loads(stream[0][1]))
    target = LaneTarget((layout.dimage, layout.image_d, layout.dconfig), 64, 0, 2,
                        np.empty(32 * 32, "<u2"), staging.acc.kernel_args())  # fmt: skip
    folded, handed, oversized = 0, [], []
    with queued(stream, "lane-test") as pull:
        lane = Lane(pull)
        while True:
            n, last, parts, why = lane.drain(target, 7, 4096)  # a few at a time: bounded calls
            folded += n
            if why:
                oversized.append(why)
            elif parts:
                handed.append([bytes(p) for p in parts])
            elif n == 0:
                break
    assert handed == [[bytes(p) for p in stream[k]] for k in (10, 20, 30)]  # whole, in order
    assert len(oversized) == 2 and "5000 bytes" in oversized[0] and "4 parts" in oversized[1]
    assert folded == 56 - 3
    # the decoder path on the same images, in the order they were folded (the five-part
    # image, handed back, is an image to the decoder: folded last; the damaged one fails)
    lane_proc.staging.fold([CompressedFrame(7, 28, stream[20][2], 2, (32, 32), "<u2")])
    ref = processor()
    images = [m for k, m in enumerate(stream) if len(m) == 4 and k not in (10, 45)]
    images.append(stream[20])
    ref.staging.fold([CompressedFrame(7, int(json.loads(m[0])["frame"]), m[2], 2, (32, 32),
                                      "<u2") for m in images])  # fmt: skip
    for name, a in ref.acc.state.arrays().items():
        np.testing.assert_array_equal(lane_proc.acc.state.arrays()[name], a, err_msg=name)
    assert np.any(ref.acc.state.moments) == compensate


@pytest.mark.skipif(bind_libzmq() is None, reason="pyzmq's libzmq cannot be bound here")
@pytest.mark.parametrize("spare", [-1, 0])
def test_the_tap_copies_each_folded_blob_and_holds_a_message_it_has_no_room_for(spare):
    """`run --record` with the lane: each folded image's blob and frame id are copied into the
    tap; an image whose blob would not fit is handed back unfolded, for the decoder (which
    the recorder then sees as any other frame)."""
    rng = np.random.default_rng(6)
    frames = rng.poisson(3.0, (16, 32, 32)).astype("<u2")
    info = SeriesInfo(series_id=7, scan_shape=(4, 4), detector_shape=(32, 32), dtype="<u2",
                      energy_eV=300e3, step_A=1.0, semiangle_mrad=20.0,
                      angular_sampling_mrad=1.0)  # fmt: skip
    proc = SeriesProcessor(info, ProcessingSettings(calibration_frames=8))
    proc.add(FrameBatch(7, 0, frames[:8]))
    blobs = [compress_bslz4(frames[i]) for i in range(16)]
    stream = [v1_image(i, blobs[i]) for i in range(8, 16)]
    room = sum(len(b) for b in blobs[8:12]) + spare  # the fourth fits exactly, or not
    taken = 3 if spare < 0 else 4
    tap = (np.zeros(room, np.uint8), np.zeros(1025, np.int64), np.zeros(1024, np.int64))
    layout = image_layout(stream[0], json.loads(stream[0][1]))
    target = LaneTarget((layout.dimage, layout.image_d, layout.dconfig), 64, 0, 2,
                        np.empty(32 * 32, "<u2"), proc.staging.acc.kernel_args(), tap)  # fmt: skip
    with queued(stream, "tap-test") as pull:
        n, last, parts, why = Lane(pull).drain(target, 100, 1 << 20)
    assert (n, last, why) == (taken, 7 + taken, None)
    assert [bytes(p) for p in parts] == stream[taken]
    data, offsets, ids = tap
    assert bytes(data[: offsets[taken]]) == b"".join(blobs[8 : 8 + taken])
    assert list(ids[:taken]) == list(range(8, 8 + taken))
    assert proc.acc.frames_accepted == 8 + taken  # the held one is not folded


def test_no_lane_where_two_libzmq_libraries_are_loaded(monkeypatch, tmp_path):
    """Which of two libzmq libraries pyzmq's sockets belong to is unknown: no lane."""
    import builtins

    from tcbf_live.stream import fast_lane

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /opt/a/libzmq.so.5\n"
                    "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libzmq.so.5\n")  # fmt: skip
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(
        maps if p == "/proc/self/maps" else p, *a, **k))  # fmt: skip
    assert fast_lane._library_path() is None
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /opt/a/libzmq.so.5\n" * 2)
    assert fast_lane._library_path() == "/opt/a/libzmq.so.5"
