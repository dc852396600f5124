"""LiberTEM as an engine (`stream/libertem_udf.py`, `reconstruct --engine libertem`): the UDF's
accumulate / merge / solve phases give what the built-in engine gives on the same frames, on
LiberTEM's local workers, on a plain Dask cluster, and live under `run_udf_iter`."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

pytest.importorskip("libertem.api")

from libertem.api import Context  # noqa: E402
from libertem.io.dataset.memory import MemoryDataSet  # noqa: E402

from conftest import tutorial_dataset  # noqa: E402
from tcbf_live.simulators import Simulator, tutorial_config  # noqa: E402
from tcbf_live.stream.cli.main import main  # noqa: E402
from tcbf_live.stream.libertem_udf import TcbfUDF  # noqa: E402
from tcbf_live.stream.tcbf.accumulators import Accumulators  # noqa: E402
from tcbf_live.stream.tcbf.offline import reconstruct  # noqa: E402

TRUE_DEFOCUS_A = 15000.0  # tutorial preset


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """The tutorial preset on disk (.npy + metadata) and the built-in engine's result."""
    return tutorial_dataset(tmp_path_factory.mktemp("libertem"), "--semiangle", "4")


def same_result(a_path, b_path) -> None:
    """Defocus, shifts, image and the accumulated maps are equal (integer frames: exact)."""
    with h5py.File(a_path) as a, h5py.File(b_path) as b:
        for name in ("tcbf/image", "alignment/shifts_px", "bf/incoherent", "bf/axial"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert a["aberrations"].attrs["C10_A"] == b["aberrations"].attrs["C10_A"]
        assert b["acquisition"].attrs["frames_received"] == a["acquisition"].attrs[
            "frames_received"]  # fmt: skip


def test_reconstruct_on_libertem_workers_equals_the_builtin_engine(tutorial, tmp_path):
    data, builtin = tutorial
    out = tmp_path / "libertem.h5"
    assert main(["reconstruct", str(data), "--output", str(out), "--semiangle", "4",
                 "--engine", "libertem", "--workers", "2"]) == 0  # fmt: skip
    same_result(builtin, out)
    with h5py.File(out) as f:
        assert abs(-f["aberrations"].attrs["C10_A"] - TRUE_DEFOCUS_A) < 0.02 * TRUE_DEFOCUS_A


CLUSTER = """
import subprocess, sys
from distributed import LocalCluster
if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        argv = sys.argv[1:] + ["--scheduler", cluster.scheduler_address]
        sys.exit(subprocess.run(argv).returncode)
"""


def test_reconstruct_on_a_dask_local_cluster_equals_the_builtin_engine(tutorial, tmp_path):
    """A plain `distributed.LocalCluster` (no LiberTEM worker resources), reached through
    `--scheduler` as a cluster of other hosts would be."""
    data, builtin = tutorial
    out = tmp_path / "cluster.h5"
    tcbf = [sys.executable, "-m", "tcbf_live", "reconstruct", str(data), "--output", str(out),
            "--semiangle", "4", "--engine", "libertem"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CLUSTER, *tcbf], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    same_result(builtin, out)


@pytest.fixture(scope="module")
def frames():
    sim = Simulator(tutorial_config())
    return sim.cfg, sim.frames(0, sim.n_frames)


def udf_for(cfg, frames, **kw) -> TcbfUDF:
    return TcbfUDF.calibrated(frames[:64], scan_shape=cfg.scan_shape, energy_eV=cfg.energy_eV,
                              step_A=cfg.step_A, semiangle_mrad=4.0, **kw)  # fmt: skip


def test_run_udf_iter_gives_a_model_before_the_scan_ends(frames):
    """LiberTEM's `run_udf_iter` (what LiberTEM-live runs on a live detector): the solve
    phase on partial results; the last equals the offline core's result."""
    cfg, f = frames
    data = f.reshape(*cfg.scan_shape, *cfg.detector_shape)
    ctx = Context.make_with("inline")
    ds = MemoryDataSet(data=data, num_partitions=6, sig_dims=2).initialize(ctx.executor)
    early = []
    for part in ctx.run_udf_iter(dataset=ds, udf=udf_for(cfg, f)):
        done, b = int(part.damage.data.sum()), part.buffers[0]
        if done < len(f) and b["tcbf"].data[0] is not None:
            early.append((done, float(b["defocus_A"].data[0])))
    assert early and early[0][0] <= len(f) // 2, early  # a model by half the scan
    assert all(abs(d - TRUE_DEFOCUS_A) < 0.05 * TRUE_DEFOCUS_A for _, d in early), early
    last = b["tcbf"].data[0]
    ref = reconstruct(data, energy_eV=cfg.energy_eV, step_A=cfg.step_A, semiangle_mrad=4.0)
    np.testing.assert_array_equal(last.image, ref.image)
    np.testing.assert_array_equal(last.shifts_px, ref.shifts_px)
    assert float(b["defocus_A_err"].data[0]) > 0


def test_a_serpentine_scan_lands_at_its_positions(frames):
    """LiberTEM's nav order is the acquisition order: serpentine rows are put back in scan
    order before the solve, as the built-in engine places them."""
    cfg, f = frames
    data = f.reshape(*cfg.scan_shape, *cfg.detector_shape)
    ctx = Context.make_with("inline")
    ds = MemoryDataSet(data=data, num_partitions=4, sig_dims=2).initialize(ctx.executor)
    got = ctx.run_udf(ds, udf_for(cfg, f, scan_order="serpentine"))["tcbf"].data[0]
    ref = reconstruct(data, energy_eV=cfg.energy_eV, step_A=cfg.step_A, semiangle_mrad=4.0,
                      scan_order="serpentine")  # fmt: skip
    np.testing.assert_array_equal(got.shift_and_add, ref.shift_and_add)


def test_live_libertem_memory_detector(frames):
    """LiberTEM-live's own `run_udf_iter` on its memory detector (the documented example)."""
    live = pytest.importorskip("libertem_live.api")
    cfg, f = frames
    data = f.reshape(*cfg.scan_shape, *cfg.detector_shape)
    ctx = live.LiveContext.make_with("inline")
    models = []
    with ctx.make_connection("memory").open(data=data) as conn:
        aq = ctx.make_acquisition(conn=conn, nav_shape=cfg.scan_shape)
        for part in ctx.run_udf_iter(dataset=aq, udf=udf_for(cfg, f)):
            models.append((int(part.damage.data.sum()), part.buffers[0]["defocus_A"].data[0]))
    assert any(n < len(f) and np.isfinite(d) for n, d in models), models
    assert abs(models[-1][1] - TRUE_DEFOCUS_A) < 0.02 * TRUE_DEFOCUS_A


def test_serpentine_files_and_a_fixed_calibration_give_the_builtin_result(frames, tmp_path):
    """A 4D file stores a serpentine scan by position (LiberTEM's nav order is then the scan
    order, not the acquisition order), and `--calibration FILE` replaces the calibration on
    the first frames: both as the built-in engine does, bit for bit."""
    from tcbf_live.detectors.files import write_dataset
    from tcbf_live.stream.tcbf.calibration import calibrate

    cfg, f = frames
    data = tmp_path / "serpentine.npy"
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, cfg.dtype, {},
                  iter([(0, f)]), scan_order="serpentine")  # fmt: skip
    moved = calibrate(f[:64])
    (tmp_path / "cal.json").write_text(moved.to_json())
    flags = ["--energy", "3e5", "--step", str(cfg.step_A), "--semiangle", "4"]
    for extra, name in (([], "s"), (["--calibration", str(tmp_path / "cal.json")], "c")):
        args = ["reconstruct", str(data), *flags, *extra]
        assert main([*args, "--output", str(tmp_path / f"{name}-builtin.h5")]) == 0
        assert main([*args, "--output", str(tmp_path / f"{name}-libertem.h5"), "--engine",
                     "libertem", "--workers", "0"]) == 0  # fmt: skip
        same_result(tmp_path / f"{name}-builtin.h5", tmp_path / f"{name}-libertem.h5")


