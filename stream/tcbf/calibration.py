"""Detector calibration from the data: mean pattern, BF disk, centre, radius, masked pixels.

Pure numerics: frames in, a frozen `Calibration` out. The BF disk is the set of unmasked pixels
whose mean-pattern value is at least `threshold` x the disk plateau (default 0.5, the tcBF
tutorial's choice; py4DSTEM uses 0.8, which drops the soft aperture edge). The plateau is the
maximum of the 3x3-median-filtered mean pattern, so isolated hot pixels cannot set it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import scipy.ndimage as ndi

from tcbf_live.stream.tcbf.descan_compensation import Drift, steady

DEFAULT_BF_THRESHOLD = 0.5


class CalibrationError(ValueError):
    """The data do not show a usable bright-field disk."""


@dataclass(frozen=True)
class Calibration:
    """Where the BF disk is and which detector pixels to use (detector (row, col) pixels)."""

    detector_shape: tuple[int, int]
    center_px: tuple[float, float]  # intensity-weighted centroid of the BF pixels
    radius_px: float  # sqrt(BF area / pi)
    bf_pixels: np.ndarray  # (N_bf, 2) int32 (row, col), row-major order
    mask: np.ndarray  # (Qx, Qy) bool, True = excluded everywhere (dead/hot/supplied)
    mean_pattern: np.ndarray  # (Qx, Qy) float32, masked pixels 0
    threshold: float = DEFAULT_BF_THRESHOLD
    angular_sampling_mrad: float | None = None
    hot_pixels: int = 0  # found persistently far above all their neighbours (masked)
    dead_pixels: int = 0  # found persistently far below all their neighbours (masked)
    whole_counts: bool = True  # the frames held whole numbers (False: float intensities)
    # the disk's drift over the calibration frames, when significant (their mean pattern is
    # then taken with the disks realigned: `descan_compensation.calibration_drift`)
    drift: Drift | None = None

    @property
    def n_bf(self) -> int:
        return int(self.bf_pixels.shape[0])

    @property
    def bf_flat_index(self) -> np.ndarray:
        return (self.bf_pixels[:, 0] * self.detector_shape[1] + self.bf_pixels[:, 1]).astype(
            np.int32
        )

    @property
    def masked_flat_index(self) -> np.ndarray:
        return np.flatnonzero(self.mask.ravel()).astype(np.int32)

    def excluding(self, pixels: np.ndarray) -> Calibration:
        """This calibration with `pixels` (bool, detector shape) excluded too: masked, and no
        longer BF pixels (e.g. a detector's pixel mask applied to a calibration from a file)."""
        flagged = np.asarray(pixels, bool)
        keep = ~flagged[self.bf_pixels[:, 0], self.bf_pixels[:, 1]]
        return replace(self, mask=self.mask | flagged, bf_pixels=self.bf_pixels[keep])

    def to_dict(self) -> dict:
        """JSON form for a calibration file (mean pattern and mask as nested lists)."""
        return {
            "detector_shape": list(self.detector_shape),
            "center_px": list(self.center_px),
            "radius_px": self.radius_px,
            "threshold": self.threshold,
            "angular_sampling_mrad": self.angular_sampling_mrad,
            "masked_pixels": np.argwhere(self.mask).tolist(),
            "bf_pixels": self.bf_pixels.tolist(),
        }

    def to_json(self) -> str:
        """The text of a calibration file (`--calibration FILE`; the core writes no files)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str, detector_shape: tuple[int, int] | None = None) -> Calibration:
        """A calibration from the text of a calibration file (BF pixels, centre, radius, mask)."""
        d = json.loads(text)
        shape = tuple(d["detector_shape"])
        if detector_shape is not None and tuple(detector_shape) != shape:
            raise CalibrationError(
                f"calibration is for a {shape} detector, data are {detector_shape}"
            )
        mask = np.zeros(shape, bool)
        masked = np.asarray(d.get("masked_pixels", []), dtype=np.int64).reshape(-1, 2)
        mask[masked[:, 0], masked[:, 1]] = True
        return cls(
            detector_shape=shape,
            center_px=tuple(d["center_px"]),
            radius_px=float(d["radius_px"]),
            bf_pixels=np.asarray(d["bf_pixels"], dtype=np.int32).reshape(-1, 2),
            mask=mask,
            mean_pattern=np.zeros(shape, np.float32),
            threshold=float(d.get("threshold", DEFAULT_BF_THRESHOLD)),
            angular_sampling_mrad=d.get("angular_sampling_mrad"),
        )


HOT_DEAD_SIGMA = 8.0  # Poisson sigmas of the mean pattern beyond every neighbour ...
HOT_DEAD_FRACTION = 0.5  # ... and at least this fraction of the neighbours' level


def hot_and_dead(mean: np.ndarray, usable: np.ndarray, n_frames: int,
                 counts_per_electron: float = 1.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Persistent hot and dead pixels of a mean pattern (counts per frame over `n_frames`):
    a pixel above the *largest* (below the *smallest*) of its 8 usable neighbours by more than
    HOT_DEAD_SIGMA Poisson sigmas of that neighbour's mean and by HOT_DEAD_FRACTION of its
    level. Comparing with the extreme neighbour keeps the disk's edge (where a pixel differs
    from some neighbours but not from all) from being flagged."""
    big = np.finfo(np.float64).max
    lo = np.where(usable, mean, big)
    hi = np.where(usable, mean, -big)
    fp = np.ones((3, 3), bool)
    fp[1, 1] = False
    nb_max = ndi.maximum_filter(hi, footprint=fp, mode="constant", cval=-big)
    nb_min = ndi.minimum_filter(lo, footprint=fp, mode="constant", cval=big)
    gain = counts_per_electron if counts_per_electron > 0 else 1.0
    n = max(n_frames, 1)

    def sigma(level):
        return np.sqrt(gain * np.maximum(level, gain / n) / n)  # at least one electron

    with np.errstate(invalid="ignore", over="ignore"):
        hot = (
            usable
            & (nb_max > -big)
            & (
                mean - nb_max
                > np.maximum(
                    HOT_DEAD_SIGMA * sigma(nb_max), HOT_DEAD_FRACTION * np.maximum(nb_max, 0)
                )
            )
        )
        dead = usable & (nb_min < big) & (nb_min > 0) & (nb_min - mean > np.maximum(
            HOT_DEAD_SIGMA * sigma(nb_min), HOT_DEAD_FRACTION * nb_min))  # fmt: skip
    return hot, dead


def typical_frames(frames: np.ndarray) -> np.ndarray:
    """Which calibration frames (bool, (N,)) to keep: not the anomalous ones (a blank frame, a
    flat frame, one with a zinger): frames whose total is more than HOT_DEAD_SIGMA robust
    sigmas (1.4826 MAD, floored by the Poisson width) from the median total. One 60,000-count
    pixel in 64 frames would otherwise raise that pixel's mean ~900 counts and mark it
    persistently hot, and pull the disk centre. At least half the frames are always kept."""
    n = frames.shape[0]
    if n < 8:
        return np.ones(n, bool)
    flat = frames.reshape(n, -1)
    totals = (np.where(np.isfinite(flat), flat, 0) if flat.dtype.kind == "f" else flat).sum(
        axis=1, dtype=np.float64)  # fmt: skip
    med = float(np.median(totals))
    scale = max(1.4826 * float(np.median(np.abs(totals - med))), np.sqrt(max(med, 1.0)))
    keep = np.abs(totals - med) <= HOT_DEAD_SIGMA * scale
    return keep if keep.sum() >= n // 2 else np.ones(n, bool)


def calibrate(
    frames: np.ndarray,
    mask_value: int | None = None,
    supplied_mask: np.ndarray | None = None,
    threshold: float = DEFAULT_BF_THRESHOLD,
    semiangle_mrad: float | None = None,
    angular_sampling_mrad: float | None = None,
    counts_per_electron: float = 1.0,
    positions: np.ndarray | None = None,
) -> Calibration:
    """Calibrate from frames (N, Qx, Qy) (at scan `positions` (N, 2) row, col, when known:
    a disk drifting over them is measured and the frames realigned before they are averaged,
    so the drift neither blurs the disk nor inflates its radius).

    Masked pixels: those carrying `mask_value` in most frames, plus `supplied_mask`, plus
    persistent hot and dead pixels found in the mean pattern (`hot_and_dead`), plus pixels
    non-finite in any calibration frame (float frames).
    Anomalous frames are left out (`typical_frames`), as are single `mask_value` (overload)
    values. The angular sampling is taken as given, else derived as semiangle / radius when the
    semiangle is known.
    """
    if frames.ndim != 3 or frames.shape[0] < 1:
        raise CalibrationError(f"need frames (N, Qx, Qy), got shape {frames.shape}")
    if not 0 < threshold < 1:
        raise CalibrationError(f"BF threshold must be in (0, 1), got {threshold}")
    shape = (int(frames.shape[1]), int(frames.shape[2]))
    mask = np.zeros(shape, bool) if supplied_mask is None else np.asarray(supplied_mask, bool)
    if mask.shape != shape:
        raise CalibrationError(f"mask shape {mask.shape} != detector {shape}")
    if mask_value is not None:  # masked pixels carry it always; an overload only now and then
        mask = mask | (np.mean(frames == mask_value, axis=0) > 0.5)
        frames = (
            np.where(frames == mask_value, 0, frames) if np.any(frames == mask_value) else frames
        )
    keep = typical_frames(frames)
    frames = frames[keep]
    drift = None if positions is None else steady(frames, mask, np.asarray(positions)[keep])
    if drift is not None:
        frames, drift = drift
    if frames.dtype.kind == "f":
        finite = np.isfinite(frames)
        count = finite.sum(axis=0)
        mean = np.where(finite, frames, 0).sum(axis=0, dtype=np.float64) / np.maximum(count, 1)
        mask = mask | (count < frames.shape[0])  # non-finite in any: not to be trusted
    else:
        mean = frames.mean(axis=0, dtype=np.float64)
    hot, dead = hot_and_dead(mean, ~mask, frames.shape[0], counts_per_electron)
    mask = mask | hot | dead
    mean[mask] = 0.0
    plateau = float(ndi.median_filter(mean, size=3).max())
    if not plateau > 0:
        raise CalibrationError("mean diffraction pattern is empty: no BF disk")
    bf = (mean >= threshold * plateau) & ~mask
    # keep the largest connected region: the disk, not stray bright pixels
    labels, n = ndi.label(bf)
    if n > 1:
        sizes = ndi.sum(bf, labels, index=np.arange(1, n + 1))
        bf = labels == (1 + int(np.argmax(sizes)))
    pixels = np.argwhere(bf).astype(np.int32)
    if pixels.shape[0] < 4:
        raise CalibrationError(f"BF disk has only {pixels.shape[0]} pixels")
    weights = mean[bf]
    center = tuple(float(c) for c in (pixels * weights[:, None]).sum(axis=0) / weights.sum())
    radius = float(np.sqrt(pixels.shape[0] / np.pi))
    if angular_sampling_mrad is None and semiangle_mrad is not None:
        angular_sampling_mrad = semiangle_mrad / radius
    return Calibration(
        detector_shape=shape,
        center_px=center,  # type: ignore[arg-type]
        radius_px=radius,
        bf_pixels=pixels,
        mask=mask,
        mean_pattern=mean.astype(np.float32),
        threshold=threshold,
        angular_sampling_mrad=angular_sampling_mrad,
        hot_pixels=int(hot.sum()),
        dead_pixels=int(dead.sum()),
        whole_counts=frames.dtype.kind != "f" or bool(np.all(np.mod(frames[finite], 1) == 0)),
        drift=drift,
    )
