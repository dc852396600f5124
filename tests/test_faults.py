"""The fault injectors (simulators.faults): each fault does exactly what it says, nothing else."""

import numpy as np
import pytest

from tcbf_live.detectors.base import DecodeError, FrameBatch, SeriesEnd, SeriesStart
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder
from tcbf_live.detectors.dectris_v2 import DectrisV2Decoder
from tcbf_live.detectors.native import NativeDecoder
from tcbf_live.simulators import Simulator, faults, tutorial_config


@pytest.fixture(scope="module")
def sim():
    cfg = tutorial_config(scan_shape=(4, 6), detector_shape=(48, 48), angular_sampling_mrad=None)
    return Simulator(cfg)


@pytest.fixture(scope="module")
def frames(sim):
    out = sim.frames(0, sim.n_frames)
    out.flags.writeable = False  # an injector that writes into its input fails loudly
    return out


def changed_frames(a: np.ndarray, b: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))]


def test_single_frame_faults_touch_only_their_target(frames):
    zero = faults.zero_frame(frames, 5)
    assert changed_frames(frames, zero) == [5] and not zero[5].any()

    flat = faults.flat_frame(frames, 7)
    assert changed_frames(frames, flat) == [7]
    assert np.unique(flat[7]).tolist() == [round(float(frames[7].mean()))]

    hot = faults.hot_pixel(frames, 3, (20, 21))
    assert changed_frames(frames, hot) == [3]
    diff = np.argwhere(hot != frames)
    assert diff.tolist() == [[3, 20, 21]] and hot[3, 20, 21] == faults.HOT_PIXEL_COUNTS

    px = np.array([[10, 11], [12, 13]])
    over = faults.overload_pixels(frames, [2, 9], px)
    assert np.argwhere(over != frames).tolist() == [[2, 10, 11], [9, 12, 13]]
    assert over[2, 10, 11] == over[9, 12, 13] == 2**16 - 1


def test_persistent_pixels_sit_in_every_frame(frames):
    hot = faults.persistent_pixel(frames, (24, 25), 60_000)
    dead = faults.persistent_pixel(frames, (24, 25), 0)
    assert (hot[:, 24, 25] == 60_000).all() and (dead[:, 24, 25] == 0).all()
    rest = np.ones(frames.shape[1:], bool)
    rest[24, 25] = False
    np.testing.assert_array_equal(hot[:, rest], frames[:, rest])
    np.testing.assert_array_equal(dead[:, rest], frames[:, rest])


def test_bf_disk_pixels_lie_inside_the_disk(sim, frames):
    cy, cx = sim.cfg.resolved_center_px()
    radius = sim.cfg.semiangle_mrad / sim.grid.angular_sampling_mrad
    px = faults.pick_bf_pixels(frames, 20, np.random.default_rng(0))
    assert len({tuple(p) for p in px.tolist()}) == 20
    assert (np.hypot(px[:, 0] - cy, px[:, 1] - cx) < radius + 1).all()  # soft edge: +1 px


def test_thinning_is_binomial_and_floats_scale_exactly():
    counts = np.full((4, 100, 100), 100, np.uint16)
    counts[:, 0, 0] = 65535  # the detector's flag for a bad pixel
    rng = np.random.default_rng(1)
    out = faults.scale_frames(counts, np.array([1.0, 0.5, 0.25, 0.0]), rng, keep_value=65535)
    assert out.dtype == np.uint16 and (out[:, 0, 0] == 65535).all()
    body = out[:, 1:, 1:].reshape(4, -1).astype(float)
    n = body.shape[1]
    np.testing.assert_array_equal(body[0], 100)
    assert body[3].sum() == 0
    for k, p in ((1, 0.5), (2, 0.25)):  # mean within 5 standard errors, binomial variance
        assert abs(body[k].mean() - 100 * p) < 5 * np.sqrt(100 * p * (1 - p) / n)
        assert body[k].var() == pytest.approx(100 * p * (1 - p), rel=0.1)
    again = faults.scale_frames(counts, np.array([1.0, 0.5, 0.25, 0.0]),
                                np.random.default_rng(1), keep_value=65535)  # fmt: skip
    np.testing.assert_array_equal(out, again)  # seeded: reproducible
    with pytest.raises(ValueError, match="thinned"):
        faults.scale_frames(counts, np.full(4, 1.1), rng)
    floats = np.ones((3, 2, 2), np.float32)
    np.testing.assert_array_equal(
        faults.scale_frames(floats, np.array([0.9, 1.0, 1.1]), rng)[:, 0, 0],
        np.array([0.9, 1.0, 1.1], np.float32),
    )


def test_drift_profiles():
    ramp = faults.drift_profile(101, 0.1)
    assert ramp[0] == pytest.approx(0.9) and ramp[-1] == pytest.approx(1.1)
    assert ramp.mean() == pytest.approx(1.0) and (np.diff(ramp) > 0).all()
    sine = faults.drift_profile(400, 0.1, "sine", 100)
    assert sine.mean() == pytest.approx(1.0) and sine.max() == pytest.approx(1.1)
    with pytest.raises(ValueError):
        faults.drift_profile(10, 0.1, "sine")


