"""galip-run end to end on the tiny onnx.helper bundle (onnxruntime CPU), and the numpy schedule.

The tiny generator's T1 is the identity, so a T1 run returns the (intensity-clipped) input:
geometry, orientation and header travel through the whole chain exactly. The tiny diffusion
model's ε knows the answer (the inverted source, within K/2), so a wrong schedule, data
range or x_prev → x_t feedback shows as a wrong volume, not only as a changed one.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_bundle import (K, build_tiny_bundle, lps_affine, oblique_affine, phantom_volume,
                             write_volume)
from galip.runtime import schedule as S
from galip.runtime.bundle import load_bundle
from galip.runtime.cli import app, default_output
from galip.runtime.errors import ConfigError
from galip.runtime.intensity import fit_intensity
from galip.runtime.pipeline import Settings, prepare

pytest.importorskip("onnxruntime")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def resampling_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny1mm", spacing=1.0, diffusion_targets=())


def _expected_identity(data: np.ndarray) -> np.ndarray:
    """What the identity domain gives without a mask: the source clipped to its robust
    range, with the black level (its low percentile) at 0."""
    imap = fit_intensity(data, "mri", percentiles=(0.5, 99.5))
    return np.clip(data, imap.lo, imap.hi) - imap.lo, imap


def _load(path):
    image = nib.load(str(path))
    return image, np.asarray(image.dataobj, dtype=np.float32)


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("affine_name, codes", [("oblique", (1, 4)), ("lps", (2, 0))])
def test_identity_domain_returns_input_with_its_geometry(tmp_path, bundle, affine_name, codes):
    affine = {"oblique": oblique_affine(), "lps": lps_affine()}[affine_name]
    data = phantom_volume()
    source = write_volume(tmp_path / "sub_T1w.nii.gz", data, affine, codes)
    out = tmp_path / "out.nii.gz"
    result = run(source, "--to", "T1", "--bundle", bundle, "--out", out, "--batch", 4, "--mask", "none")
    assert result.exit_code == 0, result.output
    image, got = _load(out)
    ref = nib.load(str(source))
    assert got.shape == data.shape
    np.testing.assert_allclose(image.affine, ref.affine, atol=1e-5)
    assert int(image.header["qform_code"]) == codes[0] and int(image.header["sform_code"]) == codes[1]
    assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(ref.affine)
    assert image.header.get_xyzt_units() == ref.header.get_xyzt_units()
    assert image.header["descrip"].item().decode() == "galip generator tiny -> T1"
    expected, imap = _expected_identity(data)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * (imap.hi - imap.lo))


def test_resampling_bundle_keeps_shape_affine_and_content(tmp_path, resampling_bundle):
    affine = oblique_affine()
    data = phantom_volume()
    source = write_volume(tmp_path / "in.nii", data, affine)
    out = tmp_path / "out.nii.gz"
    assert run(source, "--to", "T1", "--bundle", resampling_bundle, "--out", out, "--mask", "none").exit_code == 0
    image, got = _load(out)
    assert got.shape == data.shape
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    expected, _ = _expected_identity(data)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99


def test_singleton_fourth_dimension_is_accepted(tmp_path, bundle):
    data = phantom_volume()[..., None]
    source = write_volume(tmp_path / "in4d.nii.gz", data, lps_affine())
    result = run(source, "--to", "T1", "--bundle", bundle)
    assert result.exit_code == 0, result.output
    image, got = _load(tmp_path / "in4d_T1.nii.gz")
    assert got.shape == data.shape[:3]


# ----------------------------------------------------------------------------- domains
def test_the_domain_changes_the_output(tmp_path, bundle):
    source = write_volume(tmp_path / "s.nii.gz", phantom_volume(), oblique_affine())
    outputs = {}
    for domain in ("T1", "T2", "PD"):
        out = tmp_path / f"{domain}.nii.gz"
        assert run(source, "--to", domain, "--bundle", bundle, "--out", out, "--mask", "none").exit_code == 0
        outputs[domain] = _load(out)[1]
    for a, b in (("T1", "T2"), ("T1", "PD"), ("T2", "PD")):
        assert np.abs(outputs[a] - outputs[b]).mean() > 0.05 * np.abs(outputs[a]).mean(), (a, b)
    # T2 of the tiny generator inverts the contrast: anti-correlated with the source.
    assert np.corrcoef(outputs["T1"].ravel(), outputs["T2"].ravel())[0, 1] < -0.9


def test_ct_target_is_written_in_the_ct_window(tmp_path, bundle):
    source = write_volume(tmp_path / "s.nii.gz", phantom_volume(), lps_affine())
    out = tmp_path / "ct.nii.gz"
    assert run(source, "--to", "ct", "--bundle", bundle, "--out", out).exit_code == 0
    got = _load(out)[1]
    assert got.min() >= -1000.0 - 1e-3 and got.max() <= 1000.0 + 1e-3
    assert got.max() - got.min() > 500.0          # spans the window, not the MRI's range


def test_default_output_name_preview_and_summary(tmp_path, bundle):
    source = write_volume(tmp_path / "sub-000_T1w.nii.gz", phantom_volume(), lps_affine())
    before = source.read_bytes()
    result = run(source, "--to", "T2w", "--bundle", bundle, "--preview", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    assert default_output(source, "T2") == tmp_path / "sub-000_T1w_T2.nii.gz"
    assert (tmp_path / "sub-000_T1w_T2.nii.gz").is_file()
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert source.read_bytes() == before
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "onnxruntime-cpu fp32" in lines[0] and "picked" in lines[0] and " s;" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "sub-000_T1w.nii.gz", "sub-000_T1w_T2.nii.gz"]
    # --overwrite replaces both
    again = run(source, "--to", "T2", "--bundle", bundle, "--preview", tmp_path / "p.png", "--overwrite")
    assert again.exit_code == 0, again.output


def test_batches_are_bounded_by_batch(tmp_path, bundle):
    """The runner only ever sees --batch slices (the last batch fewer)."""
    data = phantom_volume(shape=(18, 22, 7))
    translator = prepare(load_bundle(bundle), "T2", Settings(batch=3))
    seen = []
    make = translator.factory

    def spying_factory():
        runner = make()
        infer = runner.infer
        runner.infer = lambda feed: (seen.append(feed["image"].shape), infer(feed))[1]
        return runner

    spied = dataclasses.replace(translator, factory=spying_factory)
    result = spied.translate(data, lps_affine(), "mri")
    assert [s[0] for s in seen] == [3, 3, 1]
    assert all(s[1:] == (1, 32, 32) for s in seen)
    whole = prepare(load_bundle(bundle), "T2", Settings(batch=16)).translate(data, lps_affine(), "mri")
    np.testing.assert_allclose(result.data, whole.data, rtol=0, atol=1e-4 * np.abs(whole.data).max())


# ----------------------------------------------------------------------------- diffusion
def _inverted(data):
    """What the tiny models' T2 gives without a mask: 1 - the normalised source, scaled."""
    clipped, imap = _expected_identity(data)
    return imap.hi - imap.lo - clipped, imap


