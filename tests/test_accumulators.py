"""Accumulators against a plain numpy reference on the full 4D array; gaps; calibration."""

import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tcbf_live.stream.staging as staging_module
from tcbf_live.detectors.base import CompressedFrame, FrameBatch, scan_position
from tcbf_live.detectors.compression import compress_bslz4, native_bslz4
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.calibration import CalibrationError, calibrate
from tcbf_live.stream.tcbf.tiles import TileLevels, default_bins, validate_bins


@pytest.fixture(scope="module", params=["raster", "serpentine"])
def sim(request):
    cfg = tutorial_config(scan_shape=(10, 14), bad_pixels=12, scan_order=request.param)
    return Simulator(cfg)


@pytest.fixture(scope="module")
def frames(sim):
    return sim.frames(0, sim.n_frames)


def feed(sim, batches, settings=None, info=None):
    proc = SeriesProcessor(info or sim.series_info(1), settings or ProcessingSettings())
    for first, f in batches:
        proc.add(FrameBatch(1, first, f))
    return proc


def batches_of(frames, size, order=None):
    starts = list(range(0, len(frames), size))
    if order is not None:
        starts = [starts[i] for i in order]
    return [(s, frames[s : s + size]) for s in starts]


def reference(cube, proc):
    """Everything the kernel computes, by plain numpy on the (rows, cols, Qx, Qy) array."""
    cal, acc = proc.calibration, proc.acc
    flat = cube.reshape(*cube.shape[:2], -1).astype(np.float64)
    bf_vals = flat[..., cal.bf_flat_index]
    ref = {
        "total": flat[..., ~cal.mask.ravel()].sum(-1),
        "bf": bf_vals.sum(-1),
        "axial": bf_vals[..., acc.axial].sum(-1),
        "stack": bf_vals.reshape(-1, cal.n_bf),
    }
    lay = acc.tiles_layout
    for lvl, members in enumerate(lay.member_tile):
        tiles = np.zeros((lay.n_tiles[lvl], *cube.shape[:2]))
        for t in range(lay.n_tiles[lvl]):
            tiles[t] = bf_vals[..., members == t].sum(-1)
        ref[f"tiles{lvl}"] = tiles
    return ref


def check_against_reference(proc, cube, valid):
    ref = reference(cube, proc)
    r = proc.result()
    np.testing.assert_array_equal(r.total_counts[valid], ref["total"][valid])
    np.testing.assert_array_equal(r.incoherent_bf[valid], ref["bf"][valid])
    np.testing.assert_array_equal(r.axial_bf[valid], ref["axial"][valid])
    np.testing.assert_array_equal(proc.acc.state.stack[valid.ravel()], ref["stack"][valid.ravel()])
    for lvl in range(len(r.bins)):
        np.testing.assert_array_equal(
            proc.acc.tile_images(lvl)[:, valid], ref[f"tiles{lvl}"][:, valid]
        )
    missing = ~valid
    assert np.all(r.hits[missing] == 0) and np.all(r.total_counts[missing] == 0)
    assert np.all(r.hits[valid] == 1)


def test_accumulators_equal_numpy_reference(sim, frames):
    proc = feed(sim, batches_of(frames, 9))
    assert proc.done
    cube = sim.datacube()
    check_against_reference(proc, cube, np.ones(sim.cfg.scan_shape, bool))
    r = proc.result()
    assert r.bins == (32, 16, 8, 4) and r.n_tiles[0] == 4  # quadrants first
    assert np.all(r.dark_field >= 0) and r.dark_field.sum() > 0
    # masked pixels (2^16 - 1) never reach any sum
    assert r.total_counts.max() < 65535 * 2


