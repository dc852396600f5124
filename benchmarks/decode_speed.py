"""DECTRIS decode vs decode + accumulate, one core (issue: real detector protocols).

Target: accumulating adds <= 25 % on top of decoding, for ARINA-like 96x96 uint16 bslz4 frames;
also 192x192 and 512x512. Frames are pre-encoded stream-V2 messages (CBOR + bslz4) of Poisson
counts with a bright-field disk (radius 20 % of the detector); the same messages are decoded
alone (every frame decompressed into an array: the least any receiver does), then decoded and
fed to the accumulators (calibrated, all bin levels) the way the engine does it: bslz4 blobs
left compressed by the decoder and decompressed inside the accumulate kernel. For comparison,
"decoder bslz4" decodes first and stages the frames. Best of five interleaved runs.
Also compares the two bslz4 libraries on the same blobs, and the C path (dectris-compression
decode, bitshuffle encode) with the portable numba codec (`detectors/bslz4.py`, used where the C
libraries are not installed) on 96x96 and 192x192 uint16 frames, with their ratios.

Run: OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/decode_speed.py [--codecs|--portable]
(`--codecs`: only the codec table; `--portable`: the engine table with the C libraries made
unimportable, as in an install without the `fast` extra)
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")


class _BlockCLibraries:
    """`--portable`: make dectris-compression and bitshuffle unimportable, as without `fast`."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dectris", "bitshuffle"):
            raise ImportError(f"{name} blocked (--portable)")


if "--portable" in sys.argv[1:]:
    sys.meta_path.insert(0, _BlockCLibraries())

import numpy as np  # noqa: E402

from tcbf_live.detectors import bslz4 as portable  # noqa: E402
from tcbf_live.detectors import compression  # noqa: E402
from tcbf_live.detectors.base import SeriesInfo  # noqa: E402
from tcbf_live.detectors.compression import compress_bslz4, native_bslz4  # noqa: E402
from tcbf_live.detectors.dectris_v2 import DectrisV2Decoder  # noqa: E402
from tcbf_live.detectors.dectris_v2_encoder import encode_image, encode_start  # noqa: E402
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor  # noqa: E402


def frames_for(size: int, n: int, rng) -> np.ndarray:
    r = np.hypot(*np.mgrid[:size, :size] - size / 2)
    mean = np.where(r < 0.2 * size, 3.0, 0.02)  # ~3 counts per BF pixel, sparse dark field
    return rng.poisson(mean, (n, size, size)).astype(np.uint16)


