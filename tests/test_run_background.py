"""galip-run keeps air as air: zero black level, the foreground mask, source kinds, planes/TTA,
and a bias-free bundle's coil field."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from galip.runtime import bias
from galip.runtime.cli import app
from galip.runtime.errors import GalipError
from galip.runtime.foreground import head_mask
from galip.runtime.intensity import fit_intensity

from fixtures_bundle import build_tiny_bundle, lps_affine, oblique_affine, write_volume

pytest.importorskip("onnxruntime")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def head_volume(shape=(40, 44, 12), background: float = 30.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An MR-like head: bright ellipsoid with a dark (bone) ring inside, Rician-like air of
    level ``background`` around it. Returns (data, true head mask)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((grid[0] / 0.75) ** 2 + (grid[1] / 0.8) ** 2 + (grid[2] / 3.0) ** 2)
    head = r < 1.0
    data = np.where(head, 400 + 150 * grid[0] + 100 * np.cos(6 * grid[1]), 0.0)
    data[(r > 0.8) & (r < 0.88)] = 0.0                               # the skull: no signal
    data = np.hypot(data + background * rng.standard_normal(shape), background * rng.standard_normal(shape))
    return data.astype(np.float32), head


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def mri_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "mri", diffusion_targets=(), source_kinds=("mri",))


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def test_head_mask_covers_the_head_with_its_dark_skull_and_nothing_else():
    data, head = head_volume()
    mask = head_mask(data, fit_intensity(data, "mri"))
    assert mask[head].mean() > 0.99                                 # the dark ring is inside
    outside = ~ndimage.binary_dilation(head, iterations=4)           # smoothing + margin: <= 4 voxels
    assert mask[outside].mean() < 0.01


def test_mri_output_has_a_zero_black_level_and_background_outside_the_head(tmp_path, bundle):
    data, head = head_volume()
    source = write_volume(tmp_path / "h.nii.gz", data, oblique_affine())
    for target in ("T1", "T2"):                                      # identity and inverting domains
        out = tmp_path / f"{target}.nii.gz"
        result = run(source, "--to", target, "--bundle", bundle, "--out", out)
        assert result.exit_code == 0, result.output
        got = _load(out)
        corners = np.zeros_like(head)
        corners[:4, :4], corners[-4:, -4:] = True, True
        assert (got[corners] == 0).all(), target                    # air is exactly 0, not the source's floor
        assert got[head].mean() > 0
    # without the mask the inverting T2 lights the air up: the mask is what keeps it dark
    out = tmp_path / "nomask.nii.gz"
    assert run(source, "--to", "T2", "--bundle", bundle, "--out", out, "--mask", "none").exit_code == 0
    assert (_load(out)[corners] > 0).mean() > 0.9


def test_mask_file_is_used_and_checked(tmp_path, bundle):
    data, head = head_volume()
    source = write_volume(tmp_path / "h.nii.gz", data, lps_affine())
    box = np.zeros(data.shape, np.uint8)
    box[10:30, 10:34, :] = 1
    mask = write_volume(tmp_path / "box.nii.gz", box, lps_affine())
    out = tmp_path / "o.nii.gz"
    assert run(source, "--to", "T2", "--bundle", bundle, "--out", out, "--mask", mask).exit_code == 0
    got = _load(out)
    assert (got[box == 0] == 0).all() and (got[box == 1] > 0).mean() > 0.9
    wrong = write_volume(tmp_path / "wrong.nii.gz", box[:-1], lps_affine())
    result = run(source, "--to", "T2", "--bundle", bundle, "--out", tmp_path / "w.nii.gz", "--mask", wrong)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "grid" in result.output and not (tmp_path / "w.nii.gz").exists()


def test_ct_into_an_mri_only_bundle_exits_2_and_writes_nothing(tmp_path, mri_bundle):
    data, head = head_volume()
    ct = np.where(head, 40.0, -1000.0).astype(np.float32)
    source = write_volume(tmp_path / "ct.nii.gz", ct, lps_affine())
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(source, "--to", "T2", "--bundle", mri_bundle)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "CT" in result.output and "MRI" in result.output and "--any-source" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # an explicit override translates it
    assert run(source, "--to", "T2", "--bundle", mri_bundle, "--any-source").exit_code == 0
    # a bundle whose generator lists CT among its domains takes it (kinds derived from domains)
    mixed = build_tiny_bundle(tmp_path / "mixed", diffusion_targets=())
    assert run(source, "--to", "T2", "--bundle", mixed, "--out", tmp_path / "m.nii.gz").exit_code == 0


@pytest.mark.parametrize("extra", [["--planes", "3"], ["--tta", "flip"], ["--planes", "3", "--tta", "flip"]])
def test_planes_and_flip_keep_shape_affine_and_an_identity(tmp_path, bundle, extra):
    data, _ = head_volume(shape=(24, 28, 20))
    affine = oblique_affine()
    source = write_volume(tmp_path / "h.nii.gz", data, affine)
    plain, fused = tmp_path / "plain.nii.gz", tmp_path / "fused.nii.gz"
    assert run(source, "--to", "T1", "--bundle", bundle, "--out", plain, "--mask", "none").exit_code == 0
    result = run(source, "--to", "T1", "--bundle", bundle, "--out", fused, "--mask", "none", *extra)
    assert result.exit_code == 0, result.output
    image = nib.load(str(fused))
    assert image.shape == data.shape
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    # the T1 domain of the tiny generator is the identity: every pass, mirrored or along
    # another axis, gives the same volume back, so their average does too
    np.testing.assert_allclose(_load(fused), _load(plain), rtol=0, atol=1e-3 * float(_load(plain).max()))


@pytest.mark.parametrize("option, value", [("--planes", "2"), ("--tta", "rotate"), ("--mask", "nothing.nii.gz")])
def test_bad_fusion_and_mask_options_are_one_line(tmp_path, bundle, option, value):
    data, _ = head_volume()
    source = write_volume(tmp_path / "h.nii.gz", data, lps_affine())
    result = run(source, "--to", "T2", "--bundle", bundle, option, value)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_bias_free_bundle_translates_the_flat_source_and_gives_the_field_back(tmp_path, monkeypatch):
    data, head = head_volume()
    x = np.linspace(-1, 1, data.shape[0])[:, None, None]
    field = np.broadcast_to(np.exp(0.3 * x), data.shape).astype(np.float32)
    fits = []
    # N4 itself is tested in test_generator_prior; here the field is known, so the check is exact
    monkeypatch.setattr(bias, "n4_field", lambda volume, mask, voxel_mm: fits.append(mask) or field)
    n4 = build_tiny_bundle(tmp_path / "n4", diffusion_targets=(), bias_field="n4")
    plain = build_tiny_bundle(tmp_path / "plain", diffusion_targets=())
    biased = write_volume(tmp_path / "biased.nii.gz", data * field, lps_affine())
    flat = write_volume(tmp_path / "flat.nii.gz", data, lps_affine())
    # one mask for every run (the auto mask of a biased and a flat head differ at the edge)
    mask = write_volume(tmp_path / "head.nii.gz", head.astype(np.uint8), lps_affine())
    outs = {}
    for name, source, bundle in (("n4", biased, n4), ("plain", flat, plain), ("ignored", biased, plain)):
        outs[name] = tmp_path / f"{name}.nii.gz"
        result = run(source, "--to", "T2", "--bundle", bundle, "--out", outs[name], "--mask", mask)
        assert result.exit_code == 0, result.output
        assert ("bias field divided out" in result.output) == (bundle == n4)   # the summary says so
    assert len(fits) == 1 and np.array_equal(fits[0], head)         # fitted once, in the mask
    got, want = _load(outs["n4"]), _load(outs["plain"]) * field
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * float(want.max()))
    # a bundle without the setting translates the biased source as it is: the inverted
    # contrast then carries the field upside down
    assert np.abs(_load(outs["ignored"]) - want).max() > 0.05 * float(want.max())


def test_flatten_leaves_ct_and_bias_free_bundles_alone_and_names_bad_settings():
    data, _ = head_volume()
    for kind, method in (("ct", "n4"), ("mri", "none")):
        same, field = bias.flatten(data, np.eye(4), kind, method, (0.5, 99.5))
        assert same is data and field is None
    with pytest.raises(GalipError, match="bias_field"):
        bias.flatten(data, np.eye(4), "mri", "n3", (0.5, 99.5))


@pytest.mark.parametrize("shape", [(30, 30, 1), (6, 6, 3), (2, 2, 2)])
def test_n4_fits_a_single_slice_and_small_volumes(tmp_path, shape):
    pytest.importorskip("SimpleITK")
    n4 = build_tiny_bundle(tmp_path / "n4", diffusion_targets=(), bias_field="n4")
    data = np.random.default_rng(0).uniform(10, 20, shape).astype(np.float32)
    source, out = write_volume(tmp_path / "s.nii.gz", data, lps_affine()), tmp_path / "o.nii.gz"
    result = run(source, "--to", "T2", "--bundle", n4, "--out", out, "--mask", "none")
    assert result.exit_code == 0, result.output
    assert _load(out).shape == shape and np.isfinite(_load(out)).all()


def test_a_volume_n4_cannot_fit_is_one_line(tmp_path):
    pytest.importorskip("SimpleITK")
    n4 = build_tiny_bundle(tmp_path / "n4", diffusion_targets=(), bias_field="n4")
    data = np.random.default_rng(0).uniform(10, 20, (1, 1, 40)).astype(np.float32)
    source, out = write_volume(tmp_path / "line.nii.gz", data, lps_affine()), tmp_path / "o.nii.gz"
    result = run(source, "--to", "T2", "--bundle", n4, "--out", out)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "N4" in result.output and not out.exists()
