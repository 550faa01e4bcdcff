"""Volume geometry as plain functions over ``(array, affine)``; numpy, nibabel, scipy only.

The translation path, every step undone in reverse order by its partner::

    to_canonical      (X, Y, Z) any orientation   -> RAS+ array        from_canonical
    volume2slices     (X, Y, Z)                   -> (n, H, W) stack   slices2volume
    resample_slices   (n, H, W) at ``spacing``    -> (n, H', W')       restore_slices
    pad_to_multiple   (n, H', W')                 -> (n, H'', W'')     crop_to_record

Every function returns new arrays (never a view of its input) and never modifies its input.
Records are small frozen dataclasses that hold exactly what the inverse needs. Bad
arguments (wrong ``ndim``, an axis out of range, a shape that does not match a record)
are programming errors and raise ``ValueError``; a degenerate affine read from a file is
the user's and raises :class:`~galip.runtime.errors.InputError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from nibabel import orientations
from scipy import ndimage

from .errors import InputError

#: Relative tolerance under which a spacing counts as equal to the target (no resampling).
SPACING_RTOL = 1e-6


# --- orientation ----------------------------------------------------------------------

def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder and flip the voxel axes of ``data`` so that they run closest to RAS+.

    Parameters
    ----------
    data : (X, Y, Z[, ...]) array, any dtype
    affine : (4, 4) voxel-to-world affine of ``data``

    Returns
    -------
    data_c : C-contiguous copy of ``data`` with axes permuted and flipped (same dtype)
    affine_c : (4, 4) float64 affine of ``data_c`` (same world positions as ``affine``)
    ornt : (3, 2) nibabel orientation of ``data``'s axes; give it to :func:`from_canonical`
    """
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim < 3 or affine.shape != (4, 4):
        raise ValueError(f"expected data with ndim >= 3 and a 4x4 affine, got shapes {data.shape} and {affine.shape}")
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        raise InputError(
            f"expected an affine with three independent voxel axes, found a degenerate one "
            f"(columns {np.round(affine[:3, :3], 4).tolist()}); fix the file's qform/sform"
        )
    data_c = np.array(orientations.apply_orientation(data, ornt), order="C", copy=True)
    affine_c = affine @ orientations.inv_ornt_aff(ornt, data.shape[:3])
    return data_c, affine_c, ornt


def voxel_axis(affine: np.ndarray, world_axis: int) -> int:
    """The voxel axis of ``affine`` that runs closest to world (RAS) axis ``world_axis``
    (0 x / left-right, 1 y, 2 z); it becomes axis ``world_axis`` of :func:`to_canonical`."""
    ornt = orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return int(np.flatnonzero(ornt[:, 0] == _check_axis(world_axis))[0])


def canonical_slices(affine: np.ndarray, shape: tuple[int, ...], world_axis: int,
                     span: tuple[int, int] | None = None, keep: np.ndarray | None = None) -> np.ndarray:
    """Indices of the canonical slices along ``world_axis`` of a volume of ``shape`` on
    ``affine`` to translate, ascending: all, or the input's voxel slab ``span`` = [a, b), and
    of those only the ones where the boolean input-grid mask ``keep`` has a voxel.
    Canonical index c is voxel index c, or n − 1 − c where :func:`to_canonical` flips the axis."""
    ornt = orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    axis = int(np.flatnonzero(ornt[:, 0] == _check_axis(world_axis))[0])
    n, flipped = shape[axis], ornt[axis, 1] < 0
    first, last = span if span else (0, n)
    if flipped:
        first, last = n - last, n - first
    indices = np.arange(first, last)
    if keep is not None:
        occupied = np.asarray(keep).any(axis=tuple(a for a in range(3) if a != axis))   # per voxel slice
        occupied = occupied[::-1] if flipped else occupied                               # per canonical slice
        indices = indices[occupied[first:last]]
    return indices


