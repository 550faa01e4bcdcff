"""Seeded, structure-aware NIfTI header fuzzer for galip's loader (issue 16).

Each case takes one of a few small valid volumes (NIfTI-1/2, float32/int16/uint8, .nii or
.nii.gz), applies 1-4 mutations (dims, datatype, bitpix, pixdim, vox_offset,
scl_slope/inter, q/sform codes and parameters, units, magic, extension flag, sizeof_hdr,
raw byte flips, truncation, gzip corruption) and runs it through ``load_volume``, then,
if it loads, through the pipeline's planning and one model-space slice
(``plan_volume`` + ``SlicePlan.prepare``) and ``save_volume``. Anything that escapes
other than a ``GalipError`` is an escape; a case running past ``--limit`` seconds is a
hang (SIGALRM). Run as a script it prints one JSON summary, with the process's peak RSS::

    GALIP_MEMORY_BUDGET=256M python tests/fuzz_nifti.py --cases 2000 --seed 0
"""
from __future__ import annotations

import gzip
import random
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_driver import drive, main  # noqa: E402
from galip.runtime.errors import GalipError  # noqa: E402
from galip.runtime.preprocess import PreprocessConfig, plan_volume  # noqa: E402
from galip.runtime.volume import load_volume, save_volume  # noqa: E402

INTS = [0, 1, 2, 3, 7, 8, 255, 256, 32767, -1, -32768, 2 ** 31 - 1, 2 ** 31, 2 ** 62, -(2 ** 62)]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-9, 1e-3, 1000.0, 1e10, 1e38, -1e38, np.inf, -np.inf, np.nan, 3e-45]
DTYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 3, 13, 99, 4096,
          -1, 32767]
CONFIG = PreprocessConfig(axis=2, spacing=2.0, size_multiple=32)


