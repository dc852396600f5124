"""Memory a local worker shares with its coordinator, so that a delta travels as offsets.

A worker's delta is the stack rows it folded since the last one (about 5 KiB per 96x96 frame,
more than the compressed frame). Sent over the worker link, every byte crosses the loopback
TCP stack twice (the worker's ZeroMQ I/O thread, the coordinator's); on 2 cores the
coordinator's link I/O thread alone took a fifth of a core (docs/engine.md). A local worker
(`run --workers N`, spawned on the coordinator's host) instead takes its deltas into
*segments*: files in /dev/shm it creates at start, mapped by both processes, named by its pid
and a random tag the coordinator gave it at spawn (`owner`), so that neither a reused pid nor
another process can pass its files off as the worker's. Its delta message
then names a segment and an offset for each large array (`worker_link.pack(locate=)`); the
coordinator merges straight from its read-only mapping and answers "merged" as before, and the
worker takes its next delta into that memory only once that answer has come
(`worker_series.MergedMark`), so nothing is overwritten while it is read.

Life of a segment: the worker creates it (mode 0600, exclusive, its space reserved with
`posix_fallocate`, so a full /dev/shm fails here, not with SIGBUS on a later write) and names
it in its "hello"; the coordinator maps it read-only, checks its owner and size, and unlinks it
at once; from then on only the two mappings keep it, and it goes with the processes. A worker
unlinks its own once it has joined (or failed to), and the coordinator, at its end, what is
left of its local workers' (one killed before it joined). Workers on other hosts,
and local ones where /dev/shm cannot hold the segments, send their deltas' bytes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import stat
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "tcbf-live"
MAX_SEGMENTS = 8  # a worker names at most this many (it creates KEPT_BUFFERS)
SPARE_BYTES = 64 << 20  # left free in /dev/shm for everyone else


class SegmentError(OSError):
    """A segment that cannot be created or mapped (the link falls back to sending bytes)."""


def free_bytes() -> int:
    """What /dev/shm can take now, less SPARE_BYTES (0 where there is none)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return max(0, st.f_bavail * st.f_frsize - SPARE_BYTES)


def new_tag() -> str:
    """A random tag for one spawned worker's segment names (the coordinator's, at spawn)."""
    return secrets.token_hex(8)


def owner(pid: int, tag: str) -> str:
    """What names the segments of worker process `pid` spawned with `tag`: `PREFIX-owner-k`."""
    if not re.fullmatch(r"[0-9a-f]{16}", tag):
        raise ValueError(f"not a segment tag: {tag!r:.40}")
    return f"{int(pid)}-{tag}"


