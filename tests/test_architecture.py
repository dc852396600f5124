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
                "time", "operator", "abc"}  # fmt: skip  (no pathlib, os, io: no file I/O)


def modules():
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT), ast.parse(path.read_text(), str(path))


def imported(tree: ast.AST, rel: Path | None = None) -> set[str]:
    """Absolute names of every module a file imports: `import a.b`, `from a.b import c` (and
    `a.b.c`, in case c is a module), relative imports resolved against the file's package
    (`rel`, its path below the repository root)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level and rel is not None:
                package = ["tcbf_live", *rel.parts[:-1]] if rel.parts[0] != "tcbf_live" else []
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module:
                names.add(module)
                names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_no_package_imports_upward():
    wrong = []
    for rel, tree in modules():
        top = rel.parts[0]
        if top not in MAY_IMPORT:
            continue
        for name in imported(tree, rel):
            parts = name.split(".")
            if (parts[0] == "tcbf_live" and len(parts) > 1 and parts[1] not in MAY_IMPORT[top]
                    and parts[1] != "__version__"):  # fmt: skip
                wrong.append(f"{rel}: {name}")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_the_science_core_imports_nothing_impure():
    wrong = []
    for rel, tree in modules():
        if rel.parts[:2] != ("stream", "tcbf"):
            continue
        for name in imported(tree, rel):
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
    """The checks above can fail: upward imports (absolute, `from tcbf_live import ...` and
    relative), an impure core module, a long module and a long function are all found."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    files = {
        "detectors/bad.py": f"import tcbf_live.stream.engine\n\n\ndef f():\n{body}\n",
        "viewer/sneaky.py": "from tcbf_live import stream\nfrom ..stream import engine\n",
        "stream/tcbf/impure.py": "import logging\nfrom pathlib import Path\n" + "\n" * 400,
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError) as upward:
        test_no_package_imports_upward()
    assert "detectors/bad.py: tcbf_live.stream.engine" in str(upward.value)
    assert "viewer/sneaky.py: tcbf_live.stream" in str(upward.value)
    with pytest.raises(AssertionError, match="impure.py: logging"):
        test_the_science_core_imports_nothing_impure()
    with pytest.raises(AssertionError, match="impure.py: 402"):
        test_no_module_over_400_lines(MAX_MODULE_LINES)
    with pytest.raises(AssertionError, match="bad.py:f 81"):
        test_no_function_over_80_lines()
