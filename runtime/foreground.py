"""Where the head is: a foreground mask of the source volume, so that air stays air.

A slice-wise translator sees no difference between the air above a head and a very dark
slice of tissue, and a GAN generator may paint something into either. Outside the
subject there is nothing to translate, so the runtime keeps those voxels at the target's
background (0 for MRI, air for CT). The mask is found from the source alone with scipy:

1. normalise with the volume's own robust range and smooth (σ = 1 voxel), so Rician
   noise in the air does not pass the threshold;
2. threshold at ``THRESHOLD`` of that range (the noise floor of a magnitude image sits
   near 0 of it; every tissue but bone sits well above);
3. close small gaps, fill holes slice by slice along every axis (the dark skull and
   sinuses lie inside the head; a 3-D fill fails where the head leaves the field of
   view), keep the largest connected component, grow it by ``MARGIN`` voxels.

Functions over plain ``(X, Y, Z)`` arrays in the input's voxel order; numpy + scipy only.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import InputError
from .intensity import IntensityMap, normalize

THRESHOLD = 0.08   # of the source's [0.5, 99.5] percentile range
MARGIN = 1         # voxel added around the head (with the smoothing, ~2-3 voxels in all), so edges are kept


def head_mask(data: np.ndarray, source_map: IntensityMap) -> np.ndarray:
    """Boolean ``(X, Y, Z)`` foreground of ``data`` (scanner units, ``source_map`` its range).

    Always non-empty for a volume with signal; where nothing passes the threshold the
    whole volume counts as foreground (nothing is blanked that might be tissue).
    """
    smooth = ndimage.gaussian_filter(normalize(data, source_map, clip=True), 1.0)
    mask = smooth > THRESHOLD
    if not mask.any():
        return np.ones(data.shape, dtype=bool)
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0) | mask
    for axis in range(mask.ndim):
        mask = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)], axis=axis)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == 1 + int(np.argmax(sizes))
    return ndimage.binary_dilation(mask, iterations=MARGIN)


def mask_from_file(data: np.ndarray, shape: tuple[int, ...], source: str) -> np.ndarray:
    """A user's mask volume (nonzero = foreground) checked against the input's ``shape``."""
    data = np.asarray(data)
    if data.shape != tuple(shape):
        raise InputError(f"--mask {source}: expected a mask on the input's grid {tuple(shape)}, found "
                         f"{data.shape}; resample it onto the input first")
    mask = np.isfinite(data) & (data != 0)
    if not mask.any():
        raise InputError(f"--mask {source}: the mask is empty (no nonzero voxel); pass a mask of the head, "
                         "or --mask auto")
    return mask