def from_canonical(data_c: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Exactly undo :func:`to_canonical`: return ``data_c`` in the original voxel order.

    Parameters
    ----------
    data_c : (X', Y', Z'[, ...]) array in RAS+ voxel order
    ornt : (3, 2) orientation returned by :func:`to_canonical`

    Returns
    -------
    data : C-contiguous array in the original voxel order (same dtype). Its affine is the
        original one, which the caller kept.
    """
    ornt = np.asarray(ornt)
    if ornt.shape != (3, 2) or data_c.ndim < 3:
        raise ValueError(f"expected a (3, 2) orientation and data with ndim >= 3, got {ornt.shape} and {data_c.shape}")
    # to_canonical sent input axis i to output axis ornt[i, 0], flipped if ornt[i, 1] == -1.
    inverse = np.empty_like(ornt, dtype=np.float64)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = (axis, flip)
    return np.array(orientations.apply_orientation(data_c, inverse), order="C", copy=True)


# --- slicing ----------------------------------------------------------------------------

def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"expected a slicing axis 0, 1 or 2, got {axis!r}")
    return int(axis)


def volume2slices(data: np.ndarray, axis: int) -> np.ndarray:
    """Cut a 3-D volume into a stack of 2-D slices along ``axis``.

    ``data`` (X, Y, Z) -> (n, H, W) C-contiguous copy, ``n = data.shape[axis]`` and
    (H, W) the two remaining axes in their original order. Dtype is kept.
    """
    axis = _check_axis(axis)
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {data.shape}")
    return np.array(np.moveaxis(data, axis, 0), order="C", copy=True)


def slices2volume(stack: np.ndarray, axis: int) -> np.ndarray:
    """Exact inverse of :func:`volume2slices`: (n, H, W) -> 3-D volume, dtype kept."""
    axis = _check_axis(axis)
    if stack.ndim != 3:
        raise ValueError(f"expected an (n, H, W) stack, got shape {stack.shape}")
    return np.array(np.moveaxis(stack, 0, axis), order="C", copy=True)


def inplane_spacing(affine: np.ndarray, axis: int) -> tuple[float, float]:
    """Voxel sizes (mm) of the two in-plane axes when slicing along ``axis``.

    Taken from the norms of the affine's first three columns, so they are right for
    oblique affines too. Returns ``(spacing_H, spacing_W)`` matching :func:`volume2slices`.
    """
    axis = _check_axis(axis)
    zooms = np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
    h, w = (zooms[a] for a in range(3) if a != axis)
    return float(h), float(w)


# --- in-plane resampling -----------------------------------------------------------------

@dataclass(frozen=True)
class ResampleRecord:
    """What :func:`restore_slices` needs to return a stack to its original grid."""

    in_shape: tuple[int, int]            # (H, W) before resampling
    out_shape: tuple[int, int]           # (H', W') after resampling
    spacing: tuple[float, float]         # input in-plane spacing (mm)
    target_spacing: tuple[float, float]  # output in-plane spacing (mm), exact
    order: int                           # spline order used both ways
    anti_alias: bool                     # Gaussian pre-filter before any downsampling


def _same_spacing(s: float, t: float) -> bool:
    return abs(s - t) <= SPACING_RTOL * t


def _resample_stack(stack: np.ndarray, scale: tuple[float, float], offset: tuple[float, float],
                    out_shape: tuple[int, int], order: int, sigma: tuple[float, float]) -> np.ndarray:
    """Resample each slice: input index = scale * output index + offset (per axis)."""
    dtype = stack.dtype if np.issubdtype(stack.dtype, np.floating) else np.float32
    out = np.empty((stack.shape[0], *out_shape), dtype=dtype)
    for i, plane in enumerate(stack):
        plane = np.asarray(plane, dtype=dtype)
        if any(sigma):
            plane = ndimage.gaussian_filter(plane, sigma, mode="nearest")
        ndimage.affine_transform(plane, np.asarray(scale), offset=np.asarray(offset), output_shape=out_shape,
                                 output=out[i], order=order, mode="nearest")
    return out


def _grid(n_in: int, s_in: float, s_out: float, n_out: int) -> tuple[float, float]:
    """Scale and offset that map output sample k to input index, both grids centred.

    Sample k of the output lies at ``(k - (n_out - 1) / 2) * s_out`` mm from the common
    centre; the input index at that point is that distance / ``s_in`` + ``(n_in - 1) / 2``.
    """
    scale = s_out / s_in
    return scale, (n_in - 1) / 2 - scale * (n_out - 1) / 2


def _anti_alias_sigma(s_in: float, s_out: float, enabled: bool) -> float:
    # Same rule as skimage.transform.rescale: sigma = (factor - 1) / 2 in input voxels.
    return max(0.0, (s_out / s_in - 1) / 2) if enabled else 0.0


def resampled_shape(in_shape: tuple[int, int], spacing: tuple[float, float],
                    target_spacing: tuple[float, float]) -> tuple[int, int]:
    """(H', W') of :func:`resample_slices`'s output for slices of ``in_shape`` (no allocation)."""
    return tuple(n if _same_spacing(s, t) else math.ceil((n - 1) * s / t - 1e-9) + 1
                 for n, s, t in zip(in_shape, spacing, target_spacing))


def resample_slices(stack: np.ndarray, spacing: tuple[float, float], target_spacing: tuple[float, float],
                    order: int = 1, *, anti_alias: bool = True) -> tuple[np.ndarray, ResampleRecord]:
    """Resample every slice of ``stack`` from ``spacing`` to exactly ``target_spacing``.

    The output grid has the target spacing exactly and is centred on the input grid. Its
    size along each axis is the smallest that still spans every input voxel centre,
    ``n' = ceil((n - 1) * s / t) + 1``, so :func:`restore_slices` only interpolates (its
    samples all fall inside the resampled grid). Values beyond the input's outer voxel
    centres (less than half a target voxel) repeat the edge (``mode="nearest"``).
    Interpolation is ``scipy.ndimage.affine_transform`` with spline ``order``; when
    ``anti_alias`` and an axis is downsampled, each slice is first smoothed with a
    Gaussian of sigma ``(t / s - 1) / 2`` input voxels along that axis.

    An axis whose spacing equals its target (relative difference <= ``SPACING_RTOL``) is
    left untouched; when both are, the result is an exact copy.

    Parameters
    ----------
    stack : (n, H, W) array; float dtypes are kept, others become float32
    spacing, target_spacing : (mm along H, mm along W), all > 0
    order : spline order 0-5 (1 = linear)

    Returns
    -------
    resampled : (n, H', W') array
    record : :class:`ResampleRecord` for :func:`restore_slices`
    """
    if stack.ndim != 3:
        raise ValueError(f"expected an (n, H, W) stack, got shape {stack.shape}")
    spacing = tuple(float(s) for s in spacing)
    target_spacing = tuple(float(t) for t in target_spacing)
    if len(spacing) != 2 or len(target_spacing) != 2 or not all(
            math.isfinite(v) and v > 0 for v in spacing + target_spacing):
        raise ValueError(f"expected two positive spacings each, got {spacing} -> {target_spacing}")
    in_shape = (int(stack.shape[1]), int(stack.shape[2]))
    out_shape = resampled_shape(in_shape, spacing, target_spacing)
    record = ResampleRecord(in_shape, out_shape, spacing, target_spacing, int(order), bool(anti_alias))
    return _apply(stack, record, forward=True), record


def restore_slices(stack: np.ndarray, record: ResampleRecord) -> np.ndarray:
    """Invert :func:`resample_slices`: (n, H', W') -> (n, H, W) on the original grid.

    Uses the record's order and anti-aliasing rule; an exact copy when the forward
    resampling was a no-op.
    """
    if stack.ndim != 3 or tuple(stack.shape[1:]) != tuple(record.out_shape):
        raise ValueError(f"expected an (n, {record.out_shape[0]}, {record.out_shape[1]}) stack, got {stack.shape}")
    return _apply(stack, record, forward=False)


def _apply(stack: np.ndarray, record: ResampleRecord, *, forward: bool) -> np.ndarray:
    n_in, n_out = (record.in_shape, record.out_shape) if forward else (record.out_shape, record.in_shape)
    s_in, s_out = ((record.spacing, record.target_spacing) if forward
                   else (record.target_spacing, record.spacing))
    same = [_same_spacing(a, b) for a, b in zip(record.spacing, record.target_spacing)]
    if all(same):
        dtype = stack.dtype if np.issubdtype(stack.dtype, np.floating) else np.float32
        return np.array(stack, dtype=dtype, copy=True)
    scale, offset, sigma = [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]  # identity along an axis at its target
    for ax in range(2):
        if not same[ax]:
            scale[ax], offset[ax] = _grid(n_in[ax], s_in[ax], s_out[ax], n_out[ax])
            sigma[ax] = _anti_alias_sigma(s_in[ax], s_out[ax], record.anti_alias)
    return _resample_stack(stack, tuple(scale), tuple(offset), tuple(n_out), record.order, tuple(sigma))


# --- padding -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PadRecord:
    """What :func:`crop_to_record` needs: the (H, W) before padding and the pad widths."""

    shape: tuple[int, int]
    pad: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))
    value: float


