"""Samplers for the LMI-conditioned ε-model: pure functions, diffusers-style steps.

Three layers, each usable alone:

* ``ddpm_update`` / ``ddim_update``: the scheduler maths of one step, tensors in, a
  :class:`StepOutput` out; they never call the model.
* ``ddpm_step`` / ``ddim_step``: ε_θ(x_t, t | source) then the update. Arguments are
  tensors only (x_t, t, t_prev, noise, source, lmi_source_source, the ᾱ table) and the
  body is graph-friendly (gathers, ``where``, elementwise maths), so export can trace ONE
  step — LMI + network + update — into one graph. ``t_prev = −1`` means "to x_0".
* ``sample_ddpm`` / ``sample_ddim``: the loops (k-diffusion style), seeded by a
  ``torch.Generator``; ``translate_slices`` batches them over slices.

``sample_ddim(steps=T, eta=1)`` and ``sample_ddpm`` are the same process: both use the
posterior variance β̃_t and recompute ε from the (clipped) x̂_0, which makes the two
updates algebraically identical (tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import numpy as np
import torch

from .schedule import DATA_RANGE, DEFAULT_SPACING, DDPMSchedule, Spacing, ddim_timesteps, x2img


class EpsModel(Protocol):
    """ε_θ(x_t, t | source): e.g. :class:`~galip.train.midiffusion.conditioning.LMIDenoiser`."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, source: torch.Tensor,
                 lmi_source_source: torch.Tensor) -> torch.Tensor: ...

    def reference_lmi(self, source: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StepOutput:
    """Result of one reverse step (names as in diffusers' ``DDIMSchedulerOutput``)."""

    prev_sample: torch.Tensor            # x_{t_prev}
    pred_original_sample: torch.Tensor   # x̂_0 (clipped when clip_x0)


def _alpha_bars(alpha_bar: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor):
    """ᾱ_t and ᾱ_{t_prev} as (N or 1, 1, 1, 1); ᾱ_{−1} = 1 (the clean end)."""
    ab_t = alpha_bar[t.long()].reshape(-1, 1, 1, 1)
    t_prev = t_prev.long()
    ab_prev = torch.where(t_prev >= 0, alpha_bar[t_prev.clamp(min=0)],
                          torch.ones_like(alpha_bar[0])).reshape(-1, 1, 1, 1)
    return ab_t, ab_prev


def predict_x0(eps: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor, clip_x0: bool):
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t (Ho et al. Eq. 15); with clipping, ε is recomputed
    from the clipped x̂_0 (diffusers ``use_clipped_model_output``). Clipped to ``DATA_RANGE``."""
    x0 = (x_t - (1.0 - ab_t).sqrt() * eps) / ab_t.sqrt()
    if clip_x0:
        x0 = x0.clamp(*DATA_RANGE)
        eps = (x_t - ab_t.sqrt() * x0) / (1.0 - ab_t).sqrt()
    return x0, eps


def ddpm_update(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                noise: torch.Tensor, alpha_bar: torch.Tensor, *, clip_x0: bool = True) -> StepOutput:
    """Ancestral step x_t → x_{t_prev} ~ q(x_{t_prev} | x_t, x̂_0) (Ho et al. Eq. 6–7, Alg. 2)."""
    ab_t, ab_prev = _alpha_bars(alpha_bar, t, t_prev)
    x0, _ = predict_x0(eps, x_t, ab_t, clip_x0)
    # 1. α and β of the (possibly skipping) transition t_prev → t: α = ᾱ_t / ᾱ_prev
    alpha = ab_t / ab_prev
    beta = 1.0 - alpha
    # 2. posterior mean μ̃ = √ᾱ_prev β/(1−ᾱ_t) x̂_0 + √α (1−ᾱ_prev)/(1−ᾱ_t) x_t (Eq. 7)
    mean = (ab_prev.sqrt() * beta * x0 + alpha.sqrt() * (1.0 - ab_prev) * x_t) / (1.0 - ab_t)
    # 3. posterior variance β̃ = (1−ᾱ_prev)/(1−ᾱ_t) β (Eq. 7), zero at the last step
    beta_tilde = (1.0 - ab_prev) / (1.0 - ab_t) * beta
    return StepOutput(mean + beta_tilde.sqrt() * noise, x0)


def ddim_update(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                noise: torch.Tensor, alpha_bar: torch.Tensor, *, eta: float = 0.0,
                clip_x0: bool = True) -> StepOutput:
    """Generalised DDIM step x_t → x_{t_prev} (Song et al. 2021, Eq. 12 and 16)."""
    ab_t, ab_prev = _alpha_bars(alpha_bar, t, t_prev)
    x0, eps = predict_x0(eps, x_t, ab_t, clip_x0)
    # 1. σ_t(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev) (Eq. 16)
    sigma_t = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)).sqrt()
    # 2. x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_t²) ε + σ_t z (Eq. 12)
    direction = (1.0 - ab_prev - sigma_t ** 2).clamp(min=0.0).sqrt() * eps
    return StepOutput(ab_prev.sqrt() * x0 + direction + sigma_t * noise, x0)


def ddpm_step(eps_model: Callable, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              noise: torch.Tensor, source: torch.Tensor, lmi_source_source: torch.Tensor,
              alpha_bar: torch.Tensor, *, clip_x0: bool = True) -> StepOutput:
    """One ancestral step of Algorithm 1 (paper): ε_θ(x_t, t | LMI(G; G, x_t)), then Eq. 7."""
    eps = eps_model(x_t, t, source, lmi_source_source)
    return ddpm_update(eps, x_t, t, t_prev, noise, alpha_bar, clip_x0=clip_x0)


def ddim_step(eps_model: Callable, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              noise: torch.Tensor, source: torch.Tensor, lmi_source_source: torch.Tensor,
              alpha_bar: torch.Tensor, *, eta: float = 0.0, clip_x0: bool = True) -> StepOutput:
    """One DDIM step: ε_θ(x_t, t | LMI(G; G, x_t)), then Song et al. Eq. 12."""
    eps = eps_model(x_t, t, source, lmi_source_source)
    return ddim_update(eps, x_t, t, t_prev, noise, alpha_bar, eta=eta, clip_x0=clip_x0)


def _sample(step: Callable, eps_model: EpsModel, source: torch.Tensor, schedule: DDPMSchedule,
            timesteps: list[int], generator: torch.Generator | None,
            callback: Callable | None) -> torch.Tensor:
    """Shared loop: x_T ~ N(0, I), then ``step`` along ``timesteps`` down to x_0; image in [0, 1]."""
    device = source.device
    gen_device = generator.device if generator is not None else device

    def randn() -> torch.Tensor:
        return torch.randn(source.shape, generator=generator, device=gen_device).to(device)

    alpha_bar = schedule.alphas_cumprod.to(device)
    lmi_source_source = eps_model.reference_lmi(source)
    x = randn()
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = step(eps_model, x, torch.tensor([t], device=device), torch.tensor([t_prev], device=device),
                   randn(), source, lmi_source_source, alpha_bar)
        x = out.prev_sample
        if callback is not None:
            callback(i, t, out)
    return x2img(x)


@torch.no_grad()
def sample_ddpm(eps_model: EpsModel, source: torch.Tensor, schedule: DDPMSchedule, *,
                generator: torch.Generator | None = None, clip_x0: bool = True,
                callback: Callable | None = None) -> torch.Tensor:
    """T-step ancestral sampling (Ho et al. Alg. 2; paper Alg. 1), the reference sampler.

    ``source`` (N, 1, H, W) in [0, 1] → translated target slices (N, 1, H, W) in [0, 1].
    """
    def step(*args):
        return ddpm_step(*args, clip_x0=clip_x0)
    timesteps = list(range(schedule.num_timesteps - 1, -1, -1))
    return _sample(step, eps_model, source, schedule, timesteps, generator, callback)


@torch.no_grad()
def sample_ddim(eps_model: EpsModel, source: torch.Tensor, schedule: DDPMSchedule, steps: int, *,
                eta: float = 0.0, generator: torch.Generator | None = None, clip_x0: bool = True,
                spacing: Spacing = DEFAULT_SPACING, callback: Callable | None = None) -> torch.Tensor:
    """DDIM sampling with any number of steps (Song et al. 2021, Eq. 12; η = 0 deterministic).

    ``source`` (N, 1, H, W) in [0, 1] → translated target slices (N, 1, H, W) in [0, 1];
    ``spacing`` picks the timesteps (:func:`~galip.train.midiffusion.schedule.ddim_timesteps`).
    """
    def step(*args):
        return ddim_step(*args, eta=eta, clip_x0=clip_x0)
    timesteps = ddim_timesteps(schedule.num_timesteps, steps, spacing)
    return _sample(step, eps_model, source, schedule, timesteps, generator, callback)


def translate_slices(eps_model: EpsModel, sources, *, schedule: DDPMSchedule | None = None,
                     sampler: Literal["ddim", "ddpm"] = "ddim", steps: int = 50, eta: float = 0.0,
                     seed: int = 0, batch_size: int = 8, clip_x0: bool = True,
                     spacing: Spacing = DEFAULT_SPACING):
    """Translate source slices (n, H, W) or (n, 1, H, W) in [0, 1], ndarray or tensor.

    Returns the same type and shape. One generator seeded with ``seed`` drives all batches,
    so the output depends on (seed, batch_size, order of slices).
    """
    schedule = schedule or DDPMSchedule()
    as_numpy = isinstance(sources, np.ndarray)
    x = torch.as_tensor(np.asarray(sources, np.float32)) if as_numpy else sources.float()
    squeeze = x.dim() == 3
    if squeeze:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected slices (n, H, W) or (n, 1, H, W), got {tuple(x.shape)}")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    device = next(eps_model.parameters()).device if isinstance(eps_model, torch.nn.Module) else x.device
    was_training = getattr(eps_model, "training", False)
    if isinstance(eps_model, torch.nn.Module):
        eps_model.eval()
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    try:
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size].to(device)
            if sampler == "ddpm":
                out = sample_ddpm(eps_model, batch, schedule, generator=generator, clip_x0=clip_x0)
            else:
                out = sample_ddim(eps_model, batch, schedule, steps, eta=eta, generator=generator,
                                  clip_x0=clip_x0, spacing=spacing)
            outputs.append(out.cpu())
    finally:
        if was_training:
            eps_model.train()
    y = torch.cat(outputs) if outputs else x.clone()
    if squeeze:
        y = y[:, 0]
    return y.numpy() if as_numpy else y
