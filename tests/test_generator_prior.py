"""Training-free pseudo-targets (train/i2i/prior.py) and the prior term of the generator loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from galip.runtime.domains import parse_domains
from galip.train.i2i.losses import l1_where_known
from galip.runtime.bias import n4_field
from galip.runtime.errors import ConfigError
from galip.train.i2i.prior import (decided, load_slices_with_pseudo_targets, matched, prefers_negation,
                                   target_signs)
from galip.train.slices import load_training_slices

from test_generator_train import DOMAINS, data_dir, tiny_config  # noqa: F401  (fixture)


def _tissues(broad: float, thin: float, phase: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A box of a broad tissue crossed by thin sheets of another (every 6th x-plane from
    ``phase``), with a little noise; returns (volume, region)."""
    rng = np.random.default_rng(seed)
    volume = np.zeros((40, 40, 20), np.float32)
    region = np.zeros(volume.shape, bool)
    region[2:38, 2:38, 2:18] = True
    volume[region] = broad
    sheets = np.zeros(volume.shape, bool)
    sheets[phase::6] = True
    volume[region & sheets] = thin
    return volume + 0.01 * rng.standard_normal(volume.shape).astype(np.float32) * region, region


def test_the_sign_follows_where_the_bright_tissue_sits():
    source, region = _tissues(broad=1.0, thin=0.2, phase=0, seed=0)       # broad tissue bright
    inverted, ref_region = _tissues(broad=0.3, thin=1.0, phase=3, seed=1)  # another subject: thin bright
    alike, _ = _tissues(broad=0.9, thin=0.1, phase=3, seed=2)
    assert prefers_negation(source, inverted, region, ref_region)
    assert not prefers_negation(source, alike, region, ref_region)
    # either way the match reproduces the reference's intensities, and only inside the region
    out = matched(source, inverted, region, ref_region, negate=True)
    assert np.all(out[~region] == 0)
    assert abs(float(np.median(out[region])) - float(np.median(inverted[ref_region]))) < 0.05
    thin_mean = out[region & (np.arange(40)[:, None, None] % 6 == 0)].mean()
    assert thin_mean > 0.9 and out[region].mean() < 0.5                 # the sheets came out bright


def test_n4_finds_a_smooth_bias_field():
    volume, region = _tissues(broad=1.0, thin=0.4, phase=0, seed=3)
    x = np.linspace(-1, 1, volume.shape[0])[:, None, None]
    true_log = np.broadcast_to(0.3 * x - 0.2 * x ** 2, volume.shape)
    estimate = n4_field(volume * np.exp(true_log), region, (2.0, 2.0, 2.0))
    assert estimate.shape == volume.shape and np.all(estimate > 0)
    assert np.corrcoef(np.log(estimate[region]), true_log[region])[0, 1] > 0.9
    flat = n4_field(volume, region, (2.0, 2.0, 2.0))                       # no field: N4 finds (almost) none
    assert np.log(flat[region]).std() < 0.2 * true_log[region].std()


def test_n4_fits_on_a_grid_of_about_4_mm_whatever_the_voxels(monkeypatch):
    sitk = pytest.importorskip("SimpleITK")
    volume, region = _tissues(broad=1.0, thin=0.4, phase=0, seed=3)
    seen, shrink = [], sitk.Shrink
    monkeypatch.setattr(sitk, "Shrink", lambda image, factors: seen.append(list(factors)) or shrink(image, factors))
    n4_field(volume, region, (1.0, 2.0, 4.0))
    assert seen == [[1, 2, 4]] * 2                          # SimpleITK's axis order: the array's reversed


def test_a_pair_gets_a_prior_only_on_a_unanimous_vote():
    assert decided({"brain": 1.0, "head": 0.5}) and decided({"brain": 0.0})
    assert not decided({"brain": 0.75, "head": 0.0}) and not decided({"head": 0.5})


def test_a_split_vote_gets_no_prior_or_the_plain_match():
    split, clear = {"brain": 0.75, "head": 0.0}, {"brain": 1.0, "head": 0.25}
    assert target_signs(split) is None and target_signs(split, "skip") is None
    assert target_signs(split, "plain") == {"brain": False, "head": False}
    # a decided pair keeps each region's majority sign, whatever a split vote would get
    assert target_signs(clear, "skip") == target_signs(clear, "plain") == {"brain": True, "head": False}
    with pytest.raises(ValueError, match="split_vote"):
        target_signs(split, "negated")


def test_slices_carry_a_pseudo_target_per_domain(data_dir):  # noqa: F811
    domains = parse_domains(DOMAINS)
    slices, signs = load_slices_with_pseudo_targets(data_dir, domains, 32, min_foreground=0.0)
    plain = load_training_slices(data_dir, domains, 32, min_foreground=0.0)
    # the fixture's contrasts are powers of one blob: every pair agrees in sign, unanimously
    assert set(signs) == {f"{a}->{b}" for a in ("T1", "T2", "PD") for b in ("T1", "T2", "PD") if a != b}
    assert all(shares == {"head": 0.0} for shares in signs.values())
    for d, domain in enumerate(domains):
        stack = slices[domain.name]
        assert stack.shape == (4, 4, 32, 32) and stack.dtype == np.float32
        np.testing.assert_array_equal(stack[:, 0], plain[domain.name])   # channel 0: the plain slices
        np.testing.assert_array_equal(stack[:, 1 + d], stack[:, 0])       # its own domain: itself
        assert np.all(np.isfinite(stack)) and stack.min() >= 0 and stack.max() <= 1