def test_gaps_duplicates_and_shuffles_are_counted_exactly(sim, frames):
    rng = np.random.default_rng(5)
    n = len(frames)
    order = rng.permutation(n)  # every frame its own message, shuffled
    drop = set(rng.choice(n, max(1, n // 100), replace=False).tolist())  # 1 % dropped
    dup = rng.choice(sorted(set(range(n)) - drop), 7, replace=False).tolist()
    sequence = [i for i in order if i not in drop] + dup
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
    expected_out_of_order, high = 0, -1
    for i in sequence:
        proc.add(FrameBatch(1, int(i), frames[i : i + 1]))
    # reference definition: a new frame whose index is below the highest seen so far
    seen = set()
    for i in sequence:
        if i in seen:
            continue
        seen.add(i)
        if i < high:
            expected_out_of_order += 1
        high = max(high, i)
    r = proc.result(final=True)
    assert r.frames_received == n - len(drop)
    assert r.frames_missing == len(drop)
    assert r.duplicates == len(dup)
    assert r.out_of_order == expected_out_of_order
    valid = np.ones(sim.cfg.scan_shape, bool)
    rows, cols = scan_position(np.array(sorted(drop)), sim.cfg.scan_shape, sim.cfg.scan_order)
    valid[rows, cols] = False
    check_against_reference(proc, sim.datacube(), valid)


def test_out_of_range_frames_are_skipped(sim, frames):
    proc = feed(sim, batches_of(frames, 20))
    proc.add(FrameBatch(1, sim.n_frames, frames[:3]))
    proc.add(FrameBatch(1, -2, frames[:1]))
    assert proc.result().out_of_range == 4


def test_repeat_scans_accumulate(sim, frames):
    info = replace(sim.series_info(1), frames_expected=2 * sim.n_frames)
    proc = feed(sim, batches_of(np.concatenate([frames, frames]), 16), info=info)
    single = feed(sim, batches_of(frames, 16)).result()
    r = proc.result()
    assert proc.done and r.frames_received == 2 * sim.n_frames
    np.testing.assert_array_equal(r.incoherent_bf, 2 * single.incoherent_bf)
    np.testing.assert_array_equal(r.hits, 2)


def test_calibration_recovers_disk_and_masks(sim, frames):
    gt = sim.ground_truth()
    cal = calibrate(frames[:32], mask_value=gt["mask_value"], semiangle_mrad=4.0)
    assert cal.center_px == pytest.approx(gt["center_px"], abs=0.15)
    assert cal.radius_px == pytest.approx(4.0 / gt["angular_sampling_mrad"], abs=0.5)
    assert cal.angular_sampling_mrad == pytest.approx(gt["angular_sampling_mrad"], rel=0.02)
    masked = np.flatnonzero(cal.mask.ravel())
    assert sorted(masked) == sorted(gt["bad_pixels"])
    extra = np.zeros((128, 128), bool)
    extra[64, 60] = True  # a supplied mask inside the disk
    cal2 = calibrate(frames[:32], mask_value=65535, supplied_mask=extra)
    assert not np.any((cal2.bf_pixels == [64, 60]).all(axis=1))
    assert cal2.n_bf == cal.n_bf - 1
    with pytest.raises(CalibrationError):
        calibrate(np.zeros((4, 16, 16), np.uint16))


def test_calibration_round_trips_through_a_file(sim, frames, tmp_path):
    cal = calibrate(frames[:32], mask_value=65535, semiangle_mrad=4.0)
    (tmp_path / "cal.json").write_text(cal.to_json())
    loaded = type(cal).from_json((tmp_path / "cal.json").read_text())
    np.testing.assert_array_equal(loaded.bf_pixels, cal.bf_pixels)
    np.testing.assert_array_equal(loaded.mask, cal.mask)
    proc = feed(sim, batches_of(frames, 16), ProcessingSettings(calibration=loaded))
    # same pixels, reordered so each tile is contiguous
    assert set(map(tuple, proc.calibration.bf_pixels)) == set(map(tuple, cal.bf_pixels))


def test_frames_before_calibration_are_not_lost(sim, frames):
    settings = ProcessingSettings(calibration_frames=50)
    proc = SeriesProcessor(sim.series_info(1), settings)
    proc.add(FrameBatch(1, 0, frames[:30]))
    assert proc.acc is None and proc.frames_received == 30
    proc.add(FrameBatch(1, 30, frames[30:]))
    assert proc.acc is not None and proc.result().frames_received == sim.n_frames


def test_bin_levels():
    assert default_bins(26.0) == (32, 16, 8, 4)
    assert default_bins(3.0) == (4,)
    assert validate_bins((8, 32, 16)) == (32, 16, 8)
    with pytest.raises(ValueError):
        validate_bins((32, 12))
    pix = np.argwhere(np.ones((8, 8), bool))
    lay = TileLevels.build(pix, (4, 4), (4, 2, 1))
    assert lay.n_tiles == (4, 16, 64)
    # every finer tile lies inside exactly one coarser tile
    for lvl in range(2):
        fine = lay.member_tile[lvl + 1]
        coarse = lay.member_tile[lvl]
        for t in np.unique(fine):
            assert len(np.unique(coarse[fine == t])) == 1


@pytest.mark.parametrize("staging", ["default", "three-frame buffer", "frames too large"])
def test_staged_small_messages_match_reference(sim, frames, monkeypatch, staging):
    """1-3 frame messages are gathered into one kernel call (or, for large frames, not staged
    at all): same sums, same counters."""
    frame_bytes = frames[0].nbytes
    if staging == "three-frame buffer":
        monkeypatch.setattr(staging_module, "STAGE_FRAMES", 3)
    elif staging == "frames too large":
        monkeypatch.setattr(staging_module, "STAGE_MAX_FRAME_BYTES", frame_bytes - 1)
    rng = np.random.default_rng(2)

    proc = feed(sim, batches_of(frames, 1)[:64])  # calibrate on the first 64
    rest, i = [], 64
    while i < len(frames):  # messages of 1, 2, 3, 1, 2, 3, ... frames
        k = 1 + len(rest) % 3
        rest.append(FrameBatch(1, i, frames[i : i + k]))
        i += k
    rest.insert(5, rest[3])  # a 1-frame duplicate inside a staged run
    messages, calls = len(rest), []
    kernel = proc.acc.add_indexed
    monkeypatch.setattr(proc.acc, "add_indexed", lambda *a: (calls.append(1), kernel(*a)))
    while rest:
        n = int(rng.integers(1, 40))
        proc.add_many(rest[:n])
        rest = rest[n:]
    assert proc.result().duplicates == 1
    if staging == "frames too large":
        assert len(calls) == messages
    else:
        assert len(calls) < messages / (3 if staging == "default" else 1.5)

    check_against_reference(proc, sim.datacube(), np.ones(sim.cfg.scan_shape, bool))


def _compressed(frames, first=0):
    return [CompressedFrame(1, first + i, compress_bslz4(f), 2, f.shape, "<u2")
            for i, f in enumerate(frames)]  # fmt: skip


def test_in_kernel_bslz4_matches_the_reference_and_skips_bad_blobs(sim, frames):
    """Compressed frames decompressed inside the kernel give the numpy reference; a corrupt or
    truncated blob is skipped and counted, its position left free for a good copy."""
    assert native_bslz4()
    proc = feed(sim, batches_of(frames[:64], 64))  # calibrated on decoded frames
    rest = _compressed(frames[64:], 64)
    truncated = replace(rest[3], blob=rest[3].blob[:-7])
    damaged = replace(rest[5], blob=rest[5].blob[:30] + bytes(40) + rest[5].blob[70:])
    liar = replace(rest[6], blob=struct.pack(">QI", 1 << 40, 8192) + rest[6].blob[12:])
    stream = [*rest[:3], truncated, rest[4], damaged, liar, rest[8], rest[8], *rest[9:]]
    stream += [rest[3], rest[5], rest[6], rest[7]]  # late good copies (7: never came before)
    proc.add_many(stream)
    assert proc.decode_failures == 3
    r = proc.result()
    assert r.duplicates == 1 and r.frames_received == len(frames)
    check_against_reference(proc, sim.datacube(), np.ones(sim.cfg.scan_shape, bool))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_in_kernel_bslz4_never_crashes_on_garbage(sim, frames, data):
    proc = feed(sim, batches_of(frames[:64], 64))
    blob = bytearray(compress_bslz4(frames[70]))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "header", "random"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 20))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=200))
    elif kind == "header":
        blob[:12] = struct.pack(">QI", data.draw(st.integers(0, 2**64 - 1)),
                                data.draw(st.integers(0, 2**32 - 1)))  # fmt: skip
    else:
        blob = bytearray(data.draw(st.binary(max_size=4000)))
    c = CompressedFrame(1, 70, bytes(blob), 2, frames[70].shape, "<u2")
    proc.add_many([c])
    # either a clean rejection, or (a flip in a spot LZ4 cannot check) one frame accepted
    assert proc.decode_failures + proc.result().frames_received == 65


