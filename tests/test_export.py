"""`export --emd` (`stream/emd.py`): a result as an EMD 1.0 file, read back with emdfile (the
library py4DSTEM reads its files with): the arrays with their sampling and the aberrations as
py4DSTEM's polar dict."""

import h5py
import numpy as np
import pytest

emdfile = pytest.importorskip("emdfile")

from conftest import tutorial_dataset  # noqa: E402
from tcbf_live.stream.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return tutorial_dataset(tmp_path_factory.mktemp("export"), "--semiangle", "4")[1]


def test_the_emd_file_holds_the_images_shifts_and_aberrations(result, tmp_path):
    emd = tmp_path / "r.emd"
    assert main(["export", str(result), "--emd", str(emd)]) == 0
    root = emdfile.read(str(emd))
    with h5py.File(result) as f:
        image, sampling = f["tcbf/image"][()], f["tcbf/image"].attrs["sampling_A"]
        ab = dict(f["aberrations"].attrs)
        np.testing.assert_array_equal(root.tree("incoherent_bf").data, f["bf/incoherent"][()])
        np.testing.assert_array_equal(root.tree("bf_shifts_px").data, f["alignment/shifts_px"][()])
        step = f["acquisition"].attrs["step_A"]
    tcbf = root.tree("tcbf_image")
    np.testing.assert_array_equal(tcbf.data, image)
    assert tcbf.dims[0][1] - tcbf.dims[0][0] == pytest.approx(sampling)
    assert tcbf.dim_units[0] == "A" and tcbf.units == "rad"
    polar = root.metadata["aberrations"]
    assert polar["C10"] == pytest.approx(ab["C10_A"]) and polar["phi12"] == ab["phi12_rad"]
    assert polar["C10_err"] == pytest.approx(ab["C10_A_err"]) and polar["angle_unit"] == "rad"
    assert root.metadata["acquisition"]["step_A"] == pytest.approx(step)


def test_export_never_replaces_a_file_unasked_and_refuses_what_is_not_a_result(result, tmp_path,
                                                                               capsys):  # fmt: skip
    emd = tmp_path / "r.emd"
    emd.write_text("keep")
    assert main(["export", str(result), "--emd", str(emd)]) == 2
    assert emd.read_text() == "keep"
    assert main(["export", str(result), "--emd", str(emd), "--overwrite"]) == 0
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    assert main(["export", str(other), "--emd", str(tmp_path / "o.emd")]) == 2
    err = capsys.readouterr().err
    assert "not a tcbf-live result" in err and "Traceback" not in err
