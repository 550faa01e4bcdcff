"""A receive coil's smooth gain over the head, estimated and divided out before translation.

An MRI volume is its tissue contrast times a slowly varying bias field of the receive coil
(+-10-20 % across a head). The field belongs to the coil, not to the contrast, so a
subject's T1w, T2w and PDw share it: the right translation of a biased source is the
translation of the bias-free source, times the same field. A network that sees only a
window of the head cannot know the field's level there, so a bundle whose preprocessing
says ``bias_field: "n4"`` was trained on bias-free slices, and the runtime

    field = N4(source, inside the head mask)     SimpleITK's N4 (Tustison et al. 2010)
    translate(source / field) * field

Training (train/slices.py, train/i2i/prior.py) calls the same :func:`flatten`, so the field
a model learnt without is the one the runtime removes. CT has no such field: CT sources
are left as they are. SimpleITK is imported only when a bundle asks for N4.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError, InputError
from .foreground import head_mask
from .intensity import fit_intensity

BIAS_FIELDS = ("none", "n4")   # a bundle's preprocess.bias_field: keep the source, or divide N4's field out
N4_GRID_MM = 4.0               # the field is fitted on a grid about this coarse (it is smooth; a 2 mm
                               # volume shrinks 2x per axis, 8x fewer voxels; a 1 mm one 4x: 64x)
N4_ITERATIONS = (50, 50, 50)   # per fitting level (SimpleITK's default is 4 levels of 50)


def n4_field(volume: np.ndarray, mask: np.ndarray, voxel_mm: tuple[float, ...]) -> np.ndarray:
    """N4's estimate of ``volume``'s multiplicative bias field, fitted inside ``mask`` where
    the volume is positive on a grid of about ``N4_GRID_MM`` (``voxel_mm``: the voxel
    sizes of ``volume``'s axes), at full resolution: float32, > 0 everywhere. A single
    slice is fitted in 2-D; InputError (one line) where nothing can be fitted."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ConfigError("this bundle divides out the coil's bias field with N4, which needs SimpleITK; "
                          "pip install 'galip[cpu]' (or SimpleITK)") from None
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    fit = np.asarray(mask, bool) & (volume > 0)
    axes = [a for a in range(volume.ndim) if volume.shape[a] > 1]     # N4 cannot fit along a 1-voxel axis
    if len(axes) < 2 or fit.sum() < 8:
        raise InputError(f"a volume of {volume.shape} voxels with {int(fit.sum())} inside the head mask is too "
                         "little for the bundle's N4 bias-field fit; give a larger volume (or another --mask)")
    shape = [volume.shape[a] for a in axes]
    image = sitk.GetImageFromArray(volume.reshape(shape))
    fit_mask = sitk.GetImageFromArray(fit.reshape(shape).astype(np.uint8))
    # SimpleITK's index order is the array's reversed; every shrunk axis keeps >= 2 voxels
    shrink = [max(1, min(round(N4_GRID_MM / float(voxel_mm[a])), shape[k] // 2)) for k, a in enumerate(axes)][::-1]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    try:
        n4.Execute(sitk.Shrink(image, shrink), sitk.Shrink(fit_mask, shrink))
        log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image))
    except RuntimeError as error:                  # ITK's message: many lines, the reason near the end
        reason = " ".join(str(error).split())[-200:]
        raise InputError(f"N4 could not fit a bias field to this {volume.shape} volume: ...{reason}") from None
    return np.exp(log_field).reshape(volume.shape).astype(np.float32)


def flatten(data: np.ndarray, affine_mm: np.ndarray, kind: str, method: str, percentiles: tuple[float, float],
            mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(data / field, field)`` for an MRI under ``method="n4"``, the field fitted inside
    ``mask`` (default: the head mask the runtime's ``--mask auto`` uses); ``(data, None)``
    for ``"none"`` or a CT. ``affine_mm``: the volume's voxel-to-mm affine."""
    if method not in BIAS_FIELDS:
        raise ConfigError(f"bias_field must be one of {', '.join(BIAS_FIELDS)}, got {method!r}")
    if method == "none" or kind != "mri":
        return data, None
    data = np.asarray(data, np.float32)
    if mask is None:
        mask = head_mask(data, fit_intensity(data, kind, percentiles=tuple(percentiles)))
    field = n4_field(data, mask, tuple(np.linalg.norm(np.asarray(affine_mm)[:3, :3], axis=0)))
    return data / field, field
