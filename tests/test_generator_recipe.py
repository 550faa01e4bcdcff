"""The demo training recipe: failure-mode probes, random crops, every slice, the run log."""
from __future__ import annotations

import json

import numpy as np
import torch

from galip.runtime.domains import parse_domains
from galip.train.i2i import loop
from galip.train.i2i.monitor import condition_check, probe_batch, warning
from galip.train.slices import SliceSampler, load_training_slices

from test_generator_train import DOMAINS, data_dir, tiny_config  # noqa: F401  (fixture)

NAMES = ["T1", "T2", "PD"]


class _Fake(torch.nn.Module):
    """G(x, t) = f_t(x) for hand-picked per-target maps."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, image, target):
        return torch.stack([self.maps[int(t)](x) for x, t in zip(image, target)])


def _probes():
    rng = np.random.default_rng(0)
    stack = rng.random((6, 32, 32)).astype(np.float32) * 0.9 + 0.06
    stack[0] = 0.0                                                  # an empty slice is never a probe
    return probe_batch({n: stack for n in NAMES}, n=3)


def test_probe_flags_a_brightness_flip_and_a_target_blind_generator():
    probes = _probes()
    assert all(float(p.amax(dim=(1, 2, 3)).min()) > 0 for p in probes.values())
    flip = condition_check(_Fake([lambda x: 1 - x] * 3), probes, NAMES)
    assert flip["idt_r"] < -0.99 and flip["sep_r"] > 0.99
    assert warning(flip) == "IDENTITY LOST TARGET-BLIND"
    blind = condition_check(_Fake([lambda x: x] * 3), probes, NAMES)
    assert blind["idt_r"] > 0.99 and warning(blind) == "TARGET-BLIND"
    # outputs that differ with the target as much as real contrasts do are not target-blind
    maps = [lambda x: x, lambda x: 1 - x, lambda x: (x - 0.5) ** 2]
    assert condition_check(_Fake(maps), probes, NAMES)["sep_r"] < 0.5


def test_random_crops_are_windows_of_the_slices_reproducible_and_resumable():
    stack = np.arange(3 * 40 * 40, dtype=np.float32).reshape(3, 40, 40)
    a, b = SliceSampler({"T1": stack}, 5, seed=2, crop=16), SliceSampler({"T1": stack}, 5, seed=2, crop=16)
    first = a.sample("T1")
    assert first.shape == (5, 1, 16, 16)
    for window in first[:, 0]:                                      # a contiguous window of one slice
        s, rest = divmod(int(window[0, 0]), 1600)
        y, x = divmod(rest, 40)
        np.testing.assert_array_equal(window, stack[s, y:y + 16, x:x + 16])
    np.testing.assert_array_equal(first, b.sample("T1"))
    state = a.state_dict()
    nxt = a.sample("T1")
    b.load_state_dict(state)
    np.testing.assert_array_equal(nxt, b.sample("T1"))


def test_min_foreground_zero_keeps_empty_slices_and_axes_add_slices(data_dir):  # noqa: F811
    domains = parse_domains(DOMAINS)
    kept = load_training_slices(data_dir, domains, 32, min_foreground=0.0)
    assert all(len(stack) == 4 for stack in kept.values())        # one subject each, 4 axial slices
    three = load_training_slices(data_dir, domains, 32, min_foreground=0.0, axes=(0, 1, 2))
    assert len(three["T1"]) == 40 + 40 + 4


def test_recipe_run_writes_the_probe_log(data_dir, tmp_path):  # noqa: F811
    config = tiny_config("none", steps=4)
    config.crop, config.min_foreground, config.axes = 16, 0.0, (2,)
    result = loop.train_generator(tmp_path, data_dir, DOMAINS, {}, progress=False, trainer_config=config,
                                  check_every=2)
    assert result["step"] == 4
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert all(-1.0 <= line["idt_r"] <= 1.0 and "sep_r" in line and "warning" in line for line in lines)


def test_foreground_windows_show_anatomy_and_empty_slices_still_come():
    stack = np.zeros((2, 64, 64), np.float32)
    stack[0, 40:50, 5:15] = 1.0                                     # a small patch of "anatomy"
    sampler = SliceSampler({"T1": stack}, 200, seed=0, crop=16, on_foreground=True)
    windows = sampler.sample("T1")[:, 0]
    has = windows.reshape(len(windows), -1).max(axis=1) > 0
    # every window cut from slice 0 holds anatomy; slice 1 (empty) is drawn as often as slice 0
    assert 0.35 < has.mean() < 0.65
    uniform = SliceSampler({"T1": stack}, 200, seed=0, crop=16).sample("T1")[:, 0]
    assert (uniform.reshape(200, -1).max(axis=1) > 0).mean() < 0.25


def test_histogram_head_sees_intensity_distributions_and_passes_gradients():
    from galip.train.i2i.heads import ConvDiscriminator, HistogramHead
    head = HistogramHead(bins=8).eval()                                # no power-iteration step per call
    dark = torch.full((2, 1, 16, 16), 0.2, requires_grad=True)
    bright = torch.full((2, 1, 16, 16), 0.8)
    assert not torch.allclose(head(dark), head(bright))               # different distributions
    mixed = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    shuffled = mixed.flatten(2)[..., torch.randperm(256)].reshape(2, 1, 16, 16)
    torch.testing.assert_close(head(mixed), head(shuffled))            # layout does not matter
    head(dark).sum().backward()
    assert dark.grad.abs().sum() > 0                                   # the generator gets a signal
    disc = ConvDiscriminator(3, 8, histogram=True).eval()
    logits = disc(torch.rand(2, 1, 32, 32), 1)
    assert logits.shape == (2, 2 * 4 * 4)                              # patches, then the histogram logit
    torch.testing.assert_close(logits[:, 16:], logits[:, 16:17].expand(-1, 16))


def test_identity_weight_drops_from_the_given_step_and_survives_the_checkpoint():
    from galip.train.i2i.trainer import I2ITrainer, TrainConfig
    config = tiny_config("none")
    config.identity_late, config.identity_late_from = 2.0, 3
    trainer = I2ITrainer(config, parse_domains(DOMAINS))
    assert [trainer.weights_at(s).identity for s in (0, 2, 3, 10)] == [config.weights.identity] * 2 + [2.0, 2.0]
    assert trainer.weights_at(3).cycle == config.weights.cycle
    restored = TrainConfig.from_dict(trainer.config.to_dict())
    assert (restored.identity_late, restored.identity_late_from) == (2.0, 3)
