"""DECTRIS decode vs decode + accumulate, one core (issue: real detector protocols).

Target: accumulating adds <= 25 % on top of decoding, for ARINA-like 96x96 uint16 bslz4 frames;
also 192x192 and 512x512. Frames are pre-encoded stream-V2 messages (CBOR + bslz4) of Poisson
counts with a bright-field disk (radius 20 % of the detector); the same messages are decoded
alone (every frame decompressed into an array: the least any receiver does), then decoded and
fed to the accumulators (calibrated, all bin levels) the way the engine does it: bslz4 blobs
left compressed by the decoder and decompressed inside the accumulate kernel. For comparison,
"decoder bslz4" decodes first and stages the frames. Best of five interleaved runs.
Also compares the two bslz4 libraries on the same blobs.

Run: OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/decode_speed.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

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

    return {
        "size": size, "n": n, "decode_fps": n / t_dec, "both_fps": n / t_acc,
        "overhead": t_acc / t_dec - 1, "staged": t_staged / t_dec - 1,
        "dectris_us": best(with_dectris) / 16 * 1e6,
        "bitshuffle_us": best(with_bitshuffle) / 16 * 1e6,
    }  # fmt: skip


def main() -> None:
    print(f"in-kernel bslz4: {'yes' if native_bslz4() else 'no (decoder path)'}")
    print(f"{'frame':>9} {'frames':>7} {'decode f/s':>11} {'+accumulate f/s':>16} {'overhead':>9} "
          f"{'(decoder bslz4)':>16} {'bslz4 dectris us':>17} {'bitshuffle us':>14}")  # fmt: skip
    for size, n in ((96, 20_000), (192, 5_000), (512, 1_000)):
        r = bench(size, n)
        print(f"{size:>4}x{size:<4} {r['n']:>7} {r['decode_fps']:>11,.0f} "
              f"{r['both_fps']:>16,.0f} {r['overhead']:>8.0%} {r['staged']:>16.0%} "
              f"{r['dectris_us']:>17.1f} {r['bitshuffle_us']:>14.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