def test_diffusion_lands_on_the_models_answer(tmp_path, bundle):
    data = phantom_volume()
    source = write_volume(tmp_path / "s.nii.gz", data, oblique_affine(), (1, 1))
    out = tmp_path / "d.nii.gz"
    result = run(source, "--to", "T2", "--model", "diffusion", "--bundle", bundle, "--out", out, "--steps", 3,
                 "--mask", "none")
    assert result.exit_code == 0, result.output
    assert "ddim, 3 steps" in result.stdout
    image, got = _load(out)
    assert got.shape == data.shape
    np.testing.assert_allclose(image.affine, oblique_affine(), atol=1e-5)
    assert image.header["descrip"].item().decode() == "galip diffusion tiny -> T2"
    expected, imap = _inverted(data)
    error = np.abs(got - expected) / (imap.hi - imap.lo)
    assert error.max() <= K / 2 + 1e-3


def test_seeded_diffusion_is_deterministic_and_independent_of_batch(tmp_path, bundle):
    data = phantom_volume(shape=(18, 22, 5))

    def translate(**kw):
        settings = Settings(model="diffusion", steps=3, **kw)
        return prepare(load_bundle(bundle), "T2", settings).translate(data, lps_affine(), "mri")

    first = translate(seed=7, eta=1.0, batch=2)
    span = first.plan.source_map.hi - first.plan.source_map.lo
    np.testing.assert_array_equal(first.data, translate(seed=7, eta=1.0, batch=2).data)
    # one noise stream shared by every slice: the batch size does not matter
    np.testing.assert_allclose(first.data, translate(seed=7, eta=1.0, batch=5).data, rtol=0, atol=1e-6 * span)
    # the seed does (ancestral and deterministic DDIM alike, through x_T)
    assert np.abs(first.data - translate(seed=8, eta=1.0, batch=2).data).max() > 1e-4 * span
    ddim = translate(seed=8, eta=0.0)
    assert np.abs(ddim.data - translate(seed=9, eta=0.0).data).max() > 1e-4 * span
    np.testing.assert_array_equal(ddim.data, translate(seed=8, eta=0.0).data)


