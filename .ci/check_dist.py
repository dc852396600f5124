"""Check a built wheel and sdist against the source tree (run by .ci/run from the repository root).

Wheel: every source module of the mapped folders, under `tcbf_live/` only (no top-level `stream`,
`detectors`, `viewer`, `simulators`), the license, the pyproject version, nothing else (a stale
`build/` module would show up here). Sdist: the files a source release needs.
Usage: python .ci/check_dist.py WHEEL SDIST
"""

from __future__ import annotations

import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path, PurePosixPath


def expected_modules(pyproject: dict) -> set[str]:
    """Wheel paths of every .py file under the folders pyproject maps into tcbf_live."""
    setuptools = pyproject["tool"]["setuptools"]
    paths = set()
    for package, folder in setuptools["package-dir"].items():
        for path in Path(folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                rel = path.relative_to(folder).as_posix()
                paths.add(f"{package.replace('.', '/')}/{rel}")
    return paths


def check_wheel(wheel: Path, pyproject: dict) -> list[str]:
    version = pyproject["project"]["version"]
    dist_info = f"tcbf_live-{version}.dist-info"
    names = set(zipfile.ZipFile(wheel).namelist())
    problems = []
    modules = {n for n in names if not n.startswith(dist_info)}
    expected = expected_modules(pyproject)
    problems += [f"wheel lacks {m}" for m in sorted(expected - modules)]
    problems += [f"wheel has {m}, not in the source tree" for m in sorted(modules - expected)]
    tops = {PurePosixPath(n).parts[0] for n in names}
    if tops != {"tcbf_live", dist_info}:
        problems.append(f"wheel top-level entries {sorted(tops)}")
    if f"{dist_info}/licenses/LICENSE" not in names:
        problems.append("wheel lacks the license")
    print(f"wheel {wheel.name}: {len(modules)} modules, top level {sorted(tops)}")
    return problems


def check_sdist(sdist: Path, pyproject: dict) -> list[str]:
    root = f"tcbf_live-{pyproject['project']['version']}"
    names = {n.removeprefix(root + "/") for n in tarfile.open(sdist).getnames()}
    needed = ["LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "tests/conftest.py",
              "docs/install.md", "benchmarks/common.py", "stream/engine.py"]  # fmt: skip
    problems = [f"sdist lacks {n}" for n in needed if n not in names]
    problems += [f"sdist has {n}" for n in names if n.startswith("build/") or "stale" in n]
    print(f"sdist {sdist.name}: {len(names)} entries")
    return problems


def main() -> int:
    wheel, sdist = map(Path, sys.argv[1:3])
    pyproject = tomllib.loads(Path("pyproject.toml").read_text())
    problems = check_wheel(wheel, pyproject) + check_sdist(sdist, pyproject)
    for p in problems:
        print(f"check_dist: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
