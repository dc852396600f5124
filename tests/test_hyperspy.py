"""HyperSpy through RosettaSciIO: `export --hspy` opens with `hyperspy.api.load` with physical
axes (`stream/hspy_export.py`), and 4D-STEM files RosettaSciIO reads (.hspy, .zspy, ...) are
inputs of `reconstruct` and `simulate --replay` (`detectors/rsciio_files.py`)."""

import h5py
import numpy as np
import pytest

rsciio_hspy = pytest.importorskip("rsciio.hspy")
hs = pytest.importorskip("hyperspy.api")

from test_record import run_live, same_result  # noqa: E402

from conftest import tutorial_dataset  # noqa: E402
from tcbf_live.detectors.rsciio_files import RsciioDataset, scan_metadata  # noqa: E402
from tcbf_live.simulators import Simulator, tutorial_config  # noqa: E402
from tcbf_live.stream.cli.main import main  # noqa: E402

SAMPLING_MRAD = 0.154


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """The tutorial preset as .npy (+ metadata) with its result, and as a HyperSpy 4D signal
    (.hspy: scan axes in nm, detector axes in mrad, energy and convergence angle in the
    metadata)."""
    tmp = tmp_path_factory.mktemp("hyperspy")
    npy, out = tutorial_dataset(tmp, "--semiangle", "4", "--angular-sampling", str(SAMPLING_MRAD))
    signal = hyperspy_signal(np.load(npy), Simulator(tutorial_config()).cfg.step_A)
    rsciio_hspy.file_writer(str(tmp / "d.hspy"), signal, show_progressbar=False)
    return tmp, out, signal


def hyperspy_signal(data: np.ndarray, step_A: float) -> dict:
    def axis(name, size, scale, units, navigate):
        return {"name": name, "size": size, "scale": scale, "offset": 0.0, "units": units,
                "navigate": navigate}  # fmt: skip

    rows, cols, qy, qx = data.shape
    return {
        "data": data,
        "axes": [axis("y", rows, step_A / 10, "nm", True), axis("x", cols, step_A / 10, "nm", True),
                 axis("ky", qy, SAMPLING_MRAD, "mrad", False),
                 axis("kx", qx, SAMPLING_MRAD, "mrad", False)],
        "metadata": {"General": {"title": "4D-STEM"},
                     "Signal": {"signal_type": "electron_diffraction"},
                     "Acquisition_instrument": {"TEM": {"beam_energy": 300.0,
                                                        "convergence_angle": 4.0}}},
        "original_metadata": {}, "attributes": {"_lazy": False}, "tmp_parameters": {},
        "learning_results": {}, "models": {},
        "package_info": {"package": "", "package_version": ""},
    }  # fmt: skip


def test_export_hspy_opens_in_hyperspy_with_physical_axes(tutorial, tmp_path):
    _, result, _ = tutorial
    out = tmp_path / "r.hspy"
    assert main(["export", str(result), "--hspy", str(out)]) == 0
    signals = {s.metadata.General.title: s for s in hs.load(str(out))}
    assert set(signals) == {"tcBF image", "incoherent BF", "axial BF", "BF shifts"}
    with h5py.File(result) as f:
        image, sampling = f["tcbf/image"][()], f["tcbf/image"].attrs["sampling_A"]
        shifts, pixels = f["alignment/shifts_px"][()], f["alignment/bf_pixels"][()]
        c10, step = f["aberrations"].attrs["C10_A"], f["acquisition"].attrs["step_A"]
        np.testing.assert_array_equal(signals["incoherent BF"].data, f["bf/incoherent"][()])
    tcbf = signals["tcBF image"]
    np.testing.assert_array_equal(tcbf.data, image)
    for ax in tcbf.axes_manager.signal_axes:
        assert ax.scale == pytest.approx(sampling) and ax.units == "Å"
    assert signals["axial BF"].axes_manager.signal_axes[0].scale == pytest.approx(step)
    field = signals["BF shifts"]
    assert field.axes_manager.signal_axes[0].units == "mrad"
    assert field.axes_manager.signal_axes[0].scale == pytest.approx(SAMPLING_MRAD)
    np.testing.assert_array_equal(field.data[:, pixels[:, 0], pixels[:, 1]].T, shifts)
    assert np.isnan(field.data[0, 0, 0])  # outside the bright field
    assert tcbf.metadata.Acquisition_instrument.TEM.beam_energy == pytest.approx(300.0)
    ab = tcbf.metadata.tcBF.aberrations
    assert ab.C10 == pytest.approx(c10) and ab.angle_unit == "rad"


