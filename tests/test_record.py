"""`run --record`: the raw frames as received, read back by `reconstruct` and `simulate --replay`
with the same result as the live run; a full queue and a full disk never slow or stop the run."""

import re
import shutil
import threading
import time
from collections import namedtuple

import h5py
import numpy as np
import pytest

from conftest import free_port
from tcbf_live.detectors.base import CompressedFrame, FrameBatch
from tcbf_live.detectors.compression import compress_bslz4
from tcbf_live.detectors.vendor_files import PRESENT, RECORDED_DATA, DectrisMaster
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream import recorder as rec_mod
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.recorder import Recorder, RecordSettings
from tcbf_live.stream.series import ProcessingSettings

SCAN = "16x16"
RESULT_DATASETS = ("tcbf/image", "alignment/shifts_px", "bf/hits")


def send(endpoint: str, argv: list[str]) -> threading.Thread:
    """`simulate` (or a replay) streaming to `endpoint`, in a thread."""
    codes = []
    t = threading.Thread(target=lambda: codes.append(main(["simulate", "--bind", endpoint,
                                                           "--quiet", "--wait-subscriber", "30",
                                                           *argv])), daemon=True)  # fmt: skip
    t.codes = codes
    t.start()
    return t


def run_live(tmp_path, name: str, protocol: str, sender_argv: list[str], *extra: str) -> int:
    """`run --record` of one series sent by `simulate`; returns the run's exit code."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sender = send(endpoint, ["--protocol", protocol, *sender_argv])
    code = main(["run", "--headless", "--connect", endpoint, "--protocol", protocol,
                 "--output", str(tmp_path / f"{name}.h5"), "--timeout", "20",
                 "--align-interval", "0", *extra])  # fmt: skip
    sender.join(60)
    assert sender.codes == [0]
    return code


def same_result(a, b) -> None:
    """The result files agree bit for bit: every array (image, shifts, maps, calibration,
    dose), the aberrations, the frame count."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        names = []
        fa.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                      else None)  # fmt: skip
        assert set(RESULT_DATASETS) <= set(names)
        for name in names:
            np.testing.assert_array_equal(fa[name][()], fb[name][()], err_msg=name)
        np.testing.assert_equal(dict(fa["/aberrations"].attrs), dict(fb["/aberrations"].attrs))
        assert fa["/acquisition"].attrs["frames_received"] == fb["/acquisition"].attrs[
            "frames_received"]  # fmt: skip


@pytest.mark.parametrize("protocol", ["native", "dectris-v2"])
def test_recording_reconstructs_and_replays_to_the_live_result(tmp_path, capsys, protocol):
    record = tmp_path / "raw.h5"
    code = run_live(tmp_path, "live", protocol, ["--scan", SCAN], "--record", str(record))
    assert code in (0, 3)
    err = capsys.readouterr().err
    assert "recorded 256 frames of series" in err and str(record) in err, err
    assert not list(tmp_path.glob(".raw.tmp-*"))  # moved into place
    with h5py.File(record) as f:
        d = f[RECORDED_DATA]
        assert d.shape[0] == 256 and f[PRESENT][()].all()
        plist = d.id.get_create_plist()
        if protocol == "native":  # decoded frames: stored as they are
            assert plist.get_nfilters() == 0
        else:  # the bslz4 chunks as received: bitshuffle + LZ4, as in DECTRIS files
            code_, _, opts, _ = plist.get_filter(0)
            assert code_ == 32008 and opts[-1] == 2
    data = DectrisMaster(record)  # metadata from the file: no --scan needed
    assert data.scan_shape == (16, 16) and data.series_info(1).energy_eV
    if protocol == "dectris-v2":  # the received chunks, unchanged and decodable
        assert data.iter_compressed() is not None
    data.close()

    assert main(["reconstruct", str(record), "--output", str(tmp_path / "off.h5")]) in (0, 3)
    same_result(tmp_path / "live.h5", tmp_path / "off.h5")

    code = run_live(tmp_path, "again", protocol, ["--replay", str(record)])
    assert code in (0, 3)
    same_result(tmp_path / "live.h5", tmp_path / "again.h5")


