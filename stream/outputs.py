"""Output files that never replace a file silently and never exist half-written.

Every file a command writes (result, saved dataset, screenshot) is checked before the work
starts (`check_output`: not a directory, a writable folder, not one of the inputs, not an
existing file unless --overwrite), then written to a hidden temporary file in the same folder,
flushed to disk and moved into place in one step (`atomic_output`). Without --overwrite the move
is a hard link, which fails if the target appeared meanwhile: a file created while the command
ran is never replaced either.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from tcbf_live.stream.cli.common import UsageError


class OutputExists(FileExistsError):
    """The target appeared while the command worked (and --overwrite was not given)."""


def input_path(spec: str) -> Path:
    """The file behind an input spec (`FILE.h5:/dataset` -> FILE.h5)."""
    from tcbf_live.detectors.files import split_dataset_spec

    return split_dataset_spec(spec)[0]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and relative paths resolved)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def series_output(path: str | Path, number: int) -> Path:
    """Where a run's `number`-th written series goes: r.h5, r.series-2.h5, r.series-3.h5 ..."""
    path = Path(path)
    if number == 1:
        return path
    return path.with_name(f"{path.stem}.series-{number}{path.suffix}")


def check_output(
    path: str | Path,
    overwrite: bool,
    inputs: Iterable[str | Path] = (),
    flag: str = "--output",
    companions: Iterable[Path] = (),
) -> Path:
    """Refuse, with one line (UsageError), an output that cannot or must not be written: a
    directory, a missing or read-only folder, one of `inputs`, or an existing file without
    `overwrite` (`companions`: files written with it, e.g. a .npy's .json sidecar)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory: name a file")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{flag}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: folder {folder} is not writable")
    for other in inputs:
        for target in (path, *companions):
            if same_file(target, Path(other)):
                raise UsageError(f"{flag} {target} is an input file: write elsewhere")
    if not overwrite:
        for target in (path, *companions):
            if target.exists() or target.is_symlink():
                raise UsageError(f"{flag} {target} exists: pass --overwrite to replace it")
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be synced
        _fsync(folder)


def commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `target` in one step; without `overwrite`, OutputExists
    (and `tmp` left in place) if `target` exists."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # atomic and never replaces: fails if the target exists
    except FileExistsError:
        raise OutputExists(f"{target} appeared meanwhile: not replaced") from None
    except OSError:  # no hard links here (some network / FAT file systems)
        if target.exists() or target.is_symlink():
            raise OutputExists(f"{target} appeared meanwhile: not replaced") from None
        os.rename(tmp, target)
        return
    os.unlink(tmp)


def temporary_name(target: Path, suffix: str | None = None) -> Path:
    """A hidden, unique name beside `target`, keeping its suffix (writers pick the format by
    it: Qt for PNG, numpy for .npy)."""
    suffix = target.suffix if suffix is None else suffix
    return target.with_name(f".{target.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def remove_stale_temporaries(target: Path) -> int:
    """Remove the temporary files a killed writer left beside `target` (SIGKILL, power loss:
    no `finally` ran): hidden `.<stem>.tmp-<pid>-*` names whose process is gone. Returns how
    many. A live process's temporary file is never touched."""
    removed = 0
    for path in target.parent.glob(f".{target.stem}.tmp-*"):
        try:
            pid = int(path.name.split(".tmp-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        except (ValueError, IndexError, PermissionError):
            continue  # not one of ours, or another user's live process
    return removed


@contextlib.contextmanager
def atomic_output(
    target: str | Path,
    overwrite: bool = False,
    companions: tuple[str, ...] = (),
) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write; when the block ends normally, flush it
    to disk and move it to `target` (`commit`). If the block raises, or the move is refused,
    the temporary file is removed and `target` is left as it was.

    `companions`: suffixes of files written beside the temporary one (`.json` for a .npy's
    sidecar); they are moved to `target.with_suffix(...)` first, the main file last."""
    target = Path(target)
    remove_stale_temporaries(target)
    tmp = temporary_name(target)
    pairs = [(tmp.with_suffix(s), target.with_suffix(s)) for s in companions] + [(tmp, target)]
    done: list[Path] = []
    try:
        yield tmp
        for t, final in pairs:
            if not t.exists():  # the writer reported no error but wrote nothing
                raise OSError(f"{final} was not written")
            _fsync(t)
        for t, final in pairs:
            commit(t, final, overwrite)
            done.append(final)
        _fsync_folder(target.parent)
    except BaseException:
        for t, _ in pairs:
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
        if not overwrite:  # companions moved before the main file was refused
            for final in done:
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
        raise
