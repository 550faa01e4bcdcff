"""Issue 16, input volumes and arguments: every hostile case is one line, exit 2, no file left,
and is refused before inference (the pipeline's translate must not even start)."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fixtures_bundle import build_tiny_bundle, lps_affine, phantom_volume, write_volume
from galip.runtime import pipeline
from galip.runtime.errors import InputError
from galip.runtime.limits import BUDGET_ENV, affordable_batch, parse_bytes
from galip.runtime.volume import load_volume
from helpers_cli import run_fails

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", diffusion_targets=())


@pytest.fixture
def no_inference(monkeypatch):
    """Fail the test if the run gets as far as inference: these errors must come first."""
    def translate(*args, **kwargs):
        raise AssertionError("inference started before the error was found")
    monkeypatch.setattr(pipeline.Translator, "translate", translate)


def nifti_bytes(data=None, *, n2: bool = False, edit=None, affine=None) -> bytes:
    """A valid NIfTI-1/2 file's bytes, its header fields then changed by ``edit(header)``."""
    data = np.ones((16, 16, 8), np.float32) if data is None else data
    image = (nib.Nifti2Image if n2 else nib.Nifti1Image)(data, lps_affine() if affine is None else affine)
    image.header.set_xyzt_units("mm", "sec")
    blob = image.to_bytes()
    size = 540 if n2 else 348
    header = type(image.header)(blob[:size], check=False)
    if edit is not None:
        edit(header)
    return header.binaryblock + blob[size:]


def write(path: Path, blob: bytes, *, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(blob, 1) if gz else blob)
    return path


def run(folder: Path, source: Path, bundle: Path, *extra, match: str) -> str:
    return run_fails(folder, source, "--to", "T2", "--bundle", bundle, *extra, match=match)


# ----------------------------------------------------------------------------- header dims
def test_dims_32767_cubed_int16_in_a_2_kb_file(tmp_path, bundle, no_inference):
    def edit(h):
        h["dim"] = [3, 32767, 32767, 32767, 1, 1, 1, 1]
        h.set_data_dtype(np.int16)
    blob = nifti_bytes(edit=edit)[:2048]
    line = run(tmp_path, write(tmp_path / "huge.nii", blob), bundle, match="truncated or corrupt")
    assert "promises 70,362,301,923,326 bytes" in line and "holds 2,048 bytes" in line


def test_nifti2_dims_2_to_the_31_in_a_tiny_file(tmp_path, bundle, no_inference):
    def edit(h):
        h["dim"] = [3, 2 ** 31, 2 ** 31, 8, 1, 1, 1, 1]
    blob = nifti_bytes(n2=True, edit=edit)
    run(tmp_path, write(tmp_path / "n2.nii", blob), bundle, match="truncated or corrupt")
    run(tmp_path, write(tmp_path / "n2.nii.gz", blob, gz=True), bundle, match="memory budget")


def test_memory_budget_is_configurable(tmp_path, monkeypatch):
    path = write(tmp_path / "v.nii.gz", nifti_bytes(np.ones((64, 64, 64), np.float32)), gz=True)
    assert load_volume(path).data.shape == (64, 64, 64)
    monkeypatch.setenv(BUDGET_ENV, "4M")    # 64³ float32 needs ~9 MiB with the run's working copies
    with pytest.raises(InputError, match="memory budget of 4 MiB"):
        load_volume(path)
    assert parse_bytes("1.5G") == 3 << 29 and parse_bytes("512MiB") == 512 << 20
    assert affordable_batch(64, (256, 256), budget=256 * 256 * 48 * 3) == 3
    assert affordable_batch(64, (256, 256), budget=10) == 1


# ----------------------------------------------------------------------------- vox_offset, units
def test_vox_offset_infinite_in_nii(tmp_path, bundle, no_inference):
    blob = nifti_bytes(edit=lambda h: h.__setitem__("vox_offset", np.inf))
    run(tmp_path, write(tmp_path / "inf.nii", blob), bundle, match="vox_offset")


def test_vox_offset_1e38_in_nii_gz(tmp_path, bundle, no_inference):
    blob = nifti_bytes(edit=lambda h: h.__setitem__("vox_offset", 1e38))
    line = run(tmp_path, write(tmp_path / "far.nii.gz", blob, gz=True), bundle, match="vox_offset")
    assert "1e+38" in line


def test_undefined_unit_code_is_refused_before_inference(tmp_path, bundle, no_inference):
    blob = nifti_bytes(edit=lambda h: h.__setitem__("xyzt_units", 7))
    line = run(tmp_path, write(tmp_path / "units.nii.gz", blob, gz=True), bundle, match="xyzt_units 7")
    assert "set_xyzt_units" in line


