"""The LMI condition of MIDiffusion: ONE definition for training and sampling (paper Eq. 12–13).

The network input is the 3-channel stack ``[x_t, LMI(ref, u(x_t)), LMI(ref, ref)]`` where
``ref`` is the clean target slice x_0 during training (Eq. 12, zero-shot: only the target
contrast is seen) and the source slice G at sampling (Eq. 13), both images in [0, 1], and
``u(x_t) = clip((x_t + 1) / 2, 0, 1)`` maps the noisy sample (model space [−1, 1], not
bounded) into the LMI operator's [0, 1] domain. The LMI settings (patch, radius, bins, σ,
NMI flag) travel with the checkpoint in an ``LMIConfig``; the reference code uses
different normalisations at training and sampling, which this module makes impossible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from galip.runtime.contract.lmi import LmiParams
from galip.runtime.errors import ConfigError

from .schedule import x2img


XT_MAP = "clip((x_t+1)/2,0,1)"


@dataclass(frozen=True)
class LMIConfig(LmiParams):
    """The LMI operator's settings (:class:`~galip.runtime.contract.LmiParams`: defaults and
    validation) plus the x_t → LMI-input map, fixed per trained model."""

    xt_map: str = XT_MAP            # records lmi_input() for the manifest; not a switch

    def __post_init__(self):
        super().__post_init__()
        if self.xt_map != XT_MAP:
            raise ConfigError(f"unknown x_t → LMI-input map {self.xt_map!r}; this galip knows {XT_MAP!r}")

    def lmi_kwargs(self) -> dict:
        return self.kwargs()

    @classmethod
    def from_dict(cls, d: dict) -> "LMIConfig":
        return cls(**d)


def lmi_map(x: torch.Tensor, y: torch.Tensor, config: LMIConfig) -> torch.Tensor:
    """LMI(x, y) map (N, 1, H, W) with the model's settings (galip.train.lmi.lmi, fast path)."""
    from galip.train.lmi import lmi   # late import: the operator is an optional native build
    return lmi(x, y, **config.lmi_kwargs())[0]


def lmi_input(x_t: torch.Tensor) -> torch.Tensor:
    """The sample as the LMI operator sees it: u(x_t) = clip((x_t + 1) / 2, 0, 1)."""
    return x2img(x_t)


LMIFunction = Callable[[torch.Tensor, torch.Tensor, LMIConfig], torch.Tensor]


def reference_lmi(reference: torch.Tensor, config: LMIConfig, lmi_fn: LMIFunction | None = None) -> torch.Tensor:
    """LMI(ref, ref), the constant second condition channel (compute once per slice)."""
    return (lmi_fn or lmi_map)(reference, reference, config)


def condition(x_t: torch.Tensor, reference: torch.Tensor, lmi_ref_ref: torch.Tensor | None,
              config: LMIConfig, lmi_fn: LMIFunction | None = None) -> torch.Tensor:
    """Network input [x_t, LMI(ref, u(x_t)), LMI(ref, ref)], (N, 3, H, W) (paper Eq. 12/13).

    ``reference``: x_0 of the target contrast (training) or the source slice (sampling),
    (N, 1, H, W) in [0, 1]. ``lmi_ref_ref`` may be passed precomputed (it does not change
    over the sampling loop); ``None`` computes it. ``lmi_fn(x, y, config) -> map`` replaces
    :func:`lmi_map` (export puts a graph-level LMI node here); the default is the operator.
    """
    lmi_fn = lmi_fn or lmi_map
    if reference.shape != x_t.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and x_t {tuple(x_t.shape)} differ in shape")
    with torch.no_grad():
        # 1. LMI between the reference and the current sample, Eq. 12 (F, F_t) / Eq. 13 (G, F̂_t)
        lmi_ref_xt = lmi_fn(reference, lmi_input(x_t), config)
        # 2. LMI of the reference with itself (the upper bound of Theorem 1)
        if lmi_ref_ref is None:
            lmi_ref_ref = reference_lmi(reference, config, lmi_fn)
    return torch.cat([x_t, lmi_ref_xt.to(x_t.dtype), lmi_ref_ref.to(x_t.dtype)], dim=1)


class LMIDenoiser(nn.Module):
    """ε_θ(x_t, t | ref): the score network behind :func:`condition` (k-diffusion-style wrapper).

    Training calls it with ref = x_0, sampling with ref = the source slice; both go through
    the same ``condition``. ``lmi_fn`` is passed on to it (None: the LMI operator).
    """

    def __init__(self, net: nn.Module, lmi_config: LMIConfig | None = None,
                 lmi_fn: LMIFunction | None = None):
        super().__init__()
        self.net = net
        self.lmi_config = lmi_config or LMIConfig()
        self.lmi_fn = lmi_fn

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, reference: torch.Tensor,
                lmi_ref_ref: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(condition(x_t, reference, lmi_ref_ref, self.lmi_config, self.lmi_fn), t)

    def reference_lmi(self, reference: torch.Tensor) -> torch.Tensor:
        """LMI(ref, ref) with this model's settings (samplers compute it once per slice)."""
        with torch.no_grad():
            return reference_lmi(reference, self.lmi_config, self.lmi_fn)
