"""Read and write NIfTI volumes; numpy and nibabel only (never torch).

:func:`load_volume` turns any readable NIfTI-1/2 file into a :class:`Volume` (float32
voxels with the file's scaling applied, the affine, a copy of the header) or raises one
:class:`~galip.runtime.errors.InputError` line that says what was expected, what was
found and how to fix it. :func:`save_volume` writes float32 NIfTI atomically with the
affine, qform/sform codes and units of a reference header.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, HeaderTypeError, ImageDataError
from nibabel.wrapstruct import WrapStructError

from .atomic import atomic_path, check_name
from .errors import InputError, OutputError
from .limits import check_voxel_sizes
from .nifti_read import corrupt, quiet, read_image, reason

# What nibabel and numpy raise lazily when the voxels of a checked header are read.
_READ_ERRORS = (ImageFileError, HeaderDataError, HeaderTypeError, ImageDataError, WrapStructError,
                OSError, EOFError, ValueError, TypeError, OverflowError, KeyError)


@dataclass
class Volume:
    """One 3-D image in scanner units.

    data : (X, Y, Z) float32, scl_slope/scl_inter applied, NaN/Inf replaced by 0
    affine : (4, 4) float64 voxel-to-world in the file's units (the header's best affine)
    header : copy of the file's ``Nifti1Header`` (or ``Nifti2Header``, a subclass)
    n_nonfinite : how many NaN/Inf voxels were replaced by 0 (the caller warns)
    mm_per_unit : the header's spatial unit in mm (1 for mm and unknown, 0.001 for µm)
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    n_nonfinite: int = 0
    mm_per_unit: float = 1.0

    @property
    def affine_mm(self) -> np.ndarray:
        """The affine with world coordinates in mm (what the pipeline's geometry expects)."""
        scaled = self.affine.copy()
        scaled[:3] *= self.mm_per_unit
        return scaled


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3-D shape of a NIfTI of ``shape``; trailing singleton dimensions are dropped."""
    if len(shape) < 3:
        raise InputError(f"{path}: expected a 3-D volume, found a {len(shape)}-D image of shape {shape}; "
                         f"galip translates whole volumes, not single slices")
    if any(n == 0 for n in shape):
        raise InputError(f"{path}: expected a volume with voxels, found shape {shape}; check the file")
    extra = shape[3:]
    if len(shape) == 4 and shape[3] > 1:
        raise InputError(f"{path}: expected one 3-D volume, found a 4-D series of {shape[3]} volumes {shape}; "
                         f"extract one volume first (e.g. fslroi in.nii.gz out.nii.gz 0 1)")
    if any(n != 1 for n in extra):
        raise InputError(f"{path}: expected a 3-D volume, found a {len(shape)}-D image of shape {shape}; "
                         f"extract one 3-D volume first")
    return shape[0], shape[1], shape[2]


def load_volume(path: str | os.PathLike, *, require_signal: bool = True) -> Volume:
    """Read a NIfTI-1/2 volume (.nii, .nii.gz, or .hdr/.img pair) as float32.

    Any on-disk dtype is read with scl_slope/scl_inter applied. A 4-D image with one
    volume (and any trailing singleton dimension) is squeezed to 3-D. NaN/Inf voxels are
    set to 0 and counted in ``Volume.n_nonfinite``.

    Raises ``InputError`` (one line) for: a missing path or a folder; a file that is not
    NIfTI; a truncated or corrupt file (a .gz is fully decompressed and CRC-checked); a
    complex or RGB dtype; fewer than 3 or more than one volume's dimensions; a degenerate
    affine; and, when ``require_signal``, a volume whose voxels are all 0.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: expected an existing NIfTI file, found nothing at that path; check the path")
    if path.is_dir():
        raise InputError(f"{path}: expected a NIfTI file, found a folder; give the path of a .nii or .nii.gz file")
    image, layout = read_image(path)
    shape = _spatial_shape(path, layout.shape)
    with quiet():   # scaling overflow and NaN show up as non-finite voxels, counted below
        try:
            affine = np.array(image.affine, dtype=np.float64)
            sizes = np.linalg.norm(affine[:3, :3], axis=0) * layout.mm_per_unit
            degenerate = not np.all(np.isfinite(affine)) or not np.all(sizes > 0)
            if not degenerate:   # voxel sizes first: they name the likelier fix (units)
                unit = "" if layout.mm_per_unit == 1.0 else f" (header units: {layout.mm_per_unit:g} mm)"
                check_voxel_sizes(str(path), sizes, unit)
            if degenerate or abs(np.linalg.det(affine[:3, :3] / (sizes / layout.mm_per_unit))) < 1e-6:
                raise InputError(f"{path}: expected an invertible voxel-to-world affine, found "
                                 f"{np.round(affine, 4).tolist()}; fix the file's qform/sform (e.g. fslorient)")
            data = image.get_fdata(dtype=np.float32, caching="unchanged")
        except _READ_ERRORS as exc:
            raise corrupt(path, reason(exc)) from None
    data = data.reshape(shape)
    if not data.flags.writeable:
        data = data.copy()
    nonfinite = ~np.isfinite(data)
    n_nonfinite = int(nonfinite.sum())
    if n_nonfinite:
        data[nonfinite] = 0.0
    if require_signal and not np.any(data):
        raise InputError(f"{path}: expected a volume with signal, found all {data.size} voxels 0"
                         f"{f' ({n_nonfinite} of them NaN/Inf)' if n_nonfinite else ''}; check the input file")
    return Volume(data=data, affine=affine, header=image.header.copy(), n_nonfinite=n_nonfinite,
                  mm_per_unit=layout.mm_per_unit)


