"""``galip-eval quality`` end to end on the tiny bundle and tiny held-out phantoms (8 mm)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures_bundle import build_tiny_bundle
from galip.bench.eval_cli import app

runner = CliRunner()
DIRECTIONS = {"T1->T2", "T1->PD", "T2->T1", "T2->PD", "PD->T1", "PD->T2"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny bundle (T1 is its identity, T2 an inversion) and one generator quality run."""
    root = tmp_path_factory.mktemp("quality")
    bundle = build_tiny_bundle(root / "bundle", diffusion_targets=("T2",))
    out = root / "out"
    result = runner.invoke(app, ["quality", str(bundle), "--out", str(out), "--subjects", "2", "--seed", "5",
                                 "--spacing", "8", "--run-option", "threads=1", "--run-option", "batch=4"])
    return bundle, out, result


def test_quality_writes_json_table_and_montage_for_every_direction(tiny):
    bundle, out, result = tiny
    assert result.exit_code == 0, result.output
    report = json.loads((out / "quality.json").read_text())
    assert set(report["directions"]) == DIRECTIONS              # CT: a bundle domain the data lacks
    assert report["data"]["generated"] and report["data"]["seed"] == 5
    assert report["runtime"]["settings"]["threads"] == 1 and report["runtime"]["settings"]["batch"] == 4
    assert "--run-option threads=1" in report["command"]
    for d in report["directions"].values():
        assert set(d["goals"]) >= {"psnr", "ssim", "psnr_margin", "hallucination", "separation", "stripes"}
        assert len(d["subjects"]) == 2 and d["translate_s"] > 0
        assert d["best_baseline"]["psnr"]["value"] == max(b["brain"]["psnr"] for b in d["baselines"].values())
    table = (out / "quality.md").read_text()
    assert table.count("\n| ") == 1 + len(DIRECTIONS)          # header + one row per direction
    assert "T1→T2" in table and report["command"] in table
    from matplotlib.image import imread
    image = imread(out / "montage.png")
    assert image.shape[0] > 400 and image.shape[1] > 800
    assert "quality.md" in result.output and "| T1→T2 |" in result.output


def test_an_identity_model_scores_what_its_known_output_scores(tiny):
    """The tiny generator's T1 is the identity, so X→T1 writes the source clipped to the
    runtime's percentile map, black level at 0, air outside the source's head mask at 0:
    scoring that here must give the harness's figures, which checks translation, pairing
    with the right truth and mask, and the mean over subjects."""
    from galip.bench.metrics import evaluate
    from galip.runtime.foreground import head_mask
    from galip.runtime.intensity import fit_intensity
    from galip.runtime.volume import load_volume
    out = tiny[1]
    report = json.loads((out / "quality.json").read_text())
    for source in ("T2", "PD"):
        expected = []
        for sid in ("sub-000", "sub-001"):
            load = lambda name: load_volume(out / "data" / sid / f"{sid}_{name}.nii.gz", require_signal=False).data  # noqa: E731
            src, brain = load(f"{source}w"), load("mask") > 0
            known = fit_intensity(src, "mri")
            output = np.where(head_mask(src, known), np.clip(src, known.lo, known.hi) - known.lo, 0.0)
            expected.append(evaluate(output, load("T1w"), brain, 2))
        d = report["directions"][f"{source}->T1"]
        assert d["model"]["brain"]["psnr"] == pytest.approx(np.mean([e.psnr for e in expected]), abs=1e-3)
        assert d["model"]["brain"]["ssim"] == pytest.approx(np.mean([e.ssim for e in expected]), abs=1e-5)
    t2 = report["directions"]["T1->T2"]
    # T2 is an inversion of the source: its output anti-correlates with the PD output (≈ 0.5·x).
    assert t2["separation"]["PD"]["output_r"] < -0.5
    assert -1 <= t2["separation"]["PD"]["truth_r"] <= 1


def test_the_diffusion_model_is_scored_on_a_slice_range(tiny, tmp_path):
    bundle, out, _ = tiny
    result = runner.invoke(app, ["quality", str(bundle), "--out", str(tmp_path / "diff"), "--data", str(out / "data"),
                                 "--model", "diffusion", "--slices", "10:13", "--run-option", "steps=2",
                                 "--run-option", "threads=1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "diff" / "quality.json").read_text())
    assert set(report["directions"]) == {"T1->T2", "PD->T2"}  # the one diffusion target
    assert report["data"]["slices"] == [10, 13] and not report["data"]["generated"] and report["data"]["seed"] == 5
    d = report["directions"]["T1->T2"]
    assert d["separation"] == {} and d["goals"]["separation"]["met"] is None
    assert np.isfinite(d["model"]["brain"]["psnr"]) and d["stripes"]["ratios"][2] > 0


@pytest.mark.parametrize("args, words", [
    (["--subjects", "1"], "at least 2"),
    (["--run-option", "colour=red"], "not an option"),
    (["--slices", "5:2"], "--slices"),
    (["--model", "gan"], "--model"),
])
def test_user_errors_are_one_line_and_exit_2(tiny, tmp_path, args, words):
    bundle = tiny[0]
    result = runner.invoke(app, ["quality", str(bundle), "--out", str(tmp_path / "q"), "--spacing", "8", *args])
    assert result.exit_code == 2 and words in result.output, result.output
    assert "Traceback" not in result.output


def test_a_non_empty_out_needs_overwrite(tiny):
    bundle, out, _ = tiny
    result = runner.invoke(app, ["quality", str(bundle), "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_the_plain_scoring_command_stays_the_default(tiny, tmp_path):
    data = tiny[1] / "data" / "sub-000"
    t2 = str(data / "sub-000_T2w.nii.gz")
    result = runner.invoke(app, [t2, t2, "--mask", str(data / "sub-000_mask.nii.gz")])
    assert result.exit_code == 0 and "100.00" in result.output, result.output
    assert "quality" in runner.invoke(app, ["--help"]).output
