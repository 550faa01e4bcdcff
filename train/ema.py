"""Exponential moving average of a model's weights (both papers evaluate the EMA model)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimiser step.

    Buffers (e.g. batch-norm statistics) are copied, not averaged. ``module`` is the
    averaged copy, kept in eval mode and out of autograd.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for shadow, weight in zip(self.module.parameters(), model.parameters()):
            shadow.lerp_(weight.detach(), 1.0 - self.decay)
        for shadow, buffer in zip(self.module.buffers(), model.buffers()):
            shadow.copy_(buffer)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The averaged weights; the decay stays this EMA's (its owner's config: a resumed
        run's equals the saved one, a run started from another's may differ)."""
        self.module.load_state_dict(state["module"])
