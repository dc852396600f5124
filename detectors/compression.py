"""Detector-side compression, isolated behind `decompress` / `compress_bslz4`.

Formats (tcbf-physics reference `detector-protocols.md` sect. 2.5, 3.2):
- "bslz4": 8-byte big-endian uncompressed size, 4-byte big-endian block size (bytes), then
  bitshuffle + LZ4 blocks, each with a 4-byte big-endian length (HDF5 bitshuffle framing);
- "lz4" (Stream V2): 8-byte BE size, 4-byte BE block size, then BE-length-prefixed LZ4 blocks
  (HDF5 LZ4-filter framing).

The declared size is checked against what the caller expects *before* anything is
decompressed, so a blob claiming a huge size costs nothing.

Libraries, both optional (the `fast` extra): `dectris-compression` decodes everything received
where it is installed; it is faster than bitshuffle on detector-sized frames and the safer of
the two (bitshuffle's LZ4 path trusts its input and segfaulted on corrupted blobs in our
fuzzing; dectris-compression raised an exception on each of 9,000). `bitshuffle` only
*encodes* (the simulator's own frames), its OpenMP threads pinned to one (they are
pathologically slow on busy 2-core machines). Without them, `bslz4` (numba + the `lz4` package,
wheels everywhere) decodes and encodes the same blobs, with the same `DecodeError` reasons;
`BACKEND` names what is used. Costs: docs/detectors.md (benchmarks/decode_speed.py).

Inside numba kernels, `bslz4_into` decompresses a blob straight into a caller's buffer, so the
accumulate kernel folds each frame in while it is still in the L1 cache, with no bytes object
and no staging copy per frame. It calls the C symbol `compression_decompress_buffer`: the
library's public C API, exported by its extension module (versions in NATIVE_VERSIONS), or,
where that is missing, the portable decoder's C-callable twin bound to the same name at import
(`bslz4.c_entry`). One compiled kernel thus runs with either, also from numba's cache after the
library was installed or removed; `IN_KERNEL` names the one bound. `native_bslz4()` says
whether kernels may decompress in-kernel: the bound one decodes reference blobs exactly
(checked once).
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from importlib.metadata import PackageNotFoundError, version

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lz4.block  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402

from tcbf_live.detectors import bslz4 as portable  # noqa: E402
from tcbf_live.detectors.errors import DecodeError  # noqa: E402

try:
    from dectris.compression import decompress as dectris_decompress
except ImportError:  # the portable decoder takes over
    dectris_decompress = None

HEADER = struct.Struct(">QI")
BLOCK_BYTES = 8192  # DECTRIS' block size
LZ4_MAX_RATIO = 256  # an LZ4 block never decompresses to more than ~255x its size
log = logging.getLogger(__name__)


def _header(blob: memoryview, expected_nbytes: int, algorithm: str) -> int:
    if blob.nbytes < HEADER.size:
        raise DecodeError("truncated", f"{algorithm} blob of {blob.nbytes} bytes")
    size, block = HEADER.unpack_from(blob)
    if size != expected_nbytes:
        raise DecodeError("size_mismatch", f"{algorithm} header says {size} bytes, frame is "
                          f"{expected_nbytes}")  # fmt: skip
    if block == 0 or block > 1 << 24:
        raise DecodeError("bad_payload", f"{algorithm} block size {block}")
    # LZ4 cannot shrink data below ~1/255 of its size: a blob much smaller than that is
    # truncated; a blob larger than the worst-case expansion is corrupt
    if blob.nbytes > expected_nbytes + expected_nbytes // 255 + 16 * (size // block + 2) + 64:
        raise DecodeError("size_mismatch", f"{algorithm} blob larger than possible")
    if expected_nbytes > LZ4_MAX_RATIO * blob.nbytes + 1024:  # before allocating the frame
        raise DecodeError("truncated", f"{algorithm} blob of {blob.nbytes} bytes cannot hold "
                          f"{expected_nbytes}")  # fmt: skip
    return block


def decompress(algorithm: str, element_size: int, blob, expected_nbytes: int) -> bytes:
    """Bytes of one decompressed frame; DecodeError for anything inconsistent. Through
    dectris-compression where installed, else the portable decoder (`bslz4`)."""
    view = memoryview(blob).cast("B")
    if algorithm == "bslz4":
        if element_size not in (1, 2, 4):
            raise DecodeError("bad_payload", f"bslz4 element size {element_size}")
    elif algorithm != "lz4":
        raise DecodeError("bad_encoding", f"unsupported compression {algorithm!r}")
    _header(view, expected_nbytes, algorithm)
    if dectris_decompress is None:
        return decompress_portable(algorithm, element_size, view, expected_nbytes)
    try:
        if algorithm == "bslz4":
            return dectris_decompress(view, "bslz4", elem_size=element_size)
        return dectris_decompress(view, "lz4")
    except Exception as exc:  # corrupt blocks are reported as exceptions
        raise DecodeError("bad_payload", f"{algorithm}: {exc}") from None


def decompress_portable(algorithm: str, element_size: int, view: memoryview,
                        expected_nbytes: int) -> bytes:  # fmt: skip
    """`decompress` without the C library, for a blob whose header `_header` has accepted."""
    blob = np.frombuffer(view, np.uint8)
    out = np.empty(expected_nbytes, np.uint8)
    if algorithm == "bslz4":
        ok = portable.bslz4_into(blob, 0, len(blob), out, element_size)
    else:
        ok = portable.lz4_into(blob, out)
    if not ok:
        raise DecodeError("bad_payload", f"{algorithm}: a block does not decompress")
    return out.tobytes()


def decompress_lz4_block(data: memoryview, nbytes: int) -> bytes:
    """One bare LZ4 block (no header: native `lz4`, DECTRIS V1 `lz4<`) that must decompress to
    exactly `nbytes`. Sizes LZ4 cannot produce are refused before anything is allocated."""
    if data.nbytes > nbytes + nbytes // 255 + 64:  # LZ4 worst-case expansion bound
        raise DecodeError("size_mismatch", "lz4 payload larger than possible")
    if nbytes > LZ4_MAX_RATIO * data.nbytes + 1024:
        raise DecodeError("bad_payload", f"{data.nbytes} bytes of lz4 cannot hold {nbytes}")
    try:
        raw = lz4.block.decompress(data, uncompressed_size=nbytes)
    except Exception as exc:
        raise DecodeError("bad_payload", f"lz4: {exc}") from None
    if len(raw) != nbytes:
        raise DecodeError("size_mismatch", f"decoded {len(raw)} bytes, expected {nbytes}")
    return raw


def _bitshuffle():
    try:
        import bitshuffle
    except ImportError:
        return None
    return bitshuffle


def compress_bslz4(frame: np.ndarray) -> bytes:
    """DECTRIS bslz4 blob of one frame (header + bitshuffle/LZ4 blocks of 8192 bytes): by
    `bitshuffle` where installed, else by the portable encoder (`bslz4.compress_bslz4`)."""
    flat = np.ascontiguousarray(frame).ravel()
    library = _bitshuffle()
    if library is None:
        return portable.compress_bslz4(flat, BLOCK_BYTES)
    body = library.compress_lz4(flat, BLOCK_BYTES // flat.itemsize)
    return HEADER.pack(flat.nbytes, BLOCK_BYTES) + body.tobytes()


# ----------------------------------------------------------------- in-kernel decompression
MAX_BLOCK_BYTES = portable.MAX_BLOCK_BYTES
_BSLZ4 = 0  # CompressionAlgorithm COMPRESSION_BSLZ4_HDF5
_ERROR = portable.ENTRY_ERROR  # COMPRESSION_ERROR (SIZE_MAX)
_SYMBOL = "compression_decompress_buffer"
# versions whose C entry point has the signature `bslz4.ENTRY_SIGNATURE` (read in their sources)
NATIVE_VERSIONS = ((0, 3), (0, 4))


def _bind_entry() -> str:
    """Make the symbol `compression_decompress_buffer` resolvable for numba: the library's own
    where it is installed in a version known to export it with this signature, else the portable
    decoder's C-callable twin (`bslz4.c_entry`). Kernels call the symbol by name, so one compiled
    (and cached) kernel runs with either; returns which one is bound."""
    import llvmlite.binding

    try:
        release = tuple(int(x) for x in version("dectris-compression").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        release = None
    if dectris_decompress is not None and release in NATIVE_VERSIONS:
        try:
            import ctypes

            from dectris import compression as library

            ctypes.CDLL(library.__file__).compression_decompress_buffer  # noqa: B018 (exists?)
            llvmlite.binding.load_library_permanently(library.__file__)
            return "dectris-compression"
        except (ImportError, OSError, AttributeError) as exc:
            log.info("no in-kernel dectris-compression (%s)", exc)
    log.info("in-kernel bslz4: portable decoder (dectris-compression %s)", release)
    llvmlite.binding.add_symbol(_SYMBOL, portable.c_entry.address)
    return "portable"


IN_KERNEL = _bind_entry()  # what `bslz4_into` calls in kernels
BACKEND = "portable" if dectris_decompress is None else "dectris-compression"  # `decompress`
_entry = numba.types.ExternalFunction(_SYMBOL, portable.ENTRY_SIGNATURE)


@numba.njit(nogil=True, cache=True)
def bslz4_into(blob: np.ndarray, start: int, stop: int, out: np.ndarray, element_size: int) -> bool:
    """Decompress the bslz4 blob `blob[start:stop]` (uint8) into `out` (C-contiguous; its byte
    size is the frame's). The header must declare exactly that size, a sane block size and a
    blob no larger than LZ4 can produce, as in `decompress`; the entry point checks the rest.
    False for anything that does not decode to exactly `out.nbytes` bytes."""
    n = stop - start
    if n < 12 or start < 0 or stop > blob.shape[0]:
        return False
    size = 0
    for k in range(8):
        size = (size << 8) | np.int64(blob[start + k])
    block = 0
    for k in range(8, 12):
        block = (block << 8) | np.int64(blob[start + k])
    expected = out.nbytes
    if size != expected or block == 0 or block > MAX_BLOCK_BYTES:
        return False
    if n > expected + expected // 255 + 16 * (size // block + 2) + 64:
        return False
    got = _entry(_BSLZ4, out.ctypes.data, expected, blob[start:].ctypes.data, n, element_size)
    return got != _ERROR and got == expected


@functools.cache
def native_bslz4() -> bool:
    """Whether kernels may call `bslz4_into` (either implementation): it decodes reference
    frames (1-, 2- and 4-byte pixels, several blocks) exactly like `decompress` and refuses a
    lying and a truncated one. Checked once, on first use; otherwise everything goes through
    `decompress`."""
    try:
        rng = np.random.default_rng(7)
        for dtype in ("u1", "<u2", "<u4"):
            frame = rng.poisson(2.0, 96 * 96).astype(dtype)  # 9 KiB .. 36 KiB: several blocks
            blob = np.frombuffer(compress_bslz4(frame), np.uint8)
            size = frame.itemsize
            out = np.zeros_like(frame)
            if not (bslz4_into(blob, 0, len(blob), out, size) and np.array_equal(out, frame)):
                return False
            bad = blob.copy()
            bad[12:16] = 255  # the first block claims 4 GiB

            if bslz4_into(bad, 0, len(bad), out, size) or bslz4_into(blob, 0, len(blob) - 9,
                                                                      out, size):  # fmt: skip
                return False
        return True
    except Exception as exc:  # an incompatible build: use the Python path
        log.warning("in-kernel bslz4 (%s) disabled: %s", IN_KERNEL, exc)
        return False