@pytest.mark.parametrize("protocol", ["dectris-v1", "dectris-v2"])
def test_the_compiled_lane_records_what_the_decoder_records(tmp_path, capsys, protocol):
    """With `--record` the compiled lane still reads the images (copying each folded blob out
    for the recorder, `TappedFrames`): the same chunks, bit for bit, and the same result as
    the decoder alone (`--no-compiled-lane`), with most frames read by the lane."""
    sender = ["--scan", "24x24", "--rate", "4000"]  # paced: calibrated early, the lane reads
    for name in ("lane", "decoder"):
        extra = [] if name == "lane" else ["--no-compiled-lane"]
        code = run_live(tmp_path, name, protocol, sender, "--record",
                        str(tmp_path / f"raw-{name}.h5"), *extra)  # fmt: skip
        assert code in (0, 3)
        err = capsys.readouterr().err
        assert "recorded 576 frames of series" in err, err
        lane = re.search(r"compiled lane: (\d+) of", err)
        assert (int(lane.group(1)) > 400) if name == "lane" else lane is None, err
    same_result(tmp_path / "lane.h5", tmp_path / "decoder.h5")
    with h5py.File(tmp_path / "raw-lane.h5") as a, h5py.File(tmp_path / "raw-decoder.h5") as b:
        da, db = a[RECORDED_DATA], b[RECORDED_DATA]
        assert a[PRESENT][()].all() and b[PRESENT][()].all()
        for i in range(576):
            assert da.id.read_direct_chunk((i, 0, 0)) == db.id.read_direct_chunk((i, 0, 0)), i


def test_bslz4_recording_reads_with_the_hdf5_plugin(tmp_path):
    """h5py through the bitshuffle HDF5 filter and our reader agree on every frame, and a
    decoded frame in a bslz4 recording is stored with the filter skipped."""
    bitshuffle_h5 = pytest.importorskip("bitshuffle.h5")
    assert bitshuffle_h5
    frames = Simulator(tutorial_config(scan_shape=(2, 3))).frames(0, 6)
    info = Simulator(tutorial_config(scan_shape=(2, 3))).series_info(1)
    proc = namedtuple("P", "info n_positions index_offset")(info, 6, 0)
    rec = Recorder(RecordSettings(tmp_path / "r.h5"))
    blobs = [CompressedFrame(1, i, compress_bslz4(f), f.itemsize, f.shape, f.dtype.str)
             for i, f in enumerate(frames[:4])]  # fmt: skip
    rec(proc, blobs)
    rec(proc, [FrameBatch(1, 5, frames[5:6])])  # 4 never came
    rec.close()
    assert rec.records[0].written == 5
    with h5py.File(tmp_path / "r.h5") as f:
        np.testing.assert_array_equal(f[RECORDED_DATA][[0, 1, 2, 3, 5]], frames[[0, 1, 2, 3, 5]])
        assert list(f[PRESENT][()]) == [True] * 4 + [False, True]
    with DectrisMaster(tmp_path / "r.h5") as data:
        got = list(data.iter_batches(8))
        assert [(first, len(b)) for first, b in got] == [(0, 4), (5, 1)]
        np.testing.assert_array_equal(got[1][1][0], frames[5])
        assert [i for i, _ in data.iter_compressed()] == [0, 1, 2, 3, 5]


def feed(engine: Engine, sim: Simulator, sid: int, batch: int = 4) -> float:
    """Feed one series into an engine that was not started; returns the seconds it took."""
    from tcbf_live.detectors.base import SeriesEnd, SeriesStart

    t0 = time.perf_counter()
    engine.process([SeriesStart(sim.series_info(sid), repeat=False)])
    for first, frames in sim.iter_batches(batch):
        engine.process([FrameBatch(sid, first, frames)])
    engine.process([SeriesEnd(sid, sim.n_frames)])
    return time.perf_counter() - t0