def test_export_hspy_refuses_to_replace_and_other_names(tutorial, tmp_path, expect_usage_error):
    _, result, _ = tutorial
    out = tmp_path / "r.hspy"
    out.write_text("keep")
    assert "exists" in expect_usage_error(["export", str(result), "--hspy", str(out)])
    assert out.read_text() == "keep"
    assert ".hspy" in expect_usage_error(["export", str(result), "--hspy", str(tmp_path / "x")])
    assert "--emd" in expect_usage_error(["export", str(result)])
    assert ".emd" in expect_usage_error(["export", str(result), "--emd", str(tmp_path / "a.hspy"),
                                         "--hspy", str(tmp_path / "a.hspy")])  # fmt: skip
    assert not (tmp_path / "a.hspy").exists()


def test_reconstruct_reads_hspy_and_zspy_through_rosettasciio(tutorial):
    """No flags: the step (nm axes), the angular sampling (mrad axes), the energy and the
    semi-angle come from the file; the result equals the .npy's with the same values."""
    tmp, npy_result, signal = tutorial
    pytest.importorskip("rsciio.zspy").file_writer(str(tmp / "d.zspy"), signal,
                                                   show_progressbar=False)  # fmt: skip
    for name in ("d.hspy", "d.zspy"):
        out = tmp / f"{name}.h5"
        assert main(["reconstruct", str(tmp / name), "--output", str(out)]) == 0
        with h5py.File(npy_result) as a, h5py.File(out) as b:
            np.testing.assert_array_equal(a["tcbf/image"][()], b["tcbf/image"][()])
            assert b["acquisition"].attrs["energy_eV"] == pytest.approx(300e3)


def test_rosettasciio_input_is_lazy_and_its_metadata_are_read(tutorial):
    tmp, _, signal = tutorial
    with RsciioDataset(str(tmp / "d.hspy")) as d:
        assert type(d.array).__module__.startswith("dask")  # not read into memory
        info = d.series_info(1)
        assert info.step_A == pytest.approx(signal["axes"][1]["scale"] * 10)
        assert info.angular_sampling_mrad == pytest.approx(SAMPLING_MRAD)
        assert info.semiangle_mrad == 4.0 and info.ground_truth is None
        np.testing.assert_array_equal(d.frames(40, 20),
                                      signal["data"].reshape(-1, 128, 128)[40:60])  # fmt: skip
    from rsciio.utils.file import get_file_handle

    assert not get_file_handle(d.array, warn=False)  # closed with the dataset
    odd = {**signal, "axes": [{**a, "units": "<undefined>"} for a in signal["axes"]]}
    assert set(scan_metadata(odd)) == {"energy_eV", "semiangle_mrad"}


def test_a_file_without_a_4d_signal_is_refused_in_one_line(tutorial, tmp_path,
                                                           expect_usage_error):  # fmt: skip
    _, _, signal = tutorial
    flat = {**signal, "data": signal["data"][0, 0], "axes": signal["axes"][2:]}
    rsciio_hspy.file_writer(str(tmp_path / "img.hspy"), flat, show_progressbar=False)
    err = expect_usage_error(["reconstruct", str(tmp_path / "img.hspy"),
                              "--output", str(tmp_path / "x.h5")])  # fmt: skip
    assert "no 4D-STEM signal" in err


def test_replay_of_a_hspy_file_gives_the_result_of_the_npy(tutorial, tmp_path):
    """`simulate --replay FILE.hspy` streams the frames; the live result equals the live
    result of replaying the .npy with the same metadata."""
    tmp, _, _ = tutorial
    flags = ["--energy", "300000", "--step", str(256 / 24), "--semiangle", "4",
             "--angular-sampling", str(SAMPLING_MRAD)]  # fmt: skip
    assert run_live(tmp_path, "hspy", "native", ["--replay", str(tmp / "d.hspy")]) == 0
    assert run_live(tmp_path, "npy", "native", ["--replay", str(tmp / "d.npy"), *flags]) == 0
    same_result(tmp_path / "hspy.h5", tmp_path / "npy.h5")