def allot(workers: int, nbytes: int) -> int:
    """How many of `workers` local workers, `nbytes` of segments each, /dev/shm can take now
    (the coordinator's share-out before it spawns them, so that they do not race for the last
    room; the others send their deltas over the link, logged)."""
    fit = min(workers, free_bytes() // max(1, nbytes))
    if fit < workers:
        log.info("%d of %d workers send their deltas over the link: %s has %d MiB free for "
                 "%d MiB each", workers - fit, workers, SHM_DIR, free_bytes() >> 20, nbytes >> 20)
    return fit


def create(nbytes: int, number: int, tag: str) -> tuple[str, np.ndarray]:
    """A new segment of `nbytes` of this process, spawned with `tag` (its name, a writable
    uint8 array over it, all zero: the pages are touched, as `memory_reserve.prepare_kept` wants
    them); SegmentError when /dev/shm lacks the room or cannot be written."""
    name = f"{PREFIX}-{owner(os.getpid(), tag)}-{number}"
    path = SHM_DIR / name
    if free_bytes() < nbytes:
        raise SegmentError(f"{SHM_DIR} has {free_bytes() >> 20} MiB free (beyond "
                           f"{SPARE_BYTES >> 20} MiB left for others)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise SegmentError(f"cannot create {path}: {err}") from None
    try:
        os.posix_fallocate(fd, 0, nbytes)  # (ENOSPC now, never SIGBUS on a write)
        buf = np.frombuffer(mmap.mmap(fd, nbytes), np.uint8)
    except (OSError, ValueError) as err:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise SegmentError(f"cannot map {path}: {err}") from None
    finally:
        os.close(fd)
    buf.fill(0)  # (touched: the first write's page faults now, not during the scan)
    return name, buf


def unlink(names: list[str]) -> None:
    """Remove the named segments' files (mappings stay valid); gone already is fine."""
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(SHM_DIR / name)


def mapped(hello: dict, whose: str | None, old: PeerSegments | None) -> PeerSegments | None:
    """The segments a worker's hello names, mapped, where it is the local process the
    coordinator spawned under that name (`whose`: its `owner`; None: another host's); None
    where there are none or they cannot be mapped (logged): its deltas come over the link.
    `old`: the segments of an earlier worker under the same name, closed now (kept until then:
    a worker that died may have deltas still queued)."""
    if old is not None:
        old.close()
    if whose is None or not hello.get("segments"):
        return None
    try:
        return PeerSegments.open(hello["segments"], whose)
    except SegmentError as err:
        log.warning("worker process %s sends its deltas over the link: %s", whose, err)
        return None


def unlink_of(whose: str | None) -> None:
    """Remove what is left of the segments of the worker process `whose` (its `owner`; None:
    it shares none): one that died before its coordinator mapped them, which nothing else would."""
    if whose is not None:
        unlink([f"{PREFIX}-{whose}-{k}" for k in range(MAX_SEGMENTS)])


class PeerSegments:
    """The coordinator's read-only views of one local worker's segments."""

    def __init__(self, views: list[memoryview], maps: list[mmap.mmap]):
        self.views, self._maps = views, maps
        self.bytes_read = 0  # the arrays read from them so far (`view`)

    @classmethod
    def open(cls, names: object, whose: str) -> PeerSegments:
        """Map the segments the worker process `whose` (its `owner`) named in its hello, then
        unlink them; only names of its own segments (`PREFIX-owner-k`, k < MAX_SEGMENTS), files
        of this user. SegmentError for anything else."""
        ours = {f"{PREFIX}-{whose}-{k}" for k in range(MAX_SEGMENTS)}
        if (not isinstance(names, list) or len(names) > MAX_SEGMENTS
                or not all(isinstance(n, str) and n in ours for n in names)):  # fmt: skip
            raise SegmentError(f"not segments of worker process {whose}: {names!r:.120}")
        views, maps = [], []
        try:
            for name in names:
                fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    st = os.fstat(fd)
                    if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                            or st.st_size <= 0):  # fmt: skip
                        raise SegmentError(f"{name}: not a segment of this user")
                    maps.append(mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ))
                finally:
                    os.close(fd)
                views.append(memoryview(maps[-1]))
        except OSError as err:
            cls(views, maps).close()
            raise SegmentError(f"cannot map a worker's segment: {err}") from None
        finally:
            unlink(names)
        return cls(views, maps)

    def view(self, number: object, offset: object, nbytes: int, align: int = 1) -> memoryview:
        """`nbytes` of segment `number` from `offset`, a multiple of `align` (an array's item
        size); ValueError when outside it or misaligned."""
        if type(number) is not int or type(offset) is not int or not (
                0 <= number < len(self.views)) or self.views[number] is None:  # fmt: skip
            raise ValueError(f"no segment {number!r}")
        seg = self.views[number]
        if offset < 0 or offset + nbytes > seg.nbytes:
            raise ValueError(f"{nbytes} bytes at {offset} outside segment {number}")
        if offset % align:
            raise ValueError(f"offset {offset} is not a multiple of the item size {align}")
        self.bytes_read += nbytes
        return seg[offset : offset + nbytes]

    def drop(self, numbers: object) -> None:
        """Unmap the segments the worker freed (`memory_reserve.unshared`: a series whose
        block they could not hold), so that their memory goes once the worker's goes too."""
        for k in numbers if isinstance(numbers, list) else ():
            if type(k) is int and 0 <= k < len(self.views) and self.views[k] is not None:
                with contextlib.suppress(BufferError):
                    self.views[k].release()
                    self._maps[k].close()
                self.views[k] = None

    def close(self) -> None:
        """Drop the mappings (a view still held elsewhere keeps its mapping alive)."""
        self.drop(list(range(len(self.views))))
        self.views, self._maps = [], []
