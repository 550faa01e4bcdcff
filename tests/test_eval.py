"""galip-eval: the papers' per-slice max-normalised PSNR/SSIM (galip.bench.metrics)."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from galip.bench.eval_cli import app
from galip.bench.metrics import PSNR_CAP, evaluate, normalise, psnr

runner = CliRunner()


def _save(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def _reference(shape=(24, 20, 5), seed=0) -> np.ndarray:
    """Smooth blob slices in [0, 0.5] with one voxel = 1 per slice (so its max is 1) and an
    empty (all-zero) first slice along axis 2."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ref = np.zeros(shape)
    for k in range(1, shape[2]):
        blob = np.exp(-((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2) / (2 * 5.0**2))
        ref[:, :, k] = 0.5 * blob * rng.uniform(0.5, 1.0)
        ref[2, 3, k] = 1.0
    return ref


def test_identical_volumes_score_the_psnr_cap_and_ssim_one():
    ref = _reference()
    score = evaluate(ref, ref)
    assert score.psnr == PSNR_CAP          # documented: identical slices score the cap, not inf
    assert score.ssim == pytest.approx(1.0)
    assert score.slices == ref.shape[2] - 1 and score.skipped == 1   # the empty slice is skipped


def test_known_noise_level_gives_the_expected_psnr():
    """pred = ref ± sigma everywhere except the max voxel, staying below it: the per-slice
    max normalisation is then the identity on both, so MSE = sigma² (n - 1) / n exactly."""
    ref = _reference()
    sigma = 0.01
    signs = np.where(np.random.default_rng(1).random(ref.shape) < 0.5, -1.0, 1.0)
    pred = ref + sigma * signs
    pred[2, 3, :] = ref[2, 3, :]               # keep each slice's max voxel (and its value 1)
    n = ref.shape[0] * ref.shape[1]
    expected = -10 * math.log10(sigma**2 * (n - 1) / n)
    score = evaluate(pred, ref)
    assert score.psnr == pytest.approx(expected, abs=1e-6)
    assert 0.0 < score.ssim < 1.0


def test_ssim_in_unit_interval_and_per_slice_max_normalisation():
    ref = _reference()
    noisy = np.clip(ref + np.random.default_rng(2).normal(0, 0.2, ref.shape), 0, None)
    score = evaluate(noisy, ref)
    assert all(0.0 < s["ssim"] <= 1.0 for s in score.per_slice)
    # a slice scaled by a constant is the same slice after dividing by its own max
    assert evaluate(ref * 7.5, ref).psnr == pytest.approx(PSNR_CAP)
    assert np.array_equal(normalise(np.zeros((3, 3))), np.zeros((3, 3)))
    assert psnr(np.zeros(4), np.ones(4)) == pytest.approx(0.0)


def test_mask_restricts_the_evaluation():
    ref = _reference()
    pred = ref.copy()
    pred[:2] += 0.3                           # errors only outside the mask below
    mask = np.zeros(ref.shape, np.uint8)
    mask[6:, :, :] = 1
    mask[2, 3, :] = 1
    assert evaluate(pred, ref).psnr < 40
    assert evaluate(pred, ref, mask).psnr == PSNR_CAP


def test_cli_table_json_and_folder_pairing(tmp_path):
    ref = _reference()
    pred = np.clip(ref + np.random.default_rng(3).normal(0, 0.05, ref.shape), 0, None)
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    for name in ("sub-000_T2w", "sub-001_T2w"):
        _save(tmp_path / "pred" / f"{name}.nii.gz", pred)
        _save(tmp_path / "ref" / f"{name}.nii.gz", ref)
    _save(tmp_path / "ref" / "sub-002_T2w.nii.gz", ref)       # unpaired: a note, not an error
    result = runner.invoke(app, [str(tmp_path / "pred"), str(tmp_path / "ref"), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "sub-001_T2w" in result.output and "only in" in result.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["overall"]["volumes"] == 2
    single = evaluate(pred, ref)
    assert data["volumes"]["sub-000_T2w"]["psnr"] == pytest.approx(single.psnr, rel=1e-5)
    assert data["metric"]["psnr_cap_db"] == PSNR_CAP


def test_cli_single_files_and_identical(tmp_path):
    ref = _save(tmp_path / "ref.nii.gz", _reference())
    result = runner.invoke(app, [str(ref), str(ref)])
    assert result.exit_code == 0, result.output
    assert "100.00" in result.output and "1.0000" in result.output


@pytest.mark.parametrize("problem", ["shape", "missing", "mask-shape"])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, problem):
    ref = _save(tmp_path / "ref.nii.gz", _reference())
    pred = tmp_path / "pred.nii.gz"
    args = [str(pred), str(ref)]
    if problem == "shape":
        _save(pred, _reference(shape=(24, 22, 5)))
    elif problem == "mask-shape":
        _save(pred, _reference())
        args += ["--mask", str(_save(tmp_path / "mask.nii.gz", np.ones((4, 4, 4))))]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert ("shape" in lines[0]) if problem != "missing" else ("nothing at that path" in lines[0])