def test_what_the_udf_cannot_process_is_refused_clearly(frames):
    """Float frames (e.g. LiberTEM's dark/gain corrections) into a UDF calibrated on counts,
    a region of interest, another scan shape: a clear error, never a truncated stack."""
    cfg, f = frames
    data = f.reshape(*cfg.scan_shape, *cfg.detector_shape)
    ctx = Context.make_with("inline")
    udf = udf_for(cfg, f)
    floats = MemoryDataSet(data=data.astype(np.float32) - 0.25, num_partitions=2,
                           sig_dims=2).initialize(ctx.executor)  # fmt: skip
    with pytest.raises(Exception, match="calibrated on unsigned-integer frames"):
        ctx.run_udf(floats, udf)
    ds = MemoryDataSet(data=data, num_partitions=2, sig_dims=2).initialize(ctx.executor)
    roi = np.zeros(cfg.scan_shape, bool)
    roi[:4] = True
    with pytest.raises(Exception, match="whole scan 24x48"):
        ctx.run_udf(ds, udf_for(cfg, f), roi=roi)
    half = MemoryDataSet(data=data[:12], num_partitions=2, sig_dims=2).initialize(ctx.executor)
    with pytest.raises(Exception, match=r"navigation is \(12, 48\)"):
        ctx.run_udf(half, udf_for(cfg, f))


def test_accumulators_refuse_arrays_of_another_geometry(frames):
    cfg, f = frames
    udf = udf_for(cfg, f)
    p = udf.params
    acc = Accumulators((2, 3), p.calibration, p.layout, p.axial_radius_px)
    with pytest.raises(ValueError, match="state.totals"):
        Accumulators((2, 4), p.calibration, p.layout, p.axial_radius_px, state=acc.state)


def test_engine_flags_are_checked(tutorial, tmp_path, expect_usage_error, monkeypatch):
    data, _ = tutorial
    base = ["reconstruct", str(data), "--output", str(tmp_path / "x.h5")]
    assert "--engine libertem" in expect_usage_error([*base, "--workers", "2"])
    assert "built-in engine" in expect_usage_error(
        [*base, "--engine", "libertem", "--compensate-descan"])  # fmt: skip
    assert "not both" in expect_usage_error(
        [*base, "--engine", "libertem", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert "tcp://HOST:PORT" in expect_usage_error(
        [*base, "--engine", "libertem", "--scheduler", "notaurl"])
    monkeypatch.setitem(sys.modules, "libertem.api", None)  # as if LiberTEM were not installed
    assert "tcbf-live[libertem]" in expect_usage_error([*base, "--engine", "libertem"])
    assert not (tmp_path / "x.h5").exists()