def test_float_frames_a_non_finite_pixel_spoils_only_its_own_tiles(sim, frames):
    info = replace(sim.series_info(1), dtype="<f4")
    proc = SeriesProcessor(info, ProcessingSettings())
    f = frames.astype(np.float32)
    proc.add(FrameBatch(1, 0, f[:64]))
    bad = f[64:65].copy()
    pixel = proc.calibration.bf_pixels[0]
    bad[0, pixel[0], pixel[1]] = np.inf
    proc.add(FrameBatch(1, 64, bad))
    proc.add(FrameBatch(1, 65, f[65:]))
    row, col = scan_position(64, sim.cfg.scan_shape, sim.cfg.scan_order)
    j = int(row) * sim.cfg.scan_shape[1] + int(col)
    assert (~np.isfinite(proc.acc.state.tiles[j])).sum() == len(proc.acc.tiles_layout.bins)
    assert np.isfinite(np.delete(proc.acc.state.tiles, j, axis=0)).all()


def test_signed_frames_keep_negative_values(sim, frames):
    """Signed detectors (e.g. dark-subtracted int16) accumulate in float: no wrap-around."""
    signed = frames.astype(np.int16) - (frames == 0)  # empty pixels read -1
    cube = np.empty((*sim.cfg.scan_shape, *signed.shape[1:]), signed.dtype)
    cube[scan_position(np.arange(len(signed)), sim.cfg.scan_shape, sim.cfg.scan_order)] = signed

    proc = SeriesProcessor(replace(sim.series_info(1), dtype="<i2"), ProcessingSettings())
    proc.add(FrameBatch(1, 0, signed))
    assert proc.acc.state.stack.dtype == np.float32 and proc.acc.state.stack.min() < 0
    check_against_reference(proc, cube, np.ones(sim.cfg.scan_shape, bool))


def test_compressed_frames_without_the_in_kernel_entry_point(sim, frames, monkeypatch):
    monkeypatch.setattr(staging_module, "native_bslz4", lambda: False)
    proc = feed(sim, batches_of(frames[:64], 64))
    rest = _compressed(frames[64:], 64)
    rest[2] = replace(rest[2], blob=rest[2].blob[:-7])  # truncated: counted, skipped
    proc.add_many(rest + _compressed(frames[66:67], 66))  # and its good copy
    assert proc.decode_failures == 1
    check_against_reference(proc, sim.datacube(), np.ones(sim.cfg.scan_shape, bool))


def test_detector_pixel_mask_applies_to_a_given_calibration(sim, frames):
    first = feed(sim, batches_of(frames, 64))
    cal = first.calibration
    flags = np.zeros(cal.detector_shape, bool)
    flags[tuple(cal.bf_pixels[10])] = True
    info = replace(sim.series_info(1), pixel_mask=flags)
    proc = SeriesProcessor(info, ProcessingSettings(calibration=cal))
    assert proc.calibration.n_bf == cal.n_bf - 1 and proc.calibration.mask[flags].all()
