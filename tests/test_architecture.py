"""The layout's rules (docs/architecture.md), read from the source: which package may import
which, the science core's purity, where argparse lives, module and function sizes."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tcbf_live", "stream", "detectors", "viewer", "simulators")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# what each package may import of the others (tcbf_live.<name>); the rest is upward
MAY_IMPORT = {
    "detectors": {"detectors"},
    "simulators": {"simulators", "detectors"},
    "viewer": {"viewer"},
    "stream": {"stream", "detectors", "simulators", "viewer"},
}
# the science core: numpy, scipy, numba and the pure parts of the standard library
CORE_ALLOWED = {"numpy", "scipy", "numba", "__future__", "typing", "dataclasses", "math",
                "functools", "itertools", "collections", "enum", "types", "re", "json",
                "pathlib", "time", "operator", "abc"}  # fmt: skip


def modules():
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT), ast.parse(path.read_text(), str(path))


def imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_package_imports_upward():
    wrong = []
    for rel, tree in modules():
        top = rel.parts[0]
        if top not in MAY_IMPORT:
            continue
        for name in imported(tree):
            parts = name.split(".")
            if parts[0] == "tcbf_live" and len(parts) > 1 and parts[1] not in MAY_IMPORT[top]:
                wrong.append(f"{rel}: {name}")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_the_science_core_imports_nothing_impure():
    wrong = []
    for rel, tree in modules():
        if rel.parts[:2] != ("stream", "tcbf"):
            continue
        for name in imported(tree):
            first = name.split(".")[0]
            if name.startswith("tcbf_live.stream.tcbf") or first in CORE_ALLOWED:
                continue
            wrong.append(f"{rel}: {name}")
    assert not wrong, "impure imports in the science core:\n" + "\n".join(wrong)
    assert "logging" not in CORE_ALLOWED and "threading" not in CORE_ALLOWED


def test_argparse_lives_in_the_commands_only():
    users = [str(rel) for rel, tree in modules() if "argparse" in imported(tree)]
    assert users and all(u.startswith("stream/cli/") for u in users), users


@pytest.mark.parametrize("limit", [MAX_MODULE_LINES])
def test_no_module_over_400_lines(limit):
    long = [f"{rel}: {len((ROOT / rel).read_text().splitlines())}" for rel, _ in modules()
            if len((ROOT / rel).read_text().splitlines()) > limit]  # fmt: skip
    assert not long, long


def test_no_function_over_80_lines():
    long = [f"{rel}:{node.name} {node.end_lineno - node.lineno + 1}"
            for rel, tree in modules() for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]  # fmt: skip
    assert not long, long


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: an upward import and a long function are found."""
    fake = tmp_path / "detectors"
    fake.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (fake / "bad.py").write_text(f"import tcbf_live.stream.engine\n\n\ndef f():\n{body}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="detectors/bad.py: tcbf_live.stream.engine"):
        test_no_package_imports_upward()
    with pytest.raises(AssertionError, match="bad.py:f 81"):
        test_no_function_over_80_lines()