def seeds() -> list[tuple[str, bytes]]:
    """(name, file bytes) of the valid volumes every case starts from."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    out = []
    for name, image in [
        ("n1_f32", nib.Nifti1Image(rng.random((9, 8, 6), dtype=np.float32) * 100, affine)),
        ("n1_i16", nib.Nifti1Image((rng.random((7, 10, 5)) * 3000).astype(np.int16), affine)),
        ("n2_u8", nib.Nifti2Image((rng.random((6, 6, 7)) * 200).astype(np.uint8), affine)),
        ("n1_4d", nib.Nifti1Image(rng.random((5, 6, 4, 1), dtype=np.float32), affine)),
    ]:
        image.header.set_xyzt_units("mm", "sec")
        if name == "n1_i16":
            image.header.set_slope_inter(0.5, 10.0)
        out.append((name, image.to_bytes()))
    return out


def _header(blob: bytes):
    n2 = blob[4:7] == b"n+2"
    size = 540 if n2 else 348
    return (nib.Nifti2Header if n2 else nib.Nifti1Header)(blob[:size], check=False), size


def _set(header, field: str, value, index: int | None = None) -> None:
    try:
        with np.errstate(all="ignore"):
            if index is None:
                header[field] = value
            else:
                header[field][index] = value
    except (OverflowError, ValueError, TypeError):
        pass   # a value the field's type cannot hold: that mutation is a no-op


def mutate(blob: bytes, rng: random.Random) -> bytes:
    """1-4 structure-aware mutations of a NIfTI file's bytes (header fields, then raw bytes)."""
    header, size = _header(blob)
    body = bytearray(blob[size:])
    raw_flips = 0
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["dim", "dim", "datatype", "bitpix", "pixdim", "vox_offset", "scale", "codes",
                           "quatern", "srow", "units", "magic", "extension", "sizeof", "flip", "flip"])
        if kind == "dim":
            _set(header, "dim", rng.choice(INTS + [rng.randint(-5, 600)]), rng.randrange(8))
        elif kind == "datatype":
            _set(header, "datatype", rng.choice(DTYPES))
        elif kind == "bitpix":
            _set(header, "bitpix", rng.choice([0, 1, 8, 16, 24, 32, 64, 128, -8, 999]))
        elif kind == "pixdim":
            _set(header, "pixdim", rng.choice(FLOATS), rng.randrange(8))
        elif kind == "vox_offset":
            _set(header, "vox_offset", rng.choice(FLOATS + [0, 100, 348, 352, 353, 540, 544, 2 ** 20,
                                                            len(blob), len(blob) - 1]))
        elif kind == "scale":
            _set(header, rng.choice(["scl_slope", "scl_inter"]), rng.choice(FLOATS))
        elif kind == "codes":
            _set(header, rng.choice(["qform_code", "sform_code"]), rng.choice([0, 1, 2, 3, 4, 5, -1, 255]))
        elif kind == "quatern":
            _set(header, rng.choice(["quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y"]),
                 rng.choice(FLOATS + [2.0, -2.0]))
        elif kind == "srow":
            _set(header, rng.choice(["srow_x", "srow_y", "srow_z"]), rng.choice(FLOATS), rng.randrange(4))
        elif kind == "units":
            _set(header, "xyzt_units", rng.randrange(256))
        elif kind == "magic":
            _set(header, "magic", rng.choice([b"n+1", b"ni1", b"n+2", b"ni2", b"xyz", b""]))
        elif kind == "extension" and len(body) >= 4:
            body[0] = 1
            body[4:12] = rng.choice([b"\x10\x00\x00\x00\x04\x00\x00\x00", b"\xff\xff\xff\x7f\x04\x00\x00\x00",
                                     b"\x00\x00\x00\x00\x00\x00\x00\x00", b"\x08\x00\x00\x80\x01\x00\x00\x00"])
        elif kind == "sizeof":
            _set(header, "sizeof_hdr", rng.choice([0, 348, 540, 1 << 24, -348]))
        else:
            raw_flips += rng.randint(1, 8)
    data = bytearray(header.binaryblock + bytes(body))
    for _ in range(raw_flips):
        position = rng.randrange(min(len(data), size + 16))
        data[position] ^= 1 << rng.randrange(8)
    if rng.random() < 0.05:
        del data[rng.randrange(len(data)):]
    return bytes(data)


def make_case(index: int, seed: int, bases: list[tuple[str, bytes]]) -> tuple[str, bytes, str]:
    """(description, file bytes, suffix) of case ``index`` — the same for the same seed."""
    rng = random.Random(f"{seed}:{index}")
    name, blob = rng.choice(bases)
    blob = mutate(blob, rng)
    if rng.random() < 0.5:
        packed = bytearray(gzip.compress(blob, compresslevel=1, mtime=0))
        if rng.random() < 0.1:
            packed[rng.randrange(10, len(packed))] ^= 0xFF
        return f"{index}:{name}.nii.gz", bytes(packed), ".nii.gz"
    return f"{index}:{name}.nii", blob, ".nii"


def run_case(path: Path, out: Path) -> str:
    """The outcome of one file: ``loaded``, or the GalipError class that refused it."""
    try:
        volume = load_volume(path)
        plan, raw = plan_volume(volume.data, volume.affine_mm, "mri", CONFIG)
        plan.prepare(raw[:1])
        save_volume(out, volume.data, volume.affine, volume.header, overwrite=True)
    except GalipError as error:
        assert "\n" not in str(error), str(error)
        return type(error).__name__
    return "loaded"


def fuzz(cases: int, seed: int, limit: float) -> dict:
    bases = seeds()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.nii"

        def each():
            for index in range(cases):
                name, blob, suffix = make_case(index, seed, bases)
                path = Path(folder) / f"case{suffix}"
                path.write_bytes(blob)
                yield name, lambda: run_case(path, out)

        return drive(each(), limit)


if __name__ == "__main__":
    main(fuzz, __doc__.splitlines()[0])
