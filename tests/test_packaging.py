"""Packaging: what a wheel or an editable install of tcbf-live holds, and what it imports.

The four source folders (`stream/`, `detectors/`, `viewer/`, `simulators/`) are installed under one
namespace, `tcbf_live`, through pyproject's `package-dir` mapping. These tests keep that true for
every subpackage, whatever the install (editable checkout here, the built wheel in `.ci/run`),
and check that a user's own `stream.py` or `viewer/` beside their data shadows nothing of ours.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import tcbf_live

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OUR_TOP_LEVEL = ("stream", "detectors", "viewer", "simulators")
QT_MODULES = ("PySide6", "pyqtgraph", "shiboken6")
OPTIONAL_MODULES = (*QT_MODULES, "libertem", "emdfile", "rsciio")  # extras a module may need


def _setuptools() -> dict:
    return PYPROJECT["tool"]["setuptools"]


def _package_folders() -> dict[str, Path]:
    """Every package found on disk under the mapped folders: dotted name -> folder."""
    found = {}
    for package, folder in _setuptools()["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(root).parts
            found[".".join((package, *rel))] = init.parent
    return found


def test_the_package_list_names_every_folder_with_an_init():
    """A subpackage missing from `packages` would be silently left out of the wheel (the
    editable install still finds it through the mapping, so only a wheel would break)."""
    listed = set(_setuptools()["packages"])
    on_disk = set(_package_folders())
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == set(), "listed but without an __init__.py"
    assert all(p == "tcbf_live" or p.startswith("tcbf_live.") for p in listed)


def test_no_source_file_imports_a_top_level_name_of_ours():
    """Absolute `tcbf_live.` imports only: `import stream` would pick up a user's `stream.py`."""
    offenders = []
    for folder in {REPO / f for f in _setuptools()["package-dir"].values()}:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                else:
                    continue
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in OUR_TOP_LEVEL]  # fmt: skip
    assert offenders == []


def test_one_version_source():
    """pyproject's version is what the installed metadata, `__version__` and `--version` say."""
    expected = PYPROJECT["project"]["version"]
    assert importlib.metadata.version("tcbf-live") == expected, "reinstall: pip install -e ."
    assert tcbf_live.__version__ == expected
    out = subprocess.run([sys.executable, "-m", "tcbf_live", "--version"], capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == f"tcbf-live {expected}"


def test_the_result_file_records_the_package_version():
    from tcbf_live.stream import hdf5

    assert hdf5.__version__ is tcbf_live.__version__


@pytest.fixture
def shadowing_dir(tmp_path: Path) -> Path:
    """A working directory like a user's: `stream.py`, `detectors.py`, `viewer/`, `simulators/`
    of their own. Importing any of them ends the process with code 97."""
    trap = "import os, sys\nsys.stderr.write('shadow imported: ' + __file__)\nos._exit(97)\n"
    (tmp_path / "stream.py").write_text(trap)
    (tmp_path / "detectors.py").write_text(trap)
    for package in ("viewer", "simulators"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(trap)
    return tmp_path


def _run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_python_m_tcbf_live_ignores_a_users_stream_and_viewer(shadowing_dir):
    out = _run_in(shadowing_dir, "-m", "tcbf_live", "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: tcbf-live" in out.stdout
    for command in ("simulate", "run", "reconstruct", "demo", "view", "listen"):
        assert command in out.stdout


def test_every_module_imports_ours_beside_a_users_stream_and_viewer(shadowing_dir):
    """Each module of the package imported from the shadowing directory (modules of an extra
    skipped where it is not installed): ours are imported, the user's never."""
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        import tcbf_live, tcbf_live.stream
        for info in pkgutil.walk_packages(tcbf_live.__path__, "tcbf_live."):
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                if exc.name.split(".")[0] not in {OPTIONAL_MODULES!r}:
                    raise
        assert not any(n in sys.modules for n in {OUR_TOP_LEVEL!r}), "a top-level name loaded"
        print(tcbf_live.stream.__file__)
    """)
    out = _run_in(shadowing_dir, "-c", script)
    assert out.returncode == 0, out.stderr
    stream_init = Path(out.stdout.strip().splitlines()[-1])
    assert shadowing_dir not in stream_init.parents
    assert stream_init.name == "__init__.py" and (stream_init.parent / "engine.py").is_file()


def test_the_install_holds_nothing_at_the_top_level_but_tcbf_live():
    """No `stream`/`detectors`/`viewer`/`simulators` next to other distributions' files: the
    installed files (a wheel) or the editable finder's mapping (a checkout) name only
    `tcbf_live`."""
    # the installed distribution (it has a RECORD), not a checkout's tcbf_live.egg-info that the
    # repository root on sys.path also shows
    installed = [d for d in importlib.metadata.distributions(name="tcbf-live")
                 if d.read_text("RECORD") is not None]  # fmt: skip
    assert installed, "tcbf-live is not installed"
    dist = installed[0]
    assert dist.read_text("top_level.txt").split() == ["tcbf_live"]
    tops = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first == ".." or first == "__pycache__" or first.endswith(".dist-info"):
            continue
        tops.add(first)
        if first.startswith("__editable__") and first.endswith("_finder.py"):
            mapping = _finder_mapping(Path(dist.locate_file(f)).read_text())
            assert mapping and all(k.split(".")[0] == "tcbf_live" for k in mapping), mapping
    tops = {t for t in tops if not t.startswith("__editable__")}
    assert tops <= {"tcbf_live"}, tops


def _finder_mapping(source: str) -> dict[str, str]:
    """The `MAPPING` dict of setuptools' editable finder module."""
    for node in ast.parse(source).body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "MAPPING":
            return ast.literal_eval(node.value)
    return {}


@pytest.mark.skipif("TCBF_LIVE_EXPECT_INSTALLED" not in os.environ,
                    reason="set by .ci/run for the suite run against the installed wheel")
def test_the_suite_runs_against_the_installed_package():
    """In CI's fresh venv: the package under test is the wheel's copy in site-packages, not the
    checkout (whose `tcbf_live/` folder would shadow it from the repository root)."""
    import tcbf_live.stream

    site = Path(os.environ["TCBF_LIVE_EXPECT_INSTALLED"]).resolve()
    for module in (tcbf_live, tcbf_live.stream):
        assert site in Path(module.__file__).resolve().parents, module.__file__
    assert REPO not in Path(tcbf_live.__file__).resolve().parents
