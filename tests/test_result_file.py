"""The result file's public contract (docs/result-file.md): every path and attribute the page
lists is in a written result, so the page and the file cannot drift apart."""

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream.hdf5 import write_result
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf import PipelineSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "result-file.md"
NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def contract() -> list[tuple[str, str, set[str]]]:
    """(path, kind, attribute names) of every row of the page's table."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`/"):
            continue
        paths = re.findall(r"`(/[^`]*)`", cells[0])
        kind, content = cells[1], cells[2]
        listed = content if kind == "attrs" else content.partition("attrs")[2]
        names = set(NAME.findall(listed))
        rows += [(p, kind, names) for p in paths]
    return rows


@pytest.fixture(scope="module")
def result_file(tmp_path_factory):
    sim = Simulator(tutorial_config())
    pipeline = PipelineSettings(target_resolution_A=10.0, depth_offsets_A=(-500.0, 0.0, 500.0))
    settings = ProcessingSettings(pipeline=pipeline, compensate_descan=True)  # (all of /descan)
    proc = SeriesProcessor(sim.series_info(1), settings)
    proc.add(FrameBatch(1, 0, sim.frames(0, sim.n_frames)))
    proc.solve(final=True)
    path = tmp_path_factory.mktemp("contract") / "r.h5"
    write_result(path, proc.result(final=True, complete=True), "native")
    return path


def test_the_page_lists_the_public_paths():
    paths = {p for p, _, _ in contract()}
    for must in ("/tcbf/image", "/aberrations", "/alignment/shifts_px", "/acquisition", "/dose",
                 "/bf/incoherent"):  # fmt: skip
        assert must in paths
    attrs = {n for _, _, names in contract() for n in names}
    assert {
        "sampling_A",
        "upsampling_factor",
        "C10_A",
        "defocus_A",
        "C12_A",
        "phi12_rad",
        "rotation_rad",
        "frames_received",
        "dose_e_per_A2",
        "resolution_A",
    } <= attrs


@pytest.mark.parametrize("path,kind,names", contract(), ids=lambda v: str(v)[:40])
def test_every_documented_entry_is_in_the_file(result_file, path, kind, names):
    with h5py.File(result_file) as f:
        assert path in f, f"{path} documented but not written"
        obj = f[path]
        if kind != "attrs":
            assert isinstance(obj, h5py.Dataset), path
        missing = names - set(obj.attrs)
        assert not missing, f"{path}: attributes {sorted(missing)} documented but not written"


def test_the_file_holds_the_documented_values(result_file):
    """A few values checked for meaning, not only presence: units and conventions."""
    with h5py.File(result_file) as f:
        ab = f["/aberrations"].attrs
        assert ab["defocus_A"] == -ab["C10_A"] and ab["defocus_A"] == pytest.approx(15000, 0.01)
        image = f["/tcbf/image"]
        assert image.attrs["upsampling_factor"] * np.array(f["/bf/hits"].shape) == pytest.approx(
            image.shape
        )
        assert f["/dose"].attrs["dose_e_per_A2"] == pytest.approx(100, rel=0.05)
        assert f["/acquisition"].attrs["frames_received"] == 24 * 48
        assert f["/"].attrs["software"] == "tcbf-live"
