"""The demo bundle shipped with the package: checksums verify and it translates for real."""
import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from galip.runtime import cli
from galip.runtime.bundle import load_bundle


def test_shipped_bundle_verifies():
    bundle = load_bundle(cli.SHIPPED_BUNDLE)   # sha256 of every file checked
    assert {"T1", "T2", "PD"} <= set(bundle.domains)
    assert "generator" in bundle.manifest["models"]


def test_galip_run_without_bundle_uses_the_shipped_one(tmp_path):
    rng = np.random.default_rng(0)
    data = np.zeros((30, 34, 5), np.float32)
    data[6:24, 7:27] = 100 + 20 * rng.random((18, 20, 5))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    source = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), source)
    result = CliRunner().invoke(cli.app, [str(source), "--to", "T2"])
    assert result.exit_code == 0, result.output
    out = nib.load(tmp_path / "t1_T2.nii.gz")
    assert out.shape == data.shape and np.allclose(out.affine, affine)
    assert np.isfinite(out.get_fdata()).all()


def test_shipped_bundle_is_what_the_demo_recipe_makes():
    """``make demo-bundle`` re-makes the shipped models: the steps and shapes its recipe
    trains are the ones the shipped manifest records."""
    from galip.export import demo_bundle as recipe
    from galip.train.i2i.unet import UNetConfig

    models = load_bundle(cli.SHIPPED_BUNDLE).manifest["models"]
    generator = models["generator"]
    assert generator["trained_steps"] == recipe.DEMO_STEPS
    assert UNetConfig.from_dict(generator["unet"]) == recipe.demo_config().unet
    # trained bias-free, so the runtime divides the coil's field out for it (runtime/bias.py)
    assert generator["preprocess"]["bias_field"] == recipe.demo_config().bias_field
    assert generator["domains"] == recipe.DEMO_DOMAINS.split(",")
    assert models["diffusion"]["T2"]["trained_steps"] == recipe.DEMO_DIFFUSION["steps"]
    assert models["diffusion"]["T2"]["net"]["ch"] == recipe.DEMO_DIFFUSION_WIDTH
