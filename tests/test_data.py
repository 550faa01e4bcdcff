"""galip-data: tissue contrast, co-registration, determinism and the CLI (4 mm grids, seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from galip.runtime.errors import ConfigError
from galip.train import data_cli, phantom


def _template_missing() -> bool:
    try:
        phantom.template_paths()
    except ConfigError:
        return True
    return False


needs_template = pytest.mark.skipif(
    _template_missing(), reason="nilearn with the ICBM152 template is not installed (pip install 'galip[data]')"
)
SPACING = 4.0  # coarse grid: a subject takes ~0.05 s once the anatomy is resampled
CONTRASTS = ("T1w", "T2w", "PDw")
runner = CliRunner()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def subjects() -> list[phantom.Subject]:
    anatomy = phantom.load_anatomy()
    return [phantom.make_subject(anatomy, index, 0, SPACING, 0.02) for index in range(3)]


@needs_template
def test_contrast_order_follows_tissue(subjects):
    for subject in subjects:
        median = {
            contrast: {t: float(np.median(subject.images[contrast][f > 0.8])) for t, f in subject.fractions.items()}
            for contrast in CONTRASTS
        }
        assert all((f > 0.8).sum() >= 20 for f in subject.fractions.values())
        t1, t2, pd = median["T1w"], median["T2w"], median["PDw"]
        assert t1["WM"] > t1["GM"] > t1["CSF"], (subject.id, t1)
        assert t2["CSF"] > t2["GM"] > t2["WM"], (subject.id, t2)
        assert pd["GM"] > pd["WM"], (subject.id, pd)


@needs_template
def test_contrasts_are_coregistered_on_the_scaled_mni_grid(subjects):
    anatomy = phantom.load_anatomy()
    shape, affine = phantom.grid_for(anatomy, SPACING)
    for subject in subjects:
        assert set(subject.images) == {*CONTRASTS, "mask", "head"}
        assert {im.shape for im in subject.images.values()} == {shape}
        assert {name: (d.shape, a.tolist()) for name, (d, a) in subject.volumes.items()} == {
            name: (shape, affine.tolist()) for name in subject.images
        }
        assert all(subject.images[c].dtype == np.float32 for c in CONTRASTS)
        assert subject.images["mask"].dtype == np.uint8
    # A coarse voxel's centre is the mean of the 1 mm voxels it covers (-98 + 1.5 mm).
    np.testing.assert_allclose(np.diag(affine)[:3], SPACING)
    np.testing.assert_allclose(affine[:3, 3], anatomy.affine[:3, 3] + (SPACING - 1) / 2)


@needs_template
def test_subjects_differ_but_share_anatomy(subjects):
    a, b = (s.images["mask"].astype(bool) for s in subjects[:2])
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert 0.85 < dice < 1.0  # warped a few mm, still the same brain
    assert subjects[0].tissues != subjects[1].tissues


@needs_template
def test_noise_is_rician_at_the_requested_level_and_leaves_anatomy_alone():
    anatomy = phantom.load_anatomy()
    clean, noisy = (phantom.make_subject(anatomy, 5, 0, SPACING, noise) for noise in (0.0, 0.05))
    assert clean.tissues == noisy.tissues
    np.testing.assert_array_equal(clean.images["mask"], noisy.images["mask"])
    empty = sum([*clean.fractions.values(), *clean.head_fractions.values()]) == 0
    assert empty.sum() > 10_000 and not clean.images["T2w"][empty].any()
    for contrast in CONTRASTS:
        # Rician magnitude of zero signal: mean sigma * sqrt(pi / 2), sigma = 5 % of pure WM.
        sigma = 0.05 * phantom.tissue_signals(noisy.tissues)[contrast]["WM"]
        assert noisy.images[contrast][empty].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.03)


def test_tissue_jitter_stays_within_ten_percent_and_keeps_contrast():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tissues = phantom.draw_tissues(rng)
        assert phantom.keeps_textbook_order(tissues)
        for name, params in tissues.items():
            for key, value in params.items():
                assert abs(value / phantom.TISSUES[name][key] - 1) <= phantom.JITTER + 1e-3


def test_smooth_field_rms_is_exact_on_any_grid():
    coef = phantom.smooth_coefficients(np.random.default_rng(1), 3, 2.0, constant=True)
    anatomy = phantom.Anatomy({"brain": np.zeros((40, 48, 36), np.float32)}, np.eye(4), 1.0, (40, 48, 36))
    field = phantom.eval_field(coef, phantom.cosine_bases(anatomy, 3))
    assert np.sqrt(np.mean(field.astype(np.float64) ** 2)) == pytest.approx(2.0, rel=1e-4)


@needs_template
def test_same_seed_gives_identical_bytes(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        data_cli.write_dataset(tmp_path / name, subjects=1, seed=seed, spacing=SPACING, noise=0.02)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(("T1w.nii.gz", "T2w.nii.gz", "PDw.nii.gz")))


@needs_template
def test_cli_writes_index_and_coregistered_files(tmp_path):
    out = tmp_path / "data"
    args = ["--out", str(out), "--subjects", "2", "--spacing", str(SPACING), "--seed", "1"]
    result = runner.invoke(data_cli.app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 2 subject(s)" in result.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["seed"] == 1 and index["spacing_mm"] == SPACING and index["galip_version"]
    assert [s["id"] for s in index["subjects"]] == ["sub-000", "sub-001"]
    for entry in index["subjects"]:
        assert set(entry["tissues"]) == {"CSF", "GM", "WM", "fat", "muscle", "skin", "skull"}
        for name, rel in entry["files"].items():
            image = nib.load(out / rel)
            assert list(image.shape) == index["shape"]
            np.testing.assert_array_equal(image.affine, index["affine"])
            assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 4
            assert image.header.get_xyzt_units()[0] == "mm"
            assert image.get_data_dtype() == (np.uint8 if name in ("mask", "head") else np.float32)

    # Second run without --overwrite: one line, exit 2, nothing touched.
    before = _files(out)
    result = runner.invoke(data_cli.app, args)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "--overwrite" in result.output
    assert _files(out) == before

    # --overwrite with fewer subjects removes the subject it no longer writes.
    result = runner.invoke(data_cli.app, [*args[:3], "1", *args[4:], "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "sub-001").exists() and (out / "sub-000" / "sub-000_T1w.nii.gz").is_file()


@pytest.mark.parametrize(
    "option, value, expected",
    [("--spacing", "0.5", "spacing"), ("--spacing", "nan", "spacing"), ("--subjects", "0", "subjects"),
     ("--noise", "-0.1", "noise"), ("--seed", "-1", "seed")],
)
def test_cli_rejects_bad_values_in_one_line(tmp_path, option, value, expected):
    result = runner.invoke(data_cli.app, ["--out", str(tmp_path / "d"), option, value])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and expected in result.output
    assert not (tmp_path / "d").exists()


def test_cli_without_nilearn_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(phantom, "find_spec", lambda name: None)
    monkeypatch.setattr(phantom, "load_anatomy", phantom.load_anatomy.__wrapped__)  # bypass the cache
    result = runner.invoke(data_cli.app, ["--out", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "pip install 'galip[data]'" in result.output
    assert not (tmp_path / "d").exists()