# ----------------------------------------------------------------------------- voxel sizes
@pytest.mark.parametrize("size, shown", [(1e10, "1e+10 mm"), (1e-9, "1e-09 mm")])
def test_voxel_size_out_of_range_in_the_sform(tmp_path, bundle, no_inference, size, shown):
    def edit(h):
        h.set_sform(np.diag([size, size, size, 1.0]), code=1)
    line = run(tmp_path, write(tmp_path / "vox.nii.gz", nifti_bytes(edit=edit), gz=True), bundle,
               match="voxel sizes between 0.01 and 50 mm")
    assert shown in line


def test_pixdim_1000_read_as_mm(tmp_path, bundle, no_inference):
    """A µm volume labelled mm (q/sform codes 0: affine from pixdim) is refused with the fix ..."""
    def edit(h):
        h["qform_code"], h["sform_code"] = 0, 0
        h["pixdim"][1:4] = 1000.0
    line = run(tmp_path, write(tmp_path / "um.nii.gz", nifti_bytes(edit=edit), gz=True), bundle,
               match="found 1000 mm")
    assert "micron" in line


def test_pixdim_1000_labelled_micron_runs_at_1_mm(tmp_path, bundle):
    """... and the same file with its units set to µm is a valid 1 mm volume (exit 0)."""
    from typer.testing import CliRunner
    from galip.runtime import cli

    def edit(h):
        h["qform_code"], h["sform_code"] = 0, 0
        h["pixdim"][1:4] = 1000.0
        h.set_xyzt_units("micron", "sec")
    data = phantom_volume()
    source = write(tmp_path / "um.nii.gz", nifti_bytes(data, edit=edit), gz=True)
    assert load_volume(source).mm_per_unit == 0.001
    result = CliRunner().invoke(cli.app, [str(source), "--to", "T2", "--bundle", str(bundle)])
    assert result.exit_code == 0, result.output
    out = nib.load(tmp_path / "um_T2.nii.gz")
    assert out.shape == data.shape and out.header.get_xyzt_units()[0] == "micron"


# ----------------------------------------------------------------------------- special files
def test_named_pipe_is_refused_without_blocking(tmp_path, bundle, no_inference):
    pipe = tmp_path / "pipe.nii.gz"
    os.mkfifo(pipe)
    run(tmp_path, pipe, bundle, match="named pipe (FIFO)")


def gzip_bomb(header_and_data: bytes, gib: int = 4) -> bytes:
    """A gzip stream: a valid small NIfTI then ``gib`` GiB of zeros, a few MB on disk.

    After a full flush deflate starts afresh, so one compressed MiB of zeros repeats byte
    for byte. The trailer's CRC covers only what the compressor saw; a reader that stops
    at its cap never gets there (that is the point).
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    start = packer.compress(header_and_data) + packer.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 20)
    block = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    assert packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH) == block
    return start + block * (gib * 1024 - 2) + packer.flush()


def test_gzip_bomb_stops_at_the_cap(tmp_path, bundle, no_inference):
    bomb = write(tmp_path / "bomb.nii.gz", gzip_bomb(nifti_bytes()))
    assert bomb.stat().st_size < 8 << 20
    assert zlib.decompressobj(31).decompress(bomb.read_bytes()[:1 << 20], 64 << 20)[344:347] == b"n+1"
    line = run(tmp_path, bomb, bundle, match="(a gzip bomb?)")
    assert float(line.split("decompresses to more than ")[1].split(" MiB")[0]) < 18   # stopped at the cap


# ----------------------------------------------------------------------------- arguments
def test_output_named_only_an_extension(tmp_path, bundle, no_inference):
    source = write_volume(tmp_path / "in.nii.gz", phantom_volume(), lps_affine())
    run(tmp_path, source, bundle, "--out", tmp_path / ".nii.gz", match="only the extension")


@pytest.mark.parametrize("threads", ["2147483648", "0", "1025"])
def test_threads_out_of_bounds(tmp_path, bundle, no_inference, threads):
    source = write_volume(tmp_path / "in.nii.gz", phantom_volume(), lps_affine())
    run(tmp_path, source, bundle, "--threads", threads, match="--threads must be between 1 and 1024")


def test_model_space_slice_is_checked_before_it_is_allocated(monkeypatch):
    """50 mm voxels resampled to a 0.01 mm bundle grid: refused before the probe slice exists."""
    from galip.runtime.preprocess import PreprocessConfig, plan_volume
    data = np.random.default_rng(0).random((64, 64, 4), dtype=np.float32) + 1
    monkeypatch.setenv(BUDGET_ENV, "64M")
    with pytest.raises(InputError, match=r"one slice resampled from 50 x 50 mm to 0.01 x 0.01 mm \(315001 x 315001"):
        plan_volume(data, np.diag([50.0, 50.0, 50.0, 1.0]), "mri", PreprocessConfig(spacing=0.01))
    plan, _ = plan_volume(data, np.diag([1.0, 1.0, 1.0, 1.0]), "mri", PreprocessConfig(spacing=1.0))
    assert plan.model_shape == (64, 64)