def _descrip(description: str) -> bytes:
    """UTF-8 ``description`` cut to the 79 bytes the 80-byte NIfTI field holds (NUL-ended)."""
    return description.encode("utf-8")[:79].decode("utf-8", errors="ignore").encode("utf-8")


def _units(header: nib.Nifti1Header) -> tuple[int, int]:
    """The header's spatial and temporal unit codes; an undefined one becomes 0 (unknown)."""
    codes = int(header["xyzt_units"])
    known = nib.nifti1.unit_codes.code
    return tuple(c if c in known else 0 for c in (codes & 7, codes & 56))


def _float32_image(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None,
                   description: str | None) -> nib.Nifti1Image:
    """A float32 NIfTI-1 image (NIfTI-2 if a dimension exceeds 32767) with a fresh header."""
    big = max(data.shape) > np.iinfo(np.int16).max
    image_class = nib.Nifti2Image if big else nib.Nifti1Image
    hdr = image_class.header_class()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape(data.shape)
    if header is not None:
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        xyz_unit, t_unit = _units(header)
        hdr.set_dim_info(*header.get_dim_info())
    else:
        qcode, scode, xyz_unit, t_unit = 1, 1, "mm", "unknown"
    hdr.set_qform(affine, code=qcode)
    hdr.set_sform(affine, code=scode)
    if qcode == 0 and scode == 0 and not np.allclose(hdr.get_best_affine(), affine, rtol=0, atol=1e-4):
        hdr.set_sform(affine, code="aligned")  # codes 0/0 would lose this affine on reading
    hdr.set_xyzt_units(xyz_unit, t_unit)
    hdr["descrip"] = _descrip(description or "")
    return image_class(np.asarray(data, dtype=np.float32), None, hdr)


def save_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None,
                *, description: str | None = None, overwrite: bool = False) -> Path:
    """Write ``data`` as a float32 NIfTI at ``path`` (.nii or .nii.gz) and return the path.

    Parameters
    ----------
    data : (X, Y, Z) real array; written as float32 (slope 1, intercept 0), never modified
    affine : (4, 4) voxel-to-world affine, written to both qform and sform
    header : reference header (usually ``Volume.header`` of the input): its qform/sform
        codes, xyzt units and dim_info are kept. ``None``: codes 1 ("scanner"), units mm.
        If its codes are both 0 and the affine differs from what such a header implies,
        the sform code becomes 2 ("aligned") so that the affine is not lost.
    description : written to ``descrip``, cut to 79 bytes; empty when ``None``
    overwrite : replace an existing file

    The file is written to a temporary name in the target folder and renamed into place,
    so nothing half-written is ever left at ``path``. Raises ``OutputError`` for a wrong
    extension, an existing file without ``overwrite``, a missing or unwritable folder, or
    a failed write; ``ValueError`` for data that is not 3-D or an affine that is not 4x4.
    """
    path = Path(path)
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3 or affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"expected 3-D data and a finite 4x4 affine, got shapes {data.shape} and {affine.shape}")
    check_name(path, (".nii", ".nii.gz"), "output")
    if path.is_dir():
        raise OutputError(f"{path}: expected an output file name, found a folder; give a file name inside it")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: expected a new output file, found an existing one; "
                          f"pass --overwrite or choose another path")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: expected an existing output folder, found no folder {path.parent}; "
                          f"create it first")
    image = _float32_image(data, affine, header, description)
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            image.to_filename(tmp)
    except OSError as exc:
        raise OutputError(f"{path}: expected a writable output folder with free space, found "
                          f"{reason(exc)}; check permissions and disk space") from None
    return path