@pytest.mark.parametrize("affine_name", ["lps", "oblique"])
def test_slices_translate_a_slab_and_leave_the_rest_background(tmp_path, bundle, affine_name):
    """--slices A:B: same shape and affine, the slab equals the whole run's slices (same
    seed, whole-volume normalisation), everything outside it is the target's background."""
    data = phantom_volume(shape=(18, 22, 9))
    affine = lps_affine() if affine_name == "lps" else oblique_affine()
    source = write_volume(tmp_path / "s.nii.gz", data, affine, (1, 1))
    runs = {}
    for name, extra in (("whole", []), ("slab", ["--slices", "2:5"])):
        out = tmp_path / f"{name}.nii.gz"
        result = run(source, "--to", "T2", "--model", "diffusion", "--bundle", bundle, "--out", out,
                     "--steps", 3, "--eta", 1, "--mask", "none", "--seed", 4, *extra)
        assert result.exit_code == 0, result.output
        image, runs[name] = _load(out)
        assert runs[name].shape == data.shape
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    from galip.runtime.geometry import voxel_axis
    axis = voxel_axis(affine, load_bundle(bundle).preprocess["axis"])
    inside = np.zeros(data.shape, bool)
    np.moveaxis(inside, axis, 0)[2:5] = True
    span = np.abs(runs["whole"]).max()
    np.testing.assert_allclose(runs["slab"][inside], runs["whole"][inside], rtol=0, atol=1e-5 * span)
    assert np.all(runs["slab"][~inside] == 0.0) and np.abs(runs["whole"][~inside]).max() > 0
    assert "3 slices" in result.stdout


def test_slices_outside_the_volume_exit_2(tmp_path, bundle):
    source = write_volume(tmp_path / "s.nii.gz", phantom_volume(shape=(18, 22, 9)), lps_affine(), (1, 1))
    for bad, message in (("5:40", "runs past"), ("4:4", "A:B"), ("x", "A:B")):
        result = run(source, "--to", "T2", "--bundle", bundle, "--out", tmp_path / "o.nii.gz", "--slices", bad)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "o.nii.gz").exists()


def test_ddpm_runs_every_timestep(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "t50", timesteps=50)
    data = phantom_volume(shape=(18, 22, 3))
    source = write_volume(tmp_path / "s.nii.gz", data, lps_affine())
    result = run(source, "--to", "T2", "--model", "diffusion", "--sampler", "ddpm", "--bundle", bundle,
                 "--mask", "none")
    assert result.exit_code == 0, result.output
    assert "ddpm, 50 steps" in result.stdout
    expected, imap = _inverted(data)
    got = _load(tmp_path / "s_T2.nii.gz")[1]
    assert (np.abs(got - expected) / (imap.hi - imap.lo)).max() <= K / 2 + 1e-3