def test_a_full_queue_counts_frames_not_recorded_without_slowing_ingest(tmp_path, monkeypatch):
    sim = Simulator(tutorial_config(scan_shape=(8, 16)))
    settings = EngineSettings(processing=ProcessingSettings(), align_interval_s=None)
    feed(Engine(settings), sim, 1)  # warm up the kernels
    bare = feed(Engine(settings), sim, 2)

    write = rec_mod.SeriesFile.write

    def slow_write(self, index, item):
        time.sleep(0.05)  # a disk far slower than the stream
        return write(self, index, item)

    monkeypatch.setattr(rec_mod.SeriesFile, "write", slow_write)
    one_batch = 4 * sim.frames(0, 1).nbytes
    rec = Recorder(RecordSettings(tmp_path / "r.h5", queue_bytes=2 * one_batch))
    engine = Engine(settings, on_series_end=rec.ending(lambda r: None), on_frames=rec)
    recorded = feed(engine, sim, 3)
    assert recorded < bare + 0.5 * 32 * 0.05  # ingest never waited for the writer
    rec.close()
    (r,) = rec.records
    assert r.queue_full > 0 and r.written + r.queue_full == 128
    assert f"{r.queue_full} not recorded (the recording queue was full)" in rec.summaries()[0]
    with h5py.File(tmp_path / "r.h5") as f:
        assert f[PRESENT][()].sum() == r.written


def test_a_series_that_does_not_fit_the_disk_is_not_recorded(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 10 << 20))
    code = run_live(tmp_path, "live", "native", ["--scan", SCAN], "--record",
                    str(tmp_path / "raw.h5"))  # fmt: skip
    assert code in (0, 3) and (tmp_path / "live.h5").exists()  # the live processing went on
    err = capsys.readouterr().err
    assert "not recorded: it needs about" in err and "GB free in" in err, err
    assert not (tmp_path / "raw.h5").exists() and not list(tmp_path.glob(".raw*"))


@pytest.mark.parametrize("existing", ["raw.h5", "raw.series-2.h5"])
def test_record_over_an_existing_file_is_refused_before_anything_starts(
    tmp_path, expect_usage_error, existing
):
    (tmp_path / existing).write_bytes(b"keep")
    err = expect_usage_error(["run", "--headless", "--output", str(tmp_path / "out.h5"),
                              "--record", str(tmp_path / "raw.h5"), "--timeout", "1"])  # fmt: skip
    assert "--record" in err and "--overwrite" in err
    assert (tmp_path / existing).read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    same = str(tmp_path / "out.h5")
    err = expect_usage_error(["run", "--headless", "--output", same, "--record", same])
    assert "--output file" in err


@pytest.mark.parametrize("compressed", [True, False])
def test_the_recording_keeps_what_the_live_result_folds(tmp_path, compressed):
    """A duplicate frame id: the first copy (as `claim` keeps it live), counted; a blob that
    does not decompress (live: that position stays empty): not stored, counted; the lane's
    tap alike."""
    from tcbf_live.detectors.base import SeriesInfo
    from tcbf_live.stream.lane_reader import TappedFrames

    info = SeriesInfo(3, (2, 2), (16, 16), "<u2")
    frames = np.random.default_rng(2).poisson(3.0, (4, 16, 16)).astype("<u2")
    blobs = [compress_bslz4(f) for f in frames]
    bad = blobs[1][:12] + b"\xff" * 4 + blobs[1][16:]  # its first block claims 4 GiB
    f = rec_mod.SeriesFile(tmp_path / "r.tmp", info, compressed)
    one = lambda k, blob: CompressedFrame(3, k, blob, 2, (16, 16), "<u2")  # noqa: E731
    written = [f.write(0, one(0, blobs[0])), f.write(0, one(0, blobs[3])),  # a duplicate
               f.write(1, one(1, bad))]  # fmt: skip
    tapped = TappedFrames(3, np.frombuffer(blobs[3] + blobs[2], np.uint8),
                          np.array([0, len(blobs[3]), len(blobs[3]) + len(blobs[2])]),
                          np.array([0, 2]))  # fmt: skip
    written.append(f.write(np.array([0, 2]), tapped))  # 0 again, 2 new
    written.append(f.write(3, FrameBatch(3, 3, frames[3:4])))
    assert written == [1, 0, 0, 1, 1]
    assert f.present.tolist() == [True, False, True, True]
    assert f.skipped == {"duplicates (the first copy kept, as live)": 2,
                         "with a blob that does not decompress": 1}  # fmt: skip
    stored = f.finish(tmp_path / "r.h5", overwrite=False)
    master = DectrisMaster(stored)  # (position 1 has no chunk: `present` says so)
    np.testing.assert_array_equal(master.frames(0, 1)[0], frames[0])
    np.testing.assert_array_equal(master.frames(2, 2), frames[2:])
