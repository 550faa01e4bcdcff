"""Failure checks beyond PSNR/SSIM: contrast separation, background hallucination, stripes.

All take ``(X, Y, Z)`` volumes on one grid and a bool brain mask; intensities are compared
after dividing each volume by its own brain 99th percentile (:func:`brain_scale`), so the
output's units (the source's, for MRI targets) do not matter.

* **Contrast separation**: Pearson r inside the brain between the outputs for two targets of
  one source, beside the same r between the true targets. A target-blind model gives
  r near 1 where the truths differ (phantom T2 vs PD: 0.2 to 0.5).
* **Background hallucination**: the share of background voxels the output turns *on*
  (above ON_FRACTION of its brain 99th percentile). Background = outside the head, a
  margin of BACKGROUND_MARGIN voxels away from it (blur across the head's edge is not
  invention).
* **Stripes**: slice-to-slice steps (mean |v[k+1] − v[k]| over the whole plane) along each
  axis, output against truth. A 2-D model translates slices independently, so its
  inconsistencies show only along the slicing axis; blur or noise shows along every axis.
  The *stripe score* is the through-plane ratio over the mean in-plane ratio: 1 for the
  truth itself or any isotropic change, clearly above 1 for stripes. A *stripe slice* is
  a step whose output exceeds STRIPE_FACTOR times what the truth's steps there predict (the
  largest within STRIPE_REACH steps, scaled by the in-plane ratio) plus STRIPE_FLOOR.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

FOREGROUND_SIGMA = 1.0       # voxels: Gaussian smoothing before the threshold (noise)
FOREGROUND_FRACTION = 0.10   # threshold: this share of the smoothed volume's 99th percentile
FOREGROUND_CLOSING = 2       # voxels: closing iterations that bridge thin dark gaps
ON_FRACTION = 0.10       # "on": above 10 % of the volume's brain 99th percentile
BACKGROUND_MARGIN = 2    # voxels between the head and the background counted
STRIPE_FACTOR = 2.0      # a stripe step is more than twice the expected step ...
STRIPE_FLOOR = 0.01      # ... plus 1 % of the brain 99th percentile (noise-level steps)
STRIPE_REACH = 2         # slices: the expected step is the truth's largest this close


def source_foreground(volume: np.ndarray) -> np.ndarray:
    """Bool mask of the object in ``volume`` (X, Y, Z), for data without a head mask: smoothed
    (sigma FOREGROUND_SIGMA voxels), above FOREGROUND_FRACTION of its 99th percentile, closed
    and hole-filled. All False when the volume has no positive signal."""
    smooth = ndimage.gaussian_filter(np.asarray(volume, np.float32), FOREGROUND_SIGMA)
    top = float(np.percentile(smooth, 99))
    if not (np.isfinite(top) and top > 0):
        return np.zeros(smooth.shape, bool)
    mask = smooth > FOREGROUND_FRACTION * top
    mask = ndimage.binary_closing(mask, iterations=FOREGROUND_CLOSING, border_value=0) | mask
    return ndimage.binary_fill_holes(mask)


def brain_scale(volume: np.ndarray, brain: np.ndarray) -> float:
    """The 99th percentile of ``volume`` inside ``brain``; 1 when that is not positive."""
    top = float(np.percentile(volume[brain], 99)) if brain.any() else 0.0
    return top if np.isfinite(top) and top > 0 else 1.0


def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` over ``mask``; 0 when either is constant there."""
    x, y = np.asarray(a, np.float64)[mask], np.asarray(b, np.float64)[mask]
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def background_mask(source: np.ndarray, head: np.ndarray | None = None) -> np.ndarray:
    """Voxels at least BACKGROUND_MARGIN voxels outside the head: the ``head`` mask when
    given (a phantom's ``sub-XXX_head.nii.gz``), else the source's own foreground."""
    inside = np.asarray(head) > 0 if head is not None else source_foreground(source)
    return ~ndimage.binary_dilation(inside, iterations=BACKGROUND_MARGIN)


def hallucination(output: np.ndarray, background: np.ndarray, brain: np.ndarray) -> float:
    """Share of ``background`` voxels where ``output`` > ON_FRACTION of its brain 99th percentile."""
    if not background.any():
        return 0.0
    on = np.asarray(output, np.float32) > ON_FRACTION * brain_scale(output, brain)
    return float(on[background].mean())


def slice_steps(volume: np.ndarray, axis: int) -> np.ndarray:
    """Mean absolute difference between neighbouring slices along ``axis``: shape (n − 1,)."""
    v = np.moveaxis(np.asarray(volume, np.float32), axis, 0)
    return np.abs(np.diff(v, axis=0)).mean(axis=(1, 2))


@dataclass
class StripeScore:
    """Through-plane consistency of an output against its truth."""

    score: float                 # through-plane ratio / mean in-plane ratio; ~1 when clean
    ratios: list[float]          # per axis: mean output step / mean truth step
    stripe_slices: list[int]     # k: the step between slices k and k + 1 along the slicing axis
    axis: int

    def to_json(self) -> dict:
        return asdict(self)


def stripes(output: np.ndarray, truth: np.ndarray, brain: np.ndarray, axis: int) -> StripeScore:
    """Stripe score and stripe slices of ``output`` along the slicing ``axis`` (module docstring)."""
    out = np.asarray(output, np.float32) / brain_scale(output, brain)
    ref = np.asarray(truth, np.float32) / brain_scale(truth, brain)
    steps = {a: (slice_steps(out, a), slice_steps(ref, a)) for a in range(3) if out.shape[a] > 1}
    if axis not in steps:
        return StripeScore(1.0, [1.0, 1.0, 1.0], [], axis)
    ratios = [1.0, 1.0, 1.0]                 # an axis of one slice (or an empty truth) says nothing
    for a, (out_steps, ref_steps) in steps.items():
        if ref_steps.mean() > 0:
            ratios[a] = float(out_steps.mean() / ref_steps.mean())
    inplane = [ratios[a] for a in steps if a != axis] or [1.0]
    expected_scale = float(np.mean(inplane))
    score = ratios[axis] / expected_scale if expected_scale > 0 else float("inf")
    out_steps, ref_steps = steps[axis]
    # The truth's largest step within STRIPE_REACH slices: an edge blurred across a slice or two is no stripe.
    nearby = ndimage.maximum_filter1d(ref_steps, 2 * STRIPE_REACH + 1, mode="nearest")
    limit = STRIPE_FACTOR * expected_scale * nearby + STRIPE_FLOOR
    return StripeScore(float(score), ratios, [int(k) for k in np.flatnonzero(out_steps > limit)], axis)
