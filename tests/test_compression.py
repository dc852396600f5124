"""The bslz4/lz4 codecs: the portable numba codec (`detectors/bslz4.py`) against the C
libraries (`dectris-compression`, `bitshuffle`) bit for bit, on synthetic and real blobs; corrupt
input fails cleanly; and the engine works with the C libraries unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcbf_live.detectors import bslz4 as portable
from tcbf_live.detectors import compression
from tcbf_live.detectors.errors import DecodeError

ROOT = Path(__file__).resolve().parents[1]
CAPTURE = ROOT.parent / "shared" / "data" / "dectris-stream-v2" / "image.cbor"
DTYPES = ("u1", "<u2", "<u4")
# element counts: multiples of 8, odd, one short of a block, several blocks plus a tail
COUNTS = (0, 1, 7, 8, 9, 100, 1023, 4096, 4103, 96 * 96, 12_345, 192 * 192)


def frame(n: int, dtype: str, seed: int = 0) -> np.ndarray:
    """Sparse Poisson counts with a few large values (every bit plane used)."""
    rng = np.random.default_rng(seed)
    f = rng.poisson(0.5, n).astype(dtype)
    f[rng.integers(0, max(n, 1), n // 50)] = np.iinfo(dtype).max
    return f


def with_library(flat: np.ndarray, block_elems: int) -> bytes:
    bitshuffle = pytest.importorskip("bitshuffle")
    body = bitshuffle.compress_lz4(flat, block_elems).tobytes()
    return compression.HEADER.pack(flat.nbytes, block_elems * flat.itemsize) + body


def decode(blob: bytes, out: np.ndarray, element_size: int) -> bool:
    data = np.frombuffer(blob, np.uint8)
    return portable.bslz4_into(data, 0, len(data), out, element_size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitshuffle_transform_equals_the_library(dtype):
    bitshuffle = pytest.importorskip("bitshuffle")
    for n in COUNTS:
        for block_elems in (8, 64, 8192 // np.dtype(dtype).itemsize):
            f = frame(n, dtype, n)
            want = bitshuffle.bitshuffle(f, block_elems).view(np.uint8)
            raw = f.view(np.uint8)
            got = portable._shuffle_blocks(raw, f.itemsize, block_elems * f.itemsize)
            np.testing.assert_array_equal(got, want, err_msg=f"{n} x {dtype} / {block_elems}")
            # blocks of whole groups of 8 elements are shuffled, the last n % 8 kept raw
            shuffled = n // 8 * 8 * f.itemsize
            back = got.copy()
            for at in range(0, shuffled, block_elems * f.itemsize):
                m = min(block_elems * f.itemsize, shuffled - at) // f.itemsize
                portable.bitunshuffle(got, at, back, at, m, f.itemsize)
            np.testing.assert_array_equal(back, raw)


def blocks(blob: bytes, n_bytes: int, group: int) -> list[bytes]:
    """The decompressed (still bitshuffled) blocks of a bslz4 blob, then its raw tail."""
    block = int.from_bytes(blob[8:12], "big")
    at, out, done = 12, [], 0
    while n_bytes - done >= group:
        want = min(block, n_bytes - done) // group * group
        length = int.from_bytes(blob[at:at + 4], "big")
        out.append(lz4.block.decompress(blob[at + 4:at + 4 + length], uncompressed_size=want))
        at, done = at + 4 + length, done + want
    return [*out, blob[at:]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_encoder_equals_bitshuffle_and_both_decoders_read_it(dtype):
    """The same header, block layout, bitshuffled blocks and raw tail as `bitshuffle` writes,
    bit for bit; the LZ4 bytes themselves differ (bitshuffle bundles another LZ4 release than
    the `lz4` package: same compressor settings, other matches found). Decoded alike by
    dectris-compression and the portable decoder, for odd sizes and partial blocks."""
    dectris = pytest.importorskip("dectris.compression")
    for n in COUNTS:
        f = frame(n, dtype, n + 1)
        blob = portable.compress_bslz4(f)
        library = with_library(f, 8192 // f.itemsize)
        assert blob[:12] == library[:12]
        group = 8 * f.itemsize
        assert blocks(blob, f.nbytes, group) == blocks(library, f.nbytes, group), (n, dtype)
        assert dectris.decompress(blob, "bslz4", elem_size=f.itemsize) == f.tobytes()
        out = np.full_like(f, 3)
        assert decode(blob, out, f.itemsize) and np.array_equal(out, f)
        assert decode(library, out, f.itemsize) and np.array_equal(out, f)


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_decoder_equals_dectris_for_other_block_sizes(dtype):
    dectris = pytest.importorskip("dectris.compression")
    size = np.dtype(dtype).itemsize
    for n in (7, 8, 100, 1001, 96 * 96):
        f = frame(n, dtype, 2 * n)
        for block_elems in (8, 16, 512, 1 << 14):
            blob = with_library(f, block_elems)
            assert dectris.decompress(blob, "bslz4", elem_size=size) == f.tobytes()
            out = np.zeros_like(f)
            assert decode(blob, out, size) and np.array_equal(out, f), (n, block_elems)
            roundtrip = portable.compress_bslz4(f, block_elems * size)
            assert decode(roundtrip, out, size) and np.array_equal(out, f)


def capture_blob() -> bytes:
    """The bslz4 blob of the real EIGER2 16M frame (4362 x 4148 uint16, 8192-byte blocks)."""
    if not CAPTURE.exists():
        pytest.skip("no DECTRIS capture in ../shared/data")
    data = CAPTURE.read_bytes()
    at = data.index(compression.HEADER.pack(4362 * 4148 * 2, 8192))
    return data[at:at + 513_082]


def test_real_eiger2_blob_decodes_identically():
    blob = capture_blob()
    out = np.empty(4362 * 4148, np.uint16)
    assert decode(blob, out, 2)
    got = compression.decompress_portable("bslz4", 2, memoryview(blob), out.nbytes)
    assert got == out.tobytes()
    try:
        from dectris.compression import decompress
    except ImportError:  # still checked against the published statistics (test_dectris)
        assert int(out[out != 65535].sum()) == 13_712
        return
    assert decompress(blob, "bslz4", elem_size=2) == got


def lz4_framed(raw: bytes, block: int) -> bytes:
    """HDF5 LZ4-filter framing; a block LZ4 does not shrink is stored raw, as the filter does."""
    parts = [compression.HEADER.pack(len(raw), block)]
    for at in range(0, len(raw), block):
        chunk = raw[at:at + block]
        packed = lz4.block.compress(chunk, store_size=False)
        packed = chunk if len(packed) >= len(chunk) else packed
        parts += [len(packed).to_bytes(4, "big"), packed]
    return b"".join(parts)


def test_lz4_framing_decodes_like_dectris():
    rng = np.random.default_rng(3)
    sparse = frame(96 * 96, "<u2").tobytes()
    noise = rng.integers(0, 256, 20_000, np.uint8).tobytes()  # incompressible: raw blocks
    for raw in (sparse, noise, sparse[:1001], noise[:5]):
        for block in (8192, 1000):
            blob = lz4_framed(raw, block)
            got = compression.decompress_portable("lz4", 1, memoryview(blob), len(raw))
            assert got == raw
            try:
                from dectris.compression import decompress
            except ImportError:
                continue
            assert decompress(blob, "lz4") == raw


def corrupted(blob: bytes, data) -> bytes:
    """`blob` with a few bytes changed, a range deleted or duplicated, or cut short."""
    b = bytearray(blob)
    how = data.draw(st.sampled_from(["flip", "cut", "delete", "dup"]))
    at = data.draw(st.integers(0, len(b) - 1))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del b[at:]
    elif how == "delete":
        del b[at:at + data.draw(st.integers(1, 40))]
    else:
        b[at:at] = b[at:at + data.draw(st.integers(1, 40))]
    return bytes(b)


BLOBS = {dtype: portable.compress_bslz4(frame(96 * 96 + 5, dtype, 11)) for dtype in DTYPES}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupt_blobs_fail_cleanly_and_agree_with_dectris(data):
    """A corrupt blob decodes to False (never out of bounds: the output sits between guard
    bytes) or, where the change was harmless, to what dectris-compression decodes; and the
    `decompress` error is a DecodeError either way."""
    dtype = data.draw(st.sampled_from(DTYPES))
    size = np.dtype(dtype).itemsize
    bad = corrupted(BLOBS[dtype], data)
    n = (96 * 96 + 5) * size
    guarded = np.full(n + 64, 0xA5, np.uint8)
    out = guarded[32:32 + n]
    ok = decode(bad, out, size)
    assert (guarded[:32] == 0xA5).all() and (guarded[32 + n:] == 0xA5).all()
    try:
        want = compression.decompress("bslz4", size, bad, n)
    except DecodeError:
        want = None
    accepted = want is not None and len(want) == n
    if compression.dectris_decompress is not None and accepted and not any_zero_offset(bad, size):
        assert ok and out.tobytes() == want  # the C library's accepts are ours (but offset 0)
    if ok:
        assert want is None or want == out.tobytes()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_lz4_block_decoder_agrees_with_the_lz4_library(data):
    """Mutated LZ4 blocks: accepted exactly when `lz4.block.decompress` (the reference C
    decoder) accepts them at the declared size, with the same bytes; nothing written outside."""
    raw = frame(3000, "<u2", 5).tobytes()
    bad = np.frombuffer(corrupted(lz4.block.compress(raw, store_size=False), data), np.uint8)
    guarded = np.full(len(raw) + 64, 0xA5, np.uint8)
    ok = portable.lz4_block_into(bad, 0, len(bad), guarded, 32, 32 + len(raw))
    assert (guarded[:32] == 0xA5).all() and (guarded[32 + len(raw):] == 0xA5).all()
    try:
        want = lz4.block.decompress(bad.tobytes(), uncompressed_size=len(raw))
    except lz4.block.LZ4BlockError:
        want = None
    if want is not None and len(want) == len(raw) and not zero_offset(bad.tobytes()):
        assert ok and guarded[32:32 + len(raw)].tobytes() == want
    else:  # refused by the reference, or a match of offset 0 (it copies stale output bytes)
        assert not ok


def any_zero_offset(blob: bytes, element_size: int) -> bool:
    """Whether any LZ4 block of a bslz4 blob (12-byte header: size and block size; blocks with
    4-byte big-endian lengths; the last `size % 8` elements raw) holds a match of offset 0
    (see `zero_offset`)."""
    total, block = int.from_bytes(blob[:8], "big"), int.from_bytes(blob[8:12], "big")
    if not block:
        return False
    tail = total % block // (8 * element_size) * (8 * element_size)
    at = 12
    for _ in range(total // block + (tail > 0)):
        length = int.from_bytes(blob[at : at + 4], "big")
        if zero_offset(blob[at + 4 : at + 4 + length]):
            return True
        at += 4 + length
    return False


def zero_offset(block: bytes) -> bool:
    """Whether an LZ4 block (as far as it parses) holds a match of offset 0, which the
    reference decoder accepts, copying whatever the output buffer held; ours refuses it."""
    ip, n = 0, len(block)
    while ip < n:
        token, ip = block[ip], ip + 1
        length = token >> 4
        if length == 15:
            while ip < n:
                length, ip = length + block[ip], ip + 1
                if block[ip - 1] != 255:
                    break
        ip += length
        if ip + 2 > n:
            return False
        if block[ip] == block[ip + 1] == 0:
            return True
        ip += 2
        if token & 15 == 15:
            while ip < n and block[ip] == 255:
                ip += 1
            ip += 1
    return False


def test_bounds_checked_build_never_indexes_out_of_range():
    """The decoder compiled with numba's bounds checking: thousands of corrupt blobs raise no
    IndexError (an out-of-range read would, unchecked, read neighbouring memory)."""
    script = """