# ----------------------------------------------------------------------------- no torch
def test_runtime_translation_never_imports_torch(tmp_path, bundle):
    source = write_volume(tmp_path / "s.nii.gz", phantom_volume(shape=(18, 22, 3)), lps_affine())
    script = textwrap.dedent(f"""
        import json, sys
        from galip.runtime.cli import app
        codes = []
        for extra in ([], ["--model", "diffusion", "--steps", "2"]):
            try:
                app([{str(source)!r}, "--to", "T2", "--bundle", {str(bundle)!r}, "--overwrite", *extra])
            except SystemExit as exit:
                codes.append(exit.code)
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] == "torch" or m.startswith(("galip.train", "galip.export")))
        print(json.dumps({{"codes": codes, "heavy": heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0], "heavy": []}


# ----------------------------------------------------------------------------- schedule
def test_ddpm_table_is_the_closed_form_posterior():
    schedule = S.NoiseSchedule()
    table = S.step_table(schedule, "ddpm")
    T = schedule.timesteps
    betas = np.linspace(1e-4, 0.02, T)
    alpha_bar = np.cumprod(1 - betas)
    assert len(table) == T
    np.testing.assert_array_equal(table.timestep, np.arange(T - 1, -1, -1))
    np.testing.assert_allclose(table.alpha_bar_t, alpha_bar[::-1], rtol=1e-12)
    prev = np.concatenate([alpha_bar[-2::-1], [1.0]])
    t = table.timestep
    posterior = (1 - prev) / (1 - alpha_bar[t]) * betas[t]            # β̃_t, Ho et al. Eq. 7
    np.testing.assert_allclose(table.sigma ** 2, posterior, rtol=1e-9, atol=1e-15)
    # posterior mean μ̃ = √ᾱ_prev β/(1−ᾱ_t) x̂₀ + √α (1−ᾱ_prev)/(1−ᾱ_t) x_t (Ho et al. Eq. 7)
    np.testing.assert_allclose(table.coef_x0, np.sqrt(prev) * betas[t] / (1 - alpha_bar[t]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table.coef_xt, np.sqrt(1 - betas[t]) * (1 - prev) / (1 - alpha_bar[t]),
                               rtol=1e-9, atol=1e-12)
    assert np.all(table.coef_x0_last == 0.0)
    assert table.sigma[-1] == 0.0 and table.coef_xt[-1] == 0.0 and table.coef_x0[-1] == 1.0


def test_ddim_eta_zero_is_deterministic_and_eta_one_over_all_steps_is_ddpm():
    schedule = S.NoiseSchedule()
    ddim = S.step_table(schedule, "ddim", 50, eta=0.0)
    assert np.all(ddim.sigma == 0.0)
    full = S.step_table(schedule, "ddim", schedule.timesteps, eta=1.0)
    ddpm = S.step_table(schedule, "ddpm")
    for field in S.STEP_SCALARS:
        np.testing.assert_allclose(getattr(full, field), getattr(ddpm, field), rtol=1e-12, atol=1e-15)
    half = S.step_table(schedule, "ddim", 20, eta=0.5)
    one = S.step_table(schedule, "ddim", 20, eta=1.0)
    np.testing.assert_allclose(half.sigma, 0.5 * one.sigma)
    feeds = list(half.feeds())
    assert len(feeds) == 20 and tuple(feeds[0]) == S.STEP_SCALARS
    assert all(v.dtype == np.float32 and v.shape == (1,) for v in feeds[0].values())


def test_ddim_eta_zero_is_dpm_solver_first_order():
    """DDIM (η = 0) is DPM-Solver++'s first-order update (Lu et al. 2022, §4.1): the
    multistep table equals it wherever it has no x̂₀^last term (first and last step)."""
    schedule = S.NoiseSchedule()
    ddim, dpm = S.step_table(schedule, "ddim", 10), S.step_table(schedule, "dpmpp2m", 10)
    for i in (0, 9):
        assert dpm.coef_x0_last[i] == 0.0
        np.testing.assert_allclose([dpm.coef_xt[i], dpm.coef_x0[i]], [ddim.coef_xt[i], ddim.coef_x0[i]], rtol=1e-10)
    # in between, the second-order terms still sum to the first-order weight of x̂₀
    np.testing.assert_allclose(dpm.coef_x0 + dpm.coef_x0_last, ddim.coef_x0, rtol=1e-10)
    np.testing.assert_allclose(dpm.coef_xt, ddim.coef_xt, rtol=1e-10)
    assert np.all(dpm.coef_x0_last[1:9] < 0) and np.all(dpm.sigma == 0)
    with pytest.raises(S.ConfigError, match="deterministic"):
        S.step_table(schedule, "dpmpp2m", 10, eta=0.5)


@pytest.mark.parametrize("T", [1000, 50, 7])
def test_ddim_timesteps_strictly_decrease_from_t_minus_1(T):
    for steps in range(2, T + 1):
        t = S.ddim_timesteps(T, steps, "linspace")
        assert len(t) == steps and t[0] == T - 1 and t[-1] == 0, (T, steps)
        assert np.all(np.diff(t) < 0), (T, steps)
        t = S.ddim_timesteps(T, steps)  # trailing, the default: ends at T/steps - 1
        assert len(t) == steps and t[0] == T - 1 and t[-1] == round(T / steps) - 1, (T, steps)
        assert np.all(np.diff(t) < 0), (T, steps)
    assert S.ddim_timesteps(T, 1).tolist() == [T - 1]
    assert S.ddim_timesteps(T, T).tolist() == list(range(T - 1, -1, -1))


def test_trailing_spacing_matches_the_training_sampler():
    T = 1000
    for steps in (1, 3, 7, 50, 333, 1000):
        stride = T / steps
        expected = [int(round(T - i * stride)) - 1 for i in range(steps)]   # train/midiffusion/schedule.py
        t = S.ddim_timesteps(T, steps, "trailing")
        assert t.tolist() == expected and np.all(np.diff(t) < 0)


def test_schedule_rejects_bad_settings():
    schedule = S.NoiseSchedule(timesteps=10)
    for bad in (0, 11):
        with pytest.raises(ConfigError, match="--steps"):
            S.step_table(schedule, "ddim", bad)
    with pytest.raises(ConfigError, match="ddpm"):
        S.step_table(schedule, "ddpm", 5)
    with pytest.raises(ConfigError, match="sampler"):
        S.step_table(schedule, "euler", 5)


def test_no_runtime_module_imports_torch_train_or_export():
    """Static check of every import in runtime/, lazy ones inside functions included."""
    import ast
    import galip.runtime as runtime_pkg
    root = Path(runtime_pkg.__file__).resolve().parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        package = ["galip", "runtime", *path.relative_to(root).parent.parts]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "torch" or name.startswith(("galip.train", "galip.export")):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    assert offenders == []


def test_another_sampler_does_not_inherit_the_bundles_steps_and_eta(bundle):
    """The manifest's steps/eta belong to its sampler (here ddim, 4 steps): --sampler dpmpp2m
    alone runs the contract's default step count (capped at T), with no eta."""
    from galip.runtime.contract import DEFAULT_STEPS
    loaded = load_bundle(bundle)
    spec = loaded.diffusion["T2"]
    own = prepare(loaded, "T2", Settings(model="diffusion")).table
    other = prepare(loaded, "T2", Settings(model="diffusion", sampler="dpmpp2m")).table
    assert (own.sampler, len(own)) == (spec.sampler.default, spec.sampler.steps)
    assert (other.sampler, len(other), other.eta) == ("dpmpp2m", min(DEFAULT_STEPS, spec.schedule.timesteps), 0.0)