def pad_to_multiple(stack: np.ndarray, multiple: int, *, value: float | None = None) -> tuple[np.ndarray, PadRecord]:
    """Pad H and W of ``stack`` up to the next multiple of ``multiple``, symmetrically.

    The pad value is the **stack's minimum** unless ``value`` is given: it is background
    for both MRI (0) and CT (air, about -1000 HU), where 0 would be water. An odd pad puts
    the extra row/column at the bottom/right.

    ``stack`` (n, H, W) -> (padded (n, H'', W'') same dtype, :class:`PadRecord`).
    """
    if stack.ndim != 3:
        raise ValueError(f"expected an (n, H, W) stack, got shape {stack.shape}")
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"expected a positive integer multiple, got {multiple!r}")
    multiple = int(multiple)
    if value is None:
        value = float(stack.min()) if stack.size else 0.0
    pad = []
    for n in stack.shape[1:]:
        total = -n % multiple
        pad.append((total // 2, total - total // 2))
    record = PadRecord((int(stack.shape[1]), int(stack.shape[2])), (pad[0], pad[1]), float(value))
    padded = np.pad(stack, ((0, 0), pad[0], pad[1]), mode="constant", constant_values=value)
    return padded, record


def crop_to_record(padded: np.ndarray, record: PadRecord) -> np.ndarray:
    """Exact inverse of :func:`pad_to_multiple`: (n, H'', W'') -> (n, H, W) copy."""
    (top, bottom), (left, right) = record.pad
    expected = (record.shape[0] + top + bottom, record.shape[1] + left + right)
    if padded.ndim != 3 or tuple(padded.shape[1:]) != expected:
        raise ValueError(f"expected an (n, {expected[0]}, {expected[1]}) stack, got {padded.shape}")
    return padded[:, top:top + record.shape[0], left:left + record.shape[1]].copy()