import numpy as np
from tcbf_live.detectors import bslz4
rng = np.random.default_rng(1)
f = rng.poisson(0.5, 96 * 96 + 5).astype("<u2")
blob = np.frombuffer(bslz4.compress_bslz4(f), np.uint8)
out = np.empty_like(f)
accepted = 0
for i in range(3000):
    bad = blob.copy()
    if i % 3 == 0:
        bad = bad[:rng.integers(0, len(bad))]
    else:
        bad[rng.integers(0, len(bad), rng.integers(1, 5))] = rng.integers(0, 256)
    accepted += bslz4.bslz4_into(bad, 0, len(bad), out, 2)
assert bslz4.bslz4_into(blob, 0, len(blob), out, 2) and np.array_equal(out, f)
print("ok", accepted)
"""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=tempfile.mkdtemp())
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_decode_errors_have_the_same_reasons_on_both_paths():
    f = frame(96 * 96, "<u2")
    blob = portable.compress_bslz4(f)
    n = f.nbytes
    cases = {b"": "truncated", blob[:8]: "truncated", blob[:-40]: "bad_payload",
             blob[:12] + b"\xff" * 4 + blob[16:]: "bad_payload",
             compression.HEADER.pack(n, 0) + blob[12:]: "bad_payload"}  # fmt: skip
    for bad, reason in cases.items():
        for decoder in (compression.decompress, portable_only):
            with pytest.raises(DecodeError) as err:
                decoder("bslz4", 2, bad, n)
            assert err.value.reason == reason
    with pytest.raises(DecodeError, match="size_mismatch"):
        compression.decompress("bslz4", 2, blob, n + 2)


def portable_only(algorithm: str, size: int, blob: bytes, n: int) -> bytes:
    """`decompress` as it runs without dectris-compression."""
    saved = compression.dectris_decompress
    compression.dectris_decompress = None
    try:
        return compression.decompress(algorithm, size, blob, n)
    finally:
        compression.dectris_decompress = saved


BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dectris", "bitshuffle"):
            raise ImportError(f"{name} blocked for this test")
sys.meta_path.insert(0, Blocker())
import pytest
from tcbf_live.detectors import compression
assert compression.BACKEND == compression.IN_KERNEL == "portable", compression.BACKEND
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_engine_works_without_the_c_libraries(tmp_path):
    """In a process where `dectris` and `bitshuffle` cannot be imported: the codec tests, and
    the DECTRIS engine runs (in-kernel and decoder bslz4, both protocols) give the native
    result. Numba's cache is the usual one: kernels compiled (here, by this suite's other
    tests) against the C library run unchanged on the portable decoder bound to its symbol."""
    tests = ["test_compression.py::test_real_eiger2_blob_decodes_identically",
             "test_compression.py::test_lz4_framing_decodes_like_dectris",
             "test_compression.py::test_decode_errors_have_the_same_reasons_on_both_paths",
             "test_dectris.py::test_pipeline_over_dectris_equals_the_native_result",
             "test_dectris.py::test_real_eiger2_capture_decodes_to_the_published_statistics",
             "test_dectris.py::test_v1_round_trip_every_encoding_and_any_part_boundaries"]
    argv = ["-q", "-p", "no:cacheprovider", "-x", "-c", str(ROOT / "pyproject.toml"),
            "--rootdir", str(ROOT), *(str(ROOT / "tests" / t) for t in tests)]
    # from a folder of its own: the checkout's root must not shadow an installed package
    done = subprocess.run([sys.executable, "-c", BLOCKER, *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout, done.stdout[-1000:]
