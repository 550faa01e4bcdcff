"""MIDiffusion conditioning and sampling with the real LMI operator (galip.train.lmi)."""
from __future__ import annotations

import numpy as np
import torch

from galip.runtime.schedule import SliceNoise, step_table
from galip.train.midiffusion import conditioning, samplers
from galip.train.midiffusion.conditioning import LMIConfig, LMIDenoiser
from galip.train.midiffusion.schedule import DDPMSchedule, img2x, q_sample
from galip.train.midiffusion.scorenet import ScoreNet, ScoreNetConfig


TINY = ScoreNetConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), groups=4)


def smooth_slices(n=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.random((n, 1, size // 4, size // 4)).astype(np.float32)
    return torch.from_numpy(np.kron(base, np.ones((1, 1, 4, 4), np.float32)))


def test_condition_with_the_real_operator_is_finite_and_bounded_by_self_information():
    x0 = smooth_slices()
    schedule = DDPMSchedule()
    t = torch.tensor([900, 900])
    x_t = q_sample(img2x(x0), t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)),
                   schedule.alphas_cumprod)
    cond = conditioning.condition(x_t, x0, None, LMIConfig())
    assert cond.shape == (2, 3, 16, 16) and torch.isfinite(cond).all()
    assert torch.equal(cond[:, :1], x_t)
    # Theorem 1 (paper): LMI(x0, x_t) ≤ LMI(x0, x0); on average it is clearly below for a noisy x_t
    assert cond[:, 1].mean() < cond[:, 2].mean()


def test_sampling_with_the_real_operator_reads_the_source():
    """Same seed, different source: the LMI channels must change the sample."""
    torch.manual_seed(0)
    model = LMIDenoiser(ScoreNet(TINY)).eval()
    table = step_table(DDPMSchedule().noise_schedule, "dpmpp2m", 3)
    a, b = (samplers.sample(model, smooth_slices(1, seed=seed), table, SliceNoise(0, 1, (1, 16, 16)))
            for seed in (0, 1))
    assert a.shape == (1, 1, 16, 16) and torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-4


def test_cached_reference_lmi_equals_the_recomputed_one():
    """Training caches LMI(x0, x0) once per slice (in chunks); it must be the map the
    conditioning would compute for that slice on its own, in order."""
    from galip.train.lmi import lmi
    from galip.train.midiffusion.trainer import cached_reference_lmi
    model = LMIDenoiser(ScoreNet(TINY)).eval()
    slices = smooth_slices(5, seed=3)[:, 0].numpy()
    cached = cached_reference_lmi(model, slices, chunk=2)
    for i, image in enumerate(slices):
        x = torch.from_numpy(image)[None, None]
        recomputed = lmi(x, x, **LMIConfig().lmi_kwargs())[0][0, 0].numpy()
        np.testing.assert_allclose(cached[i], recomputed, rtol=0, atol=1e-6)
    assert cached.shape == slices.shape and cached.dtype == np.float32
    assert not np.allclose(cached[0], cached[1])


def test_condition_channels_are_the_reference_operator_and_the_runtime_kernel():
    """The fast operator the condition uses equals the dense PyTorch reference, and its
    LMI(x0, x0) channel is what the runtime's native kernel computes for the bundle."""
    from galip.runtime.lmi_native import lmi_numpy
    from galip.train.lmi import lmi_dense
    x0 = smooth_slices(seed=3)
    x_t = q_sample(img2x(x0), torch.tensor([500, 500]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)),
                   DDPMSchedule().alphas_cumprod)
    config = LMIConfig()
    cond = conditioning.condition(x_t, x0, None, config)

    def dense(x, y, config):
        return lmi_dense(x, y, **config.lmi_kwargs())[0]
    reference = conditioning.condition(x_t, x0, None, config, lmi_fn=dense)
    torch.testing.assert_close(cond, reference, atol=1e-5, rtol=0)
    native = lmi_numpy(x0.numpy(), x0.numpy(), **config.kwargs())[0]
    np.testing.assert_allclose(cond[:, 2:].numpy(), native, atol=1e-5, rtol=0)
    assert cond[:, 1:].std() > 0.01                  # not a constant map
