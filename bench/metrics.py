"""The papers' image metrics (docs/design.md, "How quality is judged"), so numbers compare.

Per 2-D slice along ``axis``: each slice is divided by its own max (prediction and
reference separately; a slice whose max is <= 0 becomes all 0), then

* PSNR = 10 log10(1 / MSE) dB (data range 1, as ``skimage.metrics.peak_signal_noise_ratio``
  with ``data_range=1``), **capped at** :data:`PSNR_CAP` dB: identical slices (MSE 0) score
  exactly the cap instead of +inf, so one perfect slice cannot turn a volume's mean into inf;
* SSIM = ``skimage.metrics.structural_similarity(ref, pred, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1)``; 1 for identical slices;

and the volume's score is the mean over slices. Empty reference slices (no voxel > 0 after
masking) are skipped, as the papers evaluate slices with anatomy only. With a mask, voxels
outside it are set to 0 in both volumes first and slices without mask voxels are skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from galip.runtime.errors import InputError

PSNR_CAP = 100.0          # dB; MSE 1e-10 on [0, 1] images
SSIM_SIGMA = 1.5
SSIM_WINDOW = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1   # skimage's Gaussian window (truncate 3.5): 11


def normalise(image: np.ndarray) -> np.ndarray:
    """``image / image.max()`` in float64; all 0 when the max is <= 0 (or not finite)."""
    image = np.asarray(image, np.float64)
    top = float(image.max()) if image.size else 0.0
    if not (np.isfinite(top) and top > 0.0):
        return np.zeros_like(image)
    return image / top


def psnr(pred: np.ndarray, ref: np.ndarray, cap: float = PSNR_CAP) -> float:
    """PSNR (dB, data range 1) of two normalised slices, capped at ``cap``."""
    mse = float(np.mean((np.asarray(pred, np.float64) - np.asarray(ref, np.float64)) ** 2))
    if mse <= 0.0:
        return cap
    return min(cap, 10.0 * math.log10(1.0 / mse))


def ssim(pred: np.ndarray, ref: np.ndarray) -> float:
    """SSIM of two normalised slices with the papers' settings (module docstring)."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(ref, pred, gaussian_weights=True, sigma=SSIM_SIGMA,
                                       use_sample_covariance=False, data_range=1.0))


@dataclass
class VolumeScore:
    """Mean (and std) PSNR/SSIM over the evaluated slices of one volume pair."""

    psnr: float
    ssim: float
    psnr_std: float
    ssim_std: float
    slices: int                              # evaluated
    skipped: int                             # empty reference (or mask) slices
    per_slice: list[dict] = field(default_factory=list)   # {"index", "psnr", "ssim"}

    def to_json(self) -> dict:
        return {"psnr": self.psnr, "ssim": self.ssim, "psnr_std": self.psnr_std, "ssim_std": self.ssim_std,
                "slices": self.slices, "skipped": self.skipped, "psnr_cap": PSNR_CAP, "per_slice": self.per_slice}


def evaluate(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, axis: int = 2,
             *, names: tuple[str, str] = ("prediction", "reference")) -> VolumeScore:
    """Score ``pred`` against ``ref`` (3-D arrays of one shape) slice by slice along ``axis``.

    Raises InputError (one line) for mismatched shapes, a bad axis, slices smaller than the
    SSIM window, or no non-empty reference slice.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputError(f"{names[0]} has shape {pred.shape} but {names[1]} has {ref.shape}; "
                         "compare volumes on the same grid (galip-run writes the input's grid)")
    if pred.ndim != 3:
        raise InputError(f"expected 3-D volumes, got {pred.ndim}-D arrays of shape {pred.shape}")
    if not -3 <= axis <= 2:
        raise InputError(f"--axis must be 0, 1 or 2, got {axis}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != ref.shape:
            raise InputError(f"mask has shape {mask.shape} but the volumes have {ref.shape}; "
                             "use the mask of the reference's grid")
        keep = mask > 0
        pred, ref = np.where(keep, pred, 0.0), np.where(keep, ref, 0.0)
    pred, ref = np.moveaxis(pred, axis, 0), np.moveaxis(ref, axis, 0)
    if min(ref.shape[1:]) < SSIM_WINDOW:
        raise InputError(f"slices of {ref.shape[1]}x{ref.shape[2]} voxels are smaller than the "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} Gaussian SSIM window; slice along another --axis")
    per_slice, skipped = [], 0
    for index in range(ref.shape[0]):
        r = np.asarray(ref[index], np.float64)
        if not np.any(r > 0):
            skipped += 1
            continue
        r, p = normalise(r), normalise(pred[index])
        per_slice.append({"index": index, "psnr": psnr(p, r), "ssim": ssim(p, r)})
    if not per_slice:
        raise InputError(f"{names[1]} has no non-empty slice along axis {axis} (every slice is <= 0"
                         f"{' inside the mask' if mask is not None else ''}); check the file or the mask")
    psnrs = np.array([s["psnr"] for s in per_slice])
    ssims = np.array([s["ssim"] for s in per_slice])
    return VolumeScore(float(psnrs.mean()), float(ssims.mean()), float(psnrs.std()), float(ssims.std()),
                       len(per_slice), skipped, per_slice)
