"""galip-run on bad input: one line on stderr, exit code 2, no output, the input untouched.

Each case runs the CLI in-process (CliRunner) in a fresh folder holding the input; the
folder's listing (so no stray temporary file either) and the input's bytes are compared
before and after.
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_bundle import build_tiny_bundle, lps_affine, phantom_volume, write_volume
from helpers_cli import run_fails
from galip.runtime import api, cli

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def good_volume(folder: Path, name: str = "in.nii.gz") -> Path:
    return write_volume(folder / name, phantom_volume(), lps_affine())


# ----------------------------------------------------------------------------- bad inputs
def test_not_a_nifti(tmp_path, bundle):
    source = tmp_path / "notes.nii.gz"
    source.write_bytes(gzip.compress(b"just some text, not an image\n" * 20))
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, match="NIfTI")
    plain = tmp_path / "photo.nii"
    plain.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(600))
    run_fails(tmp_path, plain, "--to", "T2", "--bundle", bundle, match="NIfTI")


def test_truncated_gzip(tmp_path, bundle):
    whole = good_volume(tmp_path, "whole.nii.gz").read_bytes()
    source = tmp_path / "cut.nii.gz"
    source.write_bytes(whole[: len(whole) // 2])
    (tmp_path / "whole.nii.gz").unlink()
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, match="truncated")


def test_two_dimensional_image(tmp_path, bundle):
    source = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), str(source))
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, match="3-D")


def test_four_dimensional_series(tmp_path, bundle):
    source = write_volume(tmp_path / "series.nii.gz", np.stack([phantom_volume()] * 3, -1), lps_affine())
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, match="3 volumes")


def test_all_zero_volume(tmp_path, bundle):
    source = write_volume(tmp_path / "zero.nii.gz", np.zeros((18, 22, 9), np.float32), lps_affine())
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, match="all")


def test_nan_and_inf_voxels_are_replaced_with_one_warning(tmp_path, bundle):
    data = phantom_volume()
    data[5, 5, 2], data[6, 7, 3], data[10, 10, 4] = np.nan, np.inf, -np.inf
    source = write_volume(tmp_path / "nan.nii.gz", data, lps_affine())
    before = source.read_bytes()
    result = CliRunner().invoke(cli.app, [str(source), "--to", "T2", "--bundle", str(bundle)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "3 NaN/Inf" in lines[0]
    out = np.asarray(nib.load(str(tmp_path / "nan_T2.nii.gz")).dataobj)
    assert np.all(np.isfinite(out)) and out.shape == data.shape
    assert source.read_bytes() == before


# ----------------------------------------------------------------------------- bad arguments
def test_unknown_target_lists_the_bundles_domains(tmp_path, bundle):
    source = good_volume(tmp_path)
    line = run_fails(tmp_path, source, "--to", "FLAIR", "--bundle", bundle)
    assert "FLAIR" in line and all(d in line for d in ("T1", "T2", "PD", "CT"))


def test_diffusion_without_a_model_for_the_target_names_the_targets_that_have_one(tmp_path, bundle):
    source = good_volume(tmp_path)
    line = run_fails(tmp_path, source, "--to", "PD", "--model", "diffusion", "--bundle", bundle)
    assert "PD" in line and "diffusion targets: T2" in line


@pytest.mark.parametrize("option, value", [("--batch", 0), ("--batch", -3), ("--steps", 0), ("--seed", -1)])
def test_bad_numbers(tmp_path, bundle, option, value):
    source = good_volume(tmp_path)
    run_fails(tmp_path, source, "--to", "T2", "--model", "diffusion", "--bundle", bundle, option, value, match=option)


def test_steps_beyond_the_schedule(tmp_path, bundle):
    source = good_volume(tmp_path)
    run_fails(tmp_path, source, "--to", "T2", "--model", "diffusion", "--steps", 1001, "--bundle", bundle,
              match="between 1 and 1000")


# ----------------------------------------------------------------------------- bad bundles
def test_missing_bundle_file(tmp_path, bundle):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    (broken / "generator.onnx").unlink()
    data = tmp_path / "data"
    data.mkdir()
    source = good_volume(data)
    run_fails(data, source, "--to", "T2", "--bundle", broken, match="generator.onnx")


def test_checksum_mismatch(tmp_path, bundle):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    graph = broken / "diffusion_T2_step.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    data = tmp_path / "data"
    data.mkdir()
    source = good_volume(data)
    run_fails(data, source, "--to", "T2", "--bundle", broken, match="changed after export")   # its size
    graph.write_bytes(graph.read_bytes()[:-1])
    generator = broken / "generator.onnx"      # same size, other bytes: found when the run opens it
    generator.write_bytes(generator.read_bytes().replace(b"galip", b"GALIP"))
    run_fails(data, source, "--to", "T2", "--bundle", broken, match="sha256 mismatch for generator.onnx")


def test_missing_bundle_folder(tmp_path):
    source = good_volume(tmp_path)
    run_fails(tmp_path, source, "--to", "T2", "--bundle", tmp_path / "nowhere", match="does not exist")


def test_no_shipped_bundle_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "SHIPPED_BUNDLE", tmp_path / "not-shipped")
    source = good_volume(tmp_path)
    line = run_fails(tmp_path, source, "--to", "T2")
    assert "no bundle is shipped" in line and "galip-export" in line and "--bundle" in line


# ----------------------------------------------------------------------------- bad outputs
def test_existing_output_without_overwrite(tmp_path, bundle):
    source = good_volume(tmp_path)
    (tmp_path / "in_T2.nii.gz").write_bytes(b"an earlier result")
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, match="--overwrite")
    (tmp_path / "p.png").write_bytes(b"an earlier preview")
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, "--out", tmp_path / "new.nii.gz",
              "--preview", tmp_path / "p.png", match="--overwrite")


def test_output_onto_the_input_is_refused_even_with_overwrite(tmp_path, bundle):
    source = good_volume(tmp_path)
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, "--out", source, "--overwrite",
              match="replace the input")


def test_missing_output_folder(tmp_path, bundle):
    source = good_volume(tmp_path)
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, "--out", tmp_path / "no" / "x.nii.gz",
              match="no folder")


def test_bad_output_suffix(tmp_path, bundle):
    source = good_volume(tmp_path)
    run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, "--out", tmp_path / "x.mgz", match=".nii")


def test_unwritable_output_folder(tmp_path, bundle):
    source = good_volume(tmp_path)
    if os.geteuid() == 0:     # root writes through permission bits; sysfs refuses new files even to root
        folder = Path("/sys")
    else:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o555)
    try:
        run_fails(tmp_path, source, "--to", "T2", "--bundle", bundle, "--out", folder / "x.nii.gz",
                  match="writable")
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o755)
