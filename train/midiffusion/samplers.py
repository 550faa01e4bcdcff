"""Sampling the LMI-conditioned ε-model in PyTorch: one loop over the runtime's step table.

k-diffusion style: :func:`sample` is a small pure function over a denoiser. It walks the
same :class:`~galip.runtime.schedule.StepTable` a bundle walks (DDPM ancestral, DDIM with
any η, DPM-Solver++(2M)), draws its noise from the same per-slice source
(:class:`~galip.runtime.schedule.SliceNoise`) and applies the same update
(:func:`~galip.runtime.schedule.combine`), so eager PyTorch and a bundle give the same
sample for the same seed. Per step (paper Alg. 1 with the runtime's update)::

    ε   = ε_θ(x_t, t | LMI(G; G, x_t))
    x̂_0 = predict_x0(ε, x_t, ᾱ_t)                    (clipped to the data range)
    x   = c_x x_t + c_0 x̂_0 + c_1 x̂_0^last + σ z
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from galip.runtime.schedule import SliceNoise, StepTable, combine

from .schedule import DATA_RANGE, x2img


class EpsModel(Protocol):
    """ε_θ(x_t, t | source): e.g. :class:`~galip.train.midiffusion.conditioning.LMIDenoiser`."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, source: torch.Tensor,
                 lmi_source_source: torch.Tensor) -> torch.Tensor: ...

    def reference_lmi(self, source: torch.Tensor) -> torch.Tensor: ...


def predict_x0(eps: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor,
               clip: tuple[float, float] | None) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t (Ho et al. Eq. 15), clipped to ``clip`` (the model's
    data range; None: not clipped). The update needs no ε: it is written through x_t and
    x̂_0, which makes ε recomputed from the clipped x̂_0 (diffusers'
    ``use_clipped_model_output``) implicit."""
    x0 = (x_t - (1.0 - ab_t).sqrt() * eps) / ab_t.sqrt()
    return x0.clamp(*clip) if clip is not None else x0


@torch.no_grad()
def sample(eps_model: EpsModel, source: torch.Tensor, table: StepTable, noise: SliceNoise, *,
           clip: tuple[float, float] | None = DATA_RANGE,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Translate ``source`` (N, 1, H, W) in [0, 1] → target slices (N, 1, H, W) in [0, 1].

    ``noise`` supplies x_T and every σ > 0 step's z (the runtime's rule: nothing is drawn
    at σ = 0); ``callback(i, x̂_0)`` after each step. Every per-step value is taken as the
    float32 the runtime feeds its graph.
    """
    device = source.device

    def draw() -> torch.Tensor:
        return torch.from_numpy(noise.draw()).to(device)

    def value(column: np.ndarray, i: int) -> torch.Tensor:
        return torch.tensor(float(column[i]), dtype=torch.float32, device=device)

    lmi_source = eps_model.reference_lmi(source)
    x = draw()
    x0_last = torch.zeros_like(x)
    for i in range(len(table)):
        eps = eps_model(x, value(table.timestep, i).reshape(1), source, lmi_source)
        x0 = predict_x0(eps, x, value(table.alpha_bar_t, i), clip)
        z = draw() if table.draws_noise[i] else torch.zeros_like(x)
        x = combine(x, x0, x0_last, z, *(value(c, i) for c in (table.coef_xt, table.coef_x0,
                                                               table.coef_x0_last, table.sigma)))
        x0_last = x0
        if callback is not None:
            callback(i, x0)
    return x2img(x)