def test_beam_current_drift_scales_the_dose_per_frame(frames):
    rng = np.random.default_rng(2)
    drifted = faults.beam_current_drift(frames, rng, 0.1)
    first, last = len(frames) // 4, 3 * len(frames) // 4
    ratio = drifted[last:].sum() / drifted[:first].sum()
    truth = frames[last:].sum() / frames[:first].sum()
    current = faults.drift_profile(len(frames), 0.1)
    expected = truth * current[last:].mean() / current[:first].mean()
    assert ratio == pytest.approx(expected, rel=0.03)
    assert (drifted <= frames).all()  # thinned, never more counts than recorded


def test_line_starts_blank_and_dim_the_first_columns(frames):
    rng = np.random.default_rng(4)
    cols = 6
    blank = faults.line_starts(frames, cols, 2, 0.0, rng)
    starts = np.arange(len(frames)) % cols < 2
    assert not blank[starts].any()
    np.testing.assert_array_equal(blank[~starts], frames[~starts])
    dim = faults.line_starts(frames, cols, 2, 0.5, rng)
    assert dim[starts].sum() == pytest.approx(0.5 * frames[starts].sum(), rel=0.05)
    np.testing.assert_array_equal(dim[~starts], frames[~starts])


def test_missed_trigger_moves_every_later_frame_one_index_early(frames):
    slipped = faults.missed_trigger(frames, 10)
    assert len(slipped) == len(frames) - 1
    np.testing.assert_array_equal(slipped[:10], frames[:10])
    np.testing.assert_array_equal(slipped[10:], frames[11:])


def decode_all(decoder, messages) -> tuple[list, list[str]]:
    """Every event decoded and the reason of every refused message or part."""
    events, errors = [], []
    for parts in messages:
        try:
            out = decoder.decode(parts)
        except DecodeError as exc:
            errors.append(exc.reason)
            continue
        events += out if isinstance(out, list) else [out] if out is not None else []
        errors += [e.reason for e in getattr(decoder, "drain_errors", list)()]
    return events, errors


def frames_of(events, series_id: int) -> list[int]:
    return [e.first + k for e in events
            if isinstance(e, FrameBatch) and e.series_id == series_id
            for k in range(len(e.frames))]  # fmt: skip


def test_stream_faults_insert_at_the_frame_asked(sim, frames):
    info = sim.series_info(11)
    clean = faults.series_events(info, frames, batch=5)
    assert frames_of(clean, 11) == list(range(len(frames)))
    assert isinstance(clean[-1], SeriesEnd) and clean[-1].frames_sent == len(frames)

    stray = faults.stray_start(clean, 7, 99)  # 7 is inside the second batch: split
    k = next(
        i for i, e in enumerate(stray) if isinstance(e, SeriesStart) and e.info.series_id == 99
    )
    assert frames_of(stray[:k], 11) == list(range(7))
    assert frames_of(stray[k:], 11) == list(range(7, len(frames)))

    reshaped = faults.reshaped_repeat_start(clean, 10, detector_shape=(64, 64))
    starts = [e for e in reshaped if isinstance(e, SeriesStart)]
    assert [(s.info.series_id, s.info.detector_shape, s.repeat) for s in starts] == [
        (11, (48, 48), False), (11, (64, 64), True)]  # fmt: skip

    restart = faults.sender_restart(clean, 12, 12)
    assert frames_of(restart, 11) == list(range(12))
    assert frames_of(restart, 12) == list(range(len(frames)))
    ends = [e for e in restart if isinstance(e, SeriesEnd)]
    assert [(e.series_id, e.frames_sent) for e in ends] == [(12, len(frames))]


MESSAGE_FAULTS = {  # name: (inject before frame 8 of series 21, errors the decoder records)
    "foreign-header": (lambda ev, p: faults.foreign_messages(
        ev, 8, faults.foreign_header_messages(21, p)), 1),
    "bad-start": (lambda ev, p: faults.foreign_messages(
        ev, 8, faults.bad_start_messages(21, p)), 1),
    "stray-start": (lambda ev, p: faults.stray_start(ev, 8, 99), 0),
    "reshaped-start": (lambda ev, p: faults.reshaped_repeat_start(ev, 8, (64, 64)), 1),
}  # fmt: skip


@pytest.mark.parametrize("fault", sorted(MESSAGE_FAULTS))
@pytest.mark.parametrize("protocol", ["native", "dectris-v1", "dectris-v2"])
def test_encoded_faults_decode_as_injected(protocol, fault, sim, frames):
    """Round trip through the project's own decoders: every good frame comes back exactly,
    the injected message is the only one refused (a stray start is a valid message)."""
    decoder = {"native": NativeDecoder, "dectris-v1": DectrisV1Decoder,
               "dectris-v2": DectrisV2Decoder}[protocol]()  # fmt: skip
    inject, n_errors = MESSAGE_FAULTS[fault]
    events = inject(faults.series_events(sim.series_info(21), frames, batch=4), protocol)
    decoded, errors = decode_all(decoder, faults.encode_events(events, protocol))
    assert len(errors) == n_errors, errors
    got = sorted((e.first, e.frames) for e in decoded
                 if isinstance(e, FrameBatch) and e.series_id == 21)  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([f for _, f in got]), frames)
