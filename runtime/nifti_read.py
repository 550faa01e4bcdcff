"""Read a NIfTI file's bytes defensively: the header is judged before any voxel is read.

:func:`read_image` is :func:`galip.runtime.volume.load_volume`'s way in. It opens only
regular files (a FIFO would block forever, a device never ends), parses the header from
its first bytes and refuses, with one :class:`InputError` line, what would crash or
exhaust nibabel and numpy later: undefined dims, datatypes and unit codes, a non-finite
or absurd ``vox_offset``, and dims × itemsize beyond the file's bytes (uncompressed) or
the memory budget (:mod:`galip.runtime.limits`). A ``.gz`` is decompressed as a stream:
only the bytes the header accounts for are kept, the rest is inflated and dropped only to
verify the CRC, and a stream that keeps going past that (a gzip bomb) stops at a cap.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import stat
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import nibabel as nib
import numpy as np

from .errors import InputError
from .limits import BYTES_PER_VOXEL, human, over_budget

_GZIP_MAGIC = b"\x1f\x8b"
_PIECE = 1 << 20
#: Decompressed bytes a .nii.gz may hold past what its header accounts for (padding,
#: trailing junk) before it is called a gzip bomb.
GZIP_SLACK = 16 << 20
#: NIfTI spatial unit codes → mm per unit (0 unknown is read as mm, as every tool does).
MM_PER_UNIT = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}
_UNIT_NAMES = "0 unknown, 1 m, 2 mm, 3 µm"
_NON_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


@dataclass(frozen=True)
class Layout:
    """What a checked header promises: shape, on-disk dtype, where the voxels start."""

    image_class: type
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int           # vox_offset, bytes into the (decompressed) image file
    nbytes: int           # voxel bytes on disk
    mm_per_unit: float    # the header's spatial unit in mm

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def not_nifti(path: Path, found: str) -> InputError:
    return InputError(f"{path}: expected a NIfTI-1/2 image (.nii or .nii.gz), found {found}; "
                      f"check the path or convert the file to NIfTI (e.g. with dcm2niix or nibabel)")


def corrupt(path: Path, reason: str) -> InputError:
    return InputError(f"{path}: expected a complete NIfTI file, found a truncated or corrupt one "
                      f"({reason}); copy or export the file again")


def _bad_header(path: Path, field: str, found: str, fix: str) -> InputError:
    return InputError(f"{path}: expected {field}, found {found}; {fix}")


def reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """nibabel's header fix-up notes ("sizeof_hdr should be 348; set ...") and numpy's
    overflow warnings off: the CLI's stderr holds one line, and what matters is checked."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def open_regular(path: Path) -> tuple[BinaryIO, int]:
    """``(binary handle, size)`` of a regular file; InputError for FIFOs, devices, sockets.

    Opened non-blocking, so opening a FIFO without a writer returns at once, and checked
    on the open descriptor (no window between the check and the read).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError(f"{path}: expected a readable NIfTI file, found it unreadable ({exc.strerror or exc}); "
                         "check its permissions") from None
    info = os.fstat(fd)
    for test, what in _NON_REGULAR:
        if test(info.st_mode):
            os.close(fd)
            raise InputError(f"{path}: expected a regular NIfTI file, found {what}; "
                             "copy the data into a .nii or .nii.gz file first")
    return os.fdopen(fd, "rb"), info.st_size


def nifti_class(head: bytes) -> type | None:
    """The nibabel class of a file whose first bytes are ``head`` (from the magic), or None."""
    if len(head) >= 540 and head[4:7] in (b"n+2", b"ni2"):
        return nib.Nifti2Image if head[4:7] == b"n+2" else nib.Nifti2Pair
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):
        return nib.Nifti1Image if head[344:347] == b"n+1" else nib.Nifti1Pair
    return None


def check_header(path: Path, head: bytes, image_class: type, *, single_file: bool,
                 file_bytes: int | None = None) -> Layout:
    """Judge the header in ``head`` before any voxel is read; InputError naming the field.

    ``file_bytes``: size of the file holding the voxels when known (not for a .gz stream).
    """
    header_class = image_class.header_class
    size = header_class.template_dtype.itemsize
    try:
        header = header_class(head[:size], check=False)
        dim = [int(d) for d in header["dim"]]
        xyzt = int(header["xyzt_units"])
        vox_offset = float(header["vox_offset"])
    except (ValueError, TypeError, OverflowError) as exc:
        raise corrupt(path, f"unreadable header: {reason(exc)}") from None
    if not 1 <= dim[0] <= 7:
        raise _bad_header(path, "dim[0] (the number of dimensions) between 1 and 7", f"{dim[0]}",
                          "the header is damaged; export the file again")
    shape = tuple(dim[1:dim[0] + 1])
    if any(n < 1 for n in shape):
        raise _bad_header(path, "a volume with voxels (every dim >= 1)", f"shape {shape}",
                          "the header is damaged; export the file again")
    try:
        with quiet():
            dtype = np.dtype(header.get_data_dtype())
    except Exception as exc:   # nibabel raises HeaderDataError, KeyError, ... for unknown codes
        raise _bad_header(path, "a defined NIfTI datatype code", f"{int(header['datatype'])} ({reason(exc)})",
                          "the header is damaged; export the file again") from None
    if dtype.kind not in "biuf" or dtype.itemsize == 0:
        raise InputError(f"{path}: expected real-valued voxels, found on-disk dtype {dtype}; "
                         f"convert the image to a real (e.g. magnitude, grayscale) volume first")
    if xyzt & 7 not in MM_PER_UNIT:
        raise _bad_header(path, f"a defined spatial unit code in xyzt_units ({_UNIT_NAMES})",
                          f"xyzt_units {xyzt} (spatial code {xyzt & 7})",
                          "set the units in the header (e.g. nibabel header.set_xyzt_units('mm'))")
    lowest = size if single_file else 0
    if not math.isfinite(vox_offset) or not lowest <= vox_offset <= 2.0 ** 62:
        raise _bad_header(path, f"vox_offset (where the voxels start) of at least {lowest} bytes",
                          f"{vox_offset:g}", "the header is damaged; export the file again")
    n_voxels = math.prod(shape)
    layout = Layout(image_class, shape, dtype, int(vox_offset), n_voxels * dtype.itemsize, MM_PER_UNIT[xyzt & 7])
    if file_bytes is not None:
        _need(path, layout, file_bytes, "file")
    elif over_budget("", layout.offset) is not None:   # a .gz: the stream would be inflated that far
        raise _bad_header(path, "vox_offset within the file", f"{layout.offset:,} bytes ({human(layout.offset)})",
                          "the header is damaged; export the file again")
    why = over_budget(f"an image of shape {shape} ({dtype})", layout.nbytes + n_voxels * BYTES_PER_VOXEL)
    if why is not None:
        raise InputError(f"{path}: expected an image within the memory budget, found {why}")
    return layout


def _need(path: Path, layout: Layout, have: int, what: str) -> None:
    if have < layout.end:
        raise corrupt(path, f"the header promises {layout.nbytes:,} bytes of voxels from byte "
                            f"{layout.offset:,}, the {what} holds {have:,} bytes")


# ----------------------------------------------------------------------------- gzip
def _inflate(handle: BinaryIO, path: Path) -> Iterator[bytes]:
    """Decompressed pieces (≤ 1 MiB each) of every gzip member in ``handle``; CRCs checked."""
    member = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending = b""
    try:
        while True:
            if not pending:
                pending = handle.read(_PIECE)
                if not pending:
                    break
            piece = member.decompress(pending, _PIECE)   # bounded output: a bomb cannot burst
            pending = member.unconsumed_tail
            if piece:
                yield piece
            if member.eof:
                pending = member.unused_data + pending
                while pending[:1] == b"\0" or (not pending and (pending := handle.read(_PIECE))):
                    pending = pending.lstrip(b"\0")       # zero padding after a member is allowed
                if not pending:
                    return
                member = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error as exc:
        raise corrupt(path, reason(exc)) from None
    except OSError as exc:
        raise corrupt(path, reason(exc)) from None
    raise corrupt(path, "compressed file ended before the end-of-stream marker was reached")


def read_gzip(path: Path, handle: BinaryIO) -> tuple[bytes, Layout]:
    """The header and voxel bytes of a .nii.gz; the stream is inflated to its end (CRC)."""
    kept = bytearray()
    layout: Layout | None = None
    total = 0
    pieces = _inflate(handle, path)
    for piece in pieces:
        total += len(piece)
        if layout is None:
            kept += piece
            if len(kept) < 540:
                continue
            layout = _gz_layout(path, bytes(kept[:540]))
        elif len(kept) < layout.end:
            kept += piece
        if total > layout.end + GZIP_SLACK:
            pieces.close()
            raise InputError(f"{path}: expected a .nii.gz holding about {human(layout.end)} (what its header "
                             f"describes), found a stream that decompresses to more than {human(total)} "
                             "(a gzip bomb?); recompress the image alone")
    if layout is None:
        layout = _gz_layout(path, bytes(kept[:540]))
    _need(path, layout, total, "decompressed file")
    return bytes(kept[:layout.end]), layout


def _gz_layout(path: Path, head: bytes) -> Layout:
    image_class = nifti_class(head)
    if image_class not in (nib.Nifti1Image, nib.Nifti2Image):
        raise not_nifti(path, "gzip-compressed data without a NIfTI header"
                              + ("" if len(head) >= 540 else f" ({len(head)} bytes)"))
    return check_header(path, head, image_class, single_file=True)


# ----------------------------------------------------------------------------- any NIfTI file
def read_image(path: Path):
    """``(nibabel image over in-memory bytes, Layout)`` of a .nii, .nii.gz or .hdr/.img pair."""
    handle, size = open_regular(path)
    with handle:
        head = handle.read(540)
        if head[:2] == _GZIP_MAGIC:
            handle.seek(0)
            raw, layout = read_gzip(path, handle)
            return _from_bytes(path, layout, {"image": raw}), layout
        if path.name.lower().endswith(".gz"):
            raise not_nifti(path, f"a .gz name on a file that is not gzip-compressed (starts with {head[:8]!r})")
        if path.suffix.lower() not in (".hdr", ".img") or nifti_class(head) in (nib.Nifti1Image, nib.Nifti2Image):
            image_class = nifti_class(head)
            if image_class is None:
                raise not_nifti(path, f"a file without a NIfTI header (starts with {head[:8]!r})")
            if image_class not in (nib.Nifti1Image, nib.Nifti2Image):
                raise not_nifti(path, "a header-only NIfTI pair file (magic ni1/ni2) under a single-file name; "
                                      "name it .hdr next to its .img")
            layout = check_header(path, head, image_class, single_file=True, file_bytes=size)
            handle.seek(0)
            return _from_bytes(path, layout, {"image": handle.read(layout.end)}), layout
    return _read_pair(path)


def _read_pair(path: Path):
    """A .hdr/.img pair, whichever of the two ``path`` names."""
    header_path, image_path = path.with_suffix(".hdr"), path.with_suffix(".img")
    handle, _ = open_regular(header_path) if header_path.exists() else open_regular(path)
    with handle:
        head = handle.read(540)
    image_class = nifti_class(head)
    if image_class is None:
        raise not_nifti(path, f"a file without a NIfTI header (starts with {head[:8]!r})")
    if not image_path.exists():
        raise not_nifti(path, f"a NIfTI pair header without its image file {image_path.name}")
    handle, size = open_regular(image_path)
    with handle:
        layout = check_header(path, head, image_class, single_file=False, file_bytes=size)
        data = handle.read(layout.end)
    return _from_bytes(path, layout, {"header": head, "image": data}), layout


def _from_bytes(path: Path, layout: Layout, parts: dict[str, bytes]):
    """The nibabel image over ``parts`` (``image``, and ``header`` for a pair) in memory."""
    from nibabel.fileholders import FileHolder
    file_map = {name: FileHolder(fileobj=io.BytesIO(data)) for name, data in parts.items()}
    try:
        with quiet():
            return layout.image_class.from_file_map(file_map)
    except Exception as exc:   # nibabel's header and extension parsers raise many types
        raise corrupt(path, reason(exc)) from None