def best(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(size: int, n: int) -> dict:
    rng = np.random.default_rng(size)
    pool = frames_for(size, 64, rng)
    scan = (n // 100, 100)
    info = SeriesInfo(1, scan, (size, size), "<u2", frames_expected=n, mask_value=65535)
    start = encode_start(info)
    msgs = [encode_image(1, i, pool[i % 64])[0] for i in range(n)]

    def decode_only():
        dec = DectrisV2Decoder()
        dec.decode(start)
        for m in msgs:
            dec.decode([m])

    def decode_accumulate(in_kernel=True):
        dec = DectrisV2Decoder()
        dec.defer_bslz4 = in_kernel and native_bslz4()
        proc = SeriesProcessor(dec.decode(start).info, ProcessingSettings(calibration_frames=64))
        batch = []
        for m in msgs:
            batch.append(dec.decode([m]))
            if len(batch) == 32:  # the engine hands over what it drained (<= 64 messages)
                proc.add_many(batch)
                batch = []
        proc.add_many(batch)
        assert proc.frames_received == n

    def staged():
        decode_accumulate(False)

    decode_accumulate(), staged()  # numba compile, calibration path
    t_dec = t_acc = t_staged = np.inf
    for _ in range(5):  # interleaved, so a noisy neighbour hits all alike
        t_dec = min(t_dec, best(decode_only, 1))
        t_acc = min(t_acc, best(decode_accumulate, 1))
        t_staged = min(t_staged, best(staged, 1))

    blobs = [compress_bslz4(f) for f in pool[:16]]

    def with_dectris():
        from dectris.compression import decompress

        for b in blobs:
            decompress(b, "bslz4", elem_size=2)

    def with_bitshuffle():
        import bitshuffle

        for b in blobs:
            bitshuffle.decompress_lz4(np.frombuffer(b[12:], np.uint8), (size * size,),
                                      np.dtype("u2"), 4096)  # fmt: skip

    fast = compression.BACKEND != "portable"
    return {
        "size": size, "n": n, "decode_fps": n / t_dec, "both_fps": n / t_acc,
        "overhead": t_acc / t_dec - 1, "staged": t_staged / t_dec - 1,
        "dectris_us": best(with_dectris) / 16 * 1e6 if fast else np.nan,
        "bitshuffle_us": best(with_bitshuffle) / 16 * 1e6 if fast else np.nan,
    }  # fmt: skip


def codecs(size: int, repeats: int = 7) -> dict:
    """us per frame: the C path vs the portable codec, decode (into a preallocated frame, as the
    kernel does, and to bytes, as `decompress` does) and encode, on the same 16 frames."""
    import bitshuffle
    from dectris.compression import decompress

    pool = frames_for(size, 16, np.random.default_rng(size))
    blobs = [np.frombuffer(compress_bslz4(f), np.uint8) for f in pool]
    out = np.empty(size * size, np.uint16)
    assert all(portable.bslz4_into(b, 0, len(b), out, 2) for b in blobs)  # compiled, correct
    header = portable.HEADER.pack(size * size * 2, 8192)

    cases = {
        "decode C": lambda: [decompress(b, "bslz4", elem_size=2) for b in blobs],
        "decode portable": lambda: [portable.bslz4_into(b, 0, len(b), out, 2) for b in blobs],
        "decode portable bytes": lambda: [
            compression.decompress_portable("bslz4", 2, memoryview(b), out.nbytes)
            for b in blobs],
        "encode C": lambda: [header + bitshuffle.compress_lz4(f.ravel(), 4096).tobytes()
                             for f in pool],
        "encode portable": lambda: [portable.compress_bslz4(f) for f in pool],
    }  # fmt: skip
    return {name: best(fn, repeats) / len(pool) * 1e6 for name, fn in cases.items()}


def print_codecs() -> None:
    print(f"{'frame':>9} {'decode C us':>12} {'portable us':>12} {'(to bytes)':>11} "
          f"{'ratio':>6} {'encode C us':>12} {'portable us':>12} {'ratio':>6}")  # fmt: skip
    for size in (96, 192):
        r = min((codecs(size) for _ in range(3)), key=lambda r: r["decode portable"])
        print(f"{size:>4}x{size:<4} {r['decode C']:>12.1f} {r['decode portable']:>12.1f} "
              f"{r['decode portable bytes']:>11.1f} "
              f"{r['decode portable'] / r['decode C']:>6.1f} {r['encode C']:>12.1f} "
              f"{r['encode portable']:>12.1f} {r['encode portable'] / r['encode C']:>6.1f}")


def main() -> None:
    if compression.BACKEND == "portable":  # run without the `fast` extra: nothing to compare
        print("C libraries not installed: the engine table below uses the portable codec")
    else:
        print_codecs()
    if "--codecs" in sys.argv[1:]:
        return
    print(f"in-kernel bslz4: {'yes' if native_bslz4() else 'no (decoder path)'} "
          f"({compression.IN_KERNEL})")
    print(f"{'frame':>9} {'frames':>7} {'decode f/s':>11} {'+accumulate f/s':>16} {'overhead':>9} "
          f"{'(decoder bslz4)':>16} {'bslz4 dectris us':>17} {'bitshuffle us':>14}")  # fmt: skip
    for size, n in ((96, 20_000), (192, 5_000), (512, 1_000)):
        r = bench(size, n)
        print(f"{size:>4}x{size:<4} {r['n']:>7} {r['decode_fps']:>11,.0f} "
              f"{r['both_fps']:>16,.0f} {r['overhead']:>8.0%} {r['staged']:>16.0%} "
              f"{r['dectris_us']:>17.1f} {r['bitshuffle_us']:>14.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