def test_bias_corrected_pseudo_targets_keep_their_shape_and_range(data_dir):  # noqa: F811
    domains = parse_domains(DOMAINS)
    plain, signs = load_slices_with_pseudo_targets(data_dir, domains, 32, min_foreground=0.0)
    corrected, corrected_signs = load_slices_with_pseudo_targets(data_dir, domains, 32, min_foreground=0.0,
                                                                 bias_correction=True)
    assert corrected_signs == signs
    for name, stack in corrected.items():
        assert stack.shape == plain[name].shape and np.all(np.isfinite(stack))
        assert stack.min() >= 0 and stack.max() <= 1
        np.testing.assert_array_equal(stack[:, 0], plain[name][:, 0])   # the slices themselves are untouched


def test_bias_free_slices_are_what_the_plain_loader_gives_with_the_same_setting(data_dir):  # noqa: F811
    domains = parse_domains(DOMAINS)
    flat, _ = load_slices_with_pseudo_targets(data_dir, domains, 32, min_foreground=0.0, bias_field="n4")
    plain = load_training_slices(data_dir, domains, 32, min_foreground=0.0, bias_field="n4")
    biased = load_training_slices(data_dir, domains, 32, min_foreground=0.0)
    for name, stack in flat.items():
        np.testing.assert_array_equal(stack[:, 0], plain[name])     # one chain: the runtime's flatten
        assert not np.array_equal(plain[name], biased[name])        # and it did divide something out
        assert np.all(np.isfinite(stack)) and stack.min() >= 0 and stack.max() <= 1


def test_a_back_translated_domain_learns_from_the_other_domains_subjects(data_dir):  # noqa: F811
    domains = parse_domains(DOMAINS)                                 # T1, T2, PD: one subject each
    slices, signs = load_slices_with_pseudo_targets(data_dir, domains, 32, min_foreground=0.0,
                                                    back_translate=("PD",))
    assert not any(pair.startswith("PD->") for pair in signs)       # PD's own slices are not matched
    pd = slices["PD"]
    assert pd.shape == (12, 4, 32, 32)                               # its 4 slices + 4 from T1's, 4 from T2's
    assert np.isnan(pd[:4, 1:3]).all() and np.isfinite(pd[4:]).all()
    np.testing.assert_array_equal(pd[:, 3], pd[:, 0])                # its own channel: the input again
    t1, t2 = slices["T1"], slices["T2"]
    # the synthetic PD is T1's pseudo-target for PD, paired with that T1 slice and its T2 target
    np.testing.assert_array_equal(pd[4:8], t1[:, [3, 1, 2, 3]])
    np.testing.assert_array_equal(pd[8:], t2[:, [3, 1, 2, 3]])
    with pytest.raises(ConfigError, match="back_translate"):
        load_slices_with_pseudo_targets(data_dir, domains, 32, back_translate=("T1", "T2", "PD"))


def test_prior_term_ignores_missing_pseudo_targets():
    x = torch.tensor([0.0, 1.0, 2.0])
    assert float(l1_where_known(x, torch.tensor([1.0, float("nan"), 4.0]))) == pytest.approx(1.5)
    assert float(l1_where_known(x, torch.full((3,), float("nan")))) == 0.0


def test_train_step_adds_the_prior_term_only_with_pseudo_targets_and_its_weight_drops_late():
    from galip.train.i2i.trainer import I2ITrainer
    config = tiny_config("none")
    config.weights.prior, config.prior_late, config.prior_late_from = 5.0, 1.0, 2
    trainer = I2ITrainer(config, parse_domains(DOMAINS))
    assert [trainer.weights_at(s).prior for s in (0, 1, 2, 5)] == [5.0, 5.0, 1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.rand(2, 4, 32, 32, generator=g), torch.rand(2, 4, 32, 32, generator=g)
    x_b[:, 1:] = float("nan")                                             # b has no pseudo-target for a
    losses = trainer.train_step(x_a, x_b, 0, 1)
    assert np.isfinite(losses["G"]) and losses["prior"] > 0
    plain = I2ITrainer(config, parse_domains(DOMAINS)).train_step(x_a[:, :1], x_b[:, :1], 0, 1)
    assert "prior" not in plain


def test_a_prior_only_step_trains_no_discriminator_and_runs_no_cycle():
    from galip.train.i2i.trainer import I2ITrainer
    config = tiny_config("none")
    config.weights.cycle, config.weights.adv, config.weights.prior = 0.0, 0.0, 5.0
    trainer = I2ITrainer(config, parse_domains(DOMAINS))
    before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    calls = []
    trainer.generator.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    losses = trainer.train_step(torch.rand(2, 4, 32, 32, generator=g), torch.rand(2, 4, 32, 32, generator=g), 0, 1)
    assert set(losses) == {"identity", "prior", "G"} and losses["prior"] > 0
    assert len(calls) == 1                                   # translations and identities; no cycle pass
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.discriminator.parameters()))
    assert trainer.step == 1
