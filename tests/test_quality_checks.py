"""The quality harness's parts on inputs with known answers: baselines, separation,
hallucination, stripes, goal verdicts and --run-option parsing (galip.bench)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from galip.bench import artifacts
from galip.bench.baselines import BASELINES, histogram_match, identity, negated_histogram_match
from galip.bench.metrics import PSNR_CAP, evaluate
from galip.bench.quality_report import GOALS, judge
from galip.bench.run_options import parse_run_options
from galip.runtime import pipeline
from galip.runtime.errors import ConfigError

SHAPE = (28, 30, 26)


def _head(shape=SHAPE, radius=0.6) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, textured 'brain' inside a sphere (values in (0.2, 1]) and the sphere mask."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grid))
    inside = r < radius
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.random(shape), 3.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    return np.where(inside, 0.2 + 0.8 * texture, 0.0).astype(np.float32), inside


def _column(shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A textured cylinder along axis 2 (slices 6 to 19): its slices change only by texture,
    as neighbouring brain slices do, so a slice-wise brightness change stands out."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    inside = np.zeros(shape, bool)
    inside[:, :, 6:20] = (x**2 + y**2 < 0.6)[:, :, None]
    texture = ndimage.gaussian_filter(np.random.default_rng(2).random(shape), 3.0)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    return np.where(inside, 0.2 + 0.8 * texture, 0.0).astype(np.float32), inside


# ----------------------------------------------------------------------------- baselines
def test_identity_baseline_on_its_own_source_scores_the_cap_and_one():
    volume, brain = _head()
    guess = identity(volume, np.zeros_like(volume), brain, brain)
    score = evaluate(guess, volume, brain, axis=2)
    assert score.psnr == PSNR_CAP and score.ssim == pytest.approx(1.0)   # the metric's "infinity"


def test_histogram_matching_recovers_a_monotone_map_and_the_negated_one_an_inverting_one():
    source, brain = _head()
    increasing = np.where(brain, 2.0 * source + 0.1, 0.0)
    decreasing = np.where(brain, 1.3 - source, 0.0)           # a T1 -> T2 like inversion
    assert np.allclose(histogram_match(source, increasing, brain, brain), increasing, atol=1e-5)
    assert np.allclose(negated_histogram_match(source, decreasing, brain, brain), decreasing, atol=1e-5)
    wrong_way = histogram_match(source, decreasing, brain, brain)
    assert artifacts.pearson(wrong_way, decreasing, brain) < -0.9
    assert not wrong_way[~brain].any()                          # background stays 0


def test_histogram_matching_takes_another_subjects_values_inside_its_region():
    source, brain = _head()
    other, other_brain = _head(radius=0.5)                      # another size: another voxel count
    reference = np.where(other_brain, 5.0 + other, 0.0)
    guess = histogram_match(source, reference, brain, other_brain)
    assert guess[brain].min() >= reference[other_brain].min() - 1e-5
    assert guess[brain].max() <= reference[other_brain].max() + 1e-5
    assert set(BASELINES) == {"identity", "histogram match", "histogram match (negated)"}


# ----------------------------------------------------------------------------- separation
def test_pearson_known_values():
    x, brain = _head()
    assert artifacts.pearson(x, 3 * x + 1, brain) == pytest.approx(1.0)
    assert artifacts.pearson(x, -x, brain) == pytest.approx(-1.0)
    assert artifacts.pearson(x, np.ones_like(x), brain) == 0.0


# ----------------------------------------------------------------------------- hallucination
def test_hallucination_counts_exactly_the_invented_blob():
    truth, brain = _head()
    output = truth.copy()
    output[0:3, 0:3, 0:4] = 0.5                                 # 36 voxels far outside the head
    background = artifacts.background_mask(truth, head=brain)
    assert background[0:3, 0:3, 0:4].all() and not (background & brain).any()
    assert artifacts.hallucination(output, background, brain) == pytest.approx(36 / background.sum())
    assert artifacts.hallucination(truth, background, brain) == 0.0


def test_source_foreground_finds_the_head_without_a_mask_file():
    truth, brain = _head()
    noisy = truth + 0.01 * np.random.default_rng(1).random(truth.shape).astype(np.float32)
    found = artifacts.source_foreground(noisy)
    # Smoothing before the threshold moves the edge by about a voxel, never more than the margin.
    assert found[ndimage.binary_erosion(brain)].all()
    assert not found[~ndimage.binary_dilation(brain, iterations=artifacts.BACKGROUND_MARGIN)].any()
    assert artifacts.background_mask(noisy)[0, 0, 0] and not artifacts.background_mask(noisy)[brain].any()


# ----------------------------------------------------------------------------- stripes
def test_stripe_score_is_one_for_clean_or_blurred_output_and_high_for_stripes():
    truth, brain = _column()
    clean = artifacts.stripes(truth, truth, brain, axis=2)
    assert clean.score == pytest.approx(1.0) and clean.stripe_slices == []
    blurred = artifacts.stripes(ndimage.gaussian_filter(truth, 1.0), truth, brain, axis=2)
    assert blurred.score == pytest.approx(1.0, abs=0.15) and blurred.stripe_slices == []

    striped = truth.copy()
    striped[:, :, [10, 14]] *= 1.3                              # two 30 % brighter slices
    score = artifacts.stripes(striped, truth, brain, axis=2)
    assert score.score > 1.3
    assert set(score.stripe_slices) == {9, 10, 13, 14}          # the steps into and out of each
    # The same bands seen along another axis are in-plane: no stripes through the slicing axis.
    assert artifacts.stripes(striped, truth, brain, axis=0).score < 1.0


def test_a_blob_in_an_empty_slice_is_a_stripe_slice():
    truth, brain = _column()
    output = truth.copy()
    output[5:20, 5:20, 1] = 0.8                                 # an invented slab above the head
    found = artifacts.stripes(output, truth, brain, axis=2)
    assert {0, 1} <= set(found.stripe_slices) and found.score > 1.0


# ----------------------------------------------------------------------------- goals
def _direction(psnr=28.0, ssim=0.95, whole=25.0, base_psnr=26.0, base_ssim=0.92, halluc=0.0,
               sep=(0.3, 0.35), stripe_slices=0) -> dict:
    best = {"psnr": {"name": "identity", "value": base_psnr}, "ssim": {"name": "identity", "value": base_ssim}}
    return {"model": {"brain": {"psnr": psnr, "ssim": ssim}, "whole": {"psnr": whole, "ssim": 0.8}},
            "best_baseline": best, "hallucination": {"output": halluc},
            "separation": {"PD": {"output_r": sep[0], "truth_r": sep[1]}},
            "stripes": {"stripe_slices": stripe_slices}}


def test_goal_verdicts_meet_and_miss_at_the_issue_thresholds():
    assert all(v["met"] for v in judge(_direction()).values())
    missed = judge(_direction(psnr=26.9, ssim=0.929, whole=23.9, base_psnr=26.5, base_ssim=0.92, halluc=0.01,
                              sep=(0.96, 0.4), stripe_slices=3))
    assert [k for k, v in missed.items() if v["met"]] == []
    assert missed["psnr_margin"]["value"] == pytest.approx(0.4)
    assert judge({**_direction(), "separation": {}})["separation"]["met"] is None   # one target: n/a
    assert len(GOALS) == 8


# ----------------------------------------------------------------------------- --run-option
def test_run_options_reach_settings_with_their_types():
    options = parse_run_options(["threads=1", "steps=none", "precision=fp16", "eta=0.5", "sampler=ddpm"])
    assert options.settings == {"threads": 1, "steps": None, "precision": "fp16", "eta": 0.5, "sampler": "ddpm"}
    assert options.prepare == {} and options.translate == {}


@pytest.mark.parametrize("pair, words", [("threads", "key=value"), ("colour=red", "not an option"),
                                         ("threads=two", "integer"), ("sampler=euler", "one of"),
                                         ("batch=0", "at least 1")])
def test_bad_run_options_are_one_line_config_errors(pair, words):
    with pytest.raises(ConfigError, match=words):
        parse_run_options([pair])


def test_run_options_follow_new_runtime_keywords(monkeypatch):
    """An option the runtime gains (e.g. translate(..., mask=..., planes=...)) passes through unchanged."""
    original = pipeline.Translator.translate

    def translate(self, data, affine, kind="mri", *, on_slices=None, on_step=None, smooth: str = "none",
                  passes: int = 1, mirror: bool = False):
        return original(self, data, affine, kind)

    monkeypatch.setattr(pipeline.Translator, "translate", translate)
    options = parse_run_options(["smooth=none", "passes=3", "mirror=true"])
    assert options.translate == {"smooth": "none", "passes": 3, "mirror": True}
