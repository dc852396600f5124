"""Detector-side compression, isolated behind `decompress` / `compress_bslz4`.

Formats (tcbf-physics reference `detector-protocols.md` sect. 2.5, 3.2):
- "bslz4": 8-byte big-endian uncompressed size, 4-byte big-endian block size (bytes), then
  bitshuffle + LZ4 blocks, each with a 4-byte big-endian length (HDF5 bitshuffle framing);
- "lz4" (Stream V2): 8-byte BE size, 4-byte BE block size, then BE-length-prefixed LZ4 blocks
  (HDF5 LZ4-filter framing).

The declared size is checked against what the caller expects *before* anything is
decompressed, so a blob claiming a huge size costs nothing.

Library: `dectris-compression` decodes everything received. Measured here
(benchmarks/decode_speed.py, one core) it is also the faster of the two on detector-sized frames
(5.7 vs 19.9 us for a 96x96 uint16 frame, 20 vs 47 us at 192x192), and the safer: bitshuffle's
LZ4 path trusts its input and segfaulted on corrupted blobs in our fuzzing (that would take the
receiver down), while dectris-compression raised an exception on each of 9,000 of them.
bitshuffle only *encodes* (the simulator's own frames), with
its OpenMP threads pinned to one (they are pathologically slow on busy 2-core machines).
"""

from __future__ import annotations

import os
import struct

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from .base import DecodeError  # noqa: E402

HEADER = struct.Struct(">QI")
BLOCK_BYTES = 8192  # DECTRIS' block size


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
    return block


def decompress(algorithm: str, element_size: int, blob, expected_nbytes: int) -> bytes:
    """Bytes of one decompressed frame; DecodeError for anything inconsistent."""
    view = memoryview(blob).cast("B")
    if algorithm == "bslz4":
        if element_size not in (1, 2, 4):
            raise DecodeError("bad_payload", f"bslz4 element size {element_size}")
        _header(view, expected_nbytes, algorithm)
        from dectris.compression import decompress as dectris_decompress

        try:
            return dectris_decompress(bytes(view), "bslz4", elem_size=element_size)
        except Exception as exc:  # corrupt blocks are reported as exceptions
            raise DecodeError("bad_payload", f"bslz4: {exc}") from None

    if algorithm == "lz4":
        _header(view, expected_nbytes, algorithm)
        from dectris.compression import decompress as dectris_decompress

        try:
            return dectris_decompress(bytes(view), "lz4")
        except Exception as exc:
            raise DecodeError("bad_payload", f"lz4: {exc}") from None
    raise DecodeError("bad_encoding", f"unsupported compression {algorithm!r}")


def compress_bslz4(frame: np.ndarray) -> bytes:
    """DECTRIS bslz4 blob of one frame (header + bitshuffle/LZ4 blocks of 8192 bytes)."""
    import bitshuffle

    flat = np.ascontiguousarray(frame).ravel()
    body = bitshuffle.compress_lz4(flat, BLOCK_BYTES // flat.itemsize)
    return HEADER.pack(flat.nbytes, BLOCK_BYTES) + body.tobytes()
