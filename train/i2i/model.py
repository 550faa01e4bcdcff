"""The generator as trained and exported: U-Net + per-domain context table + class ids.

A target domain is addressed by its index in the trained domain list. The context
table (D, L, C) holds either the frozen caption context tokens of the CLIP text tower
(BiomedCLIP / tiny modes; a buffer) or learned per-domain tokens (clip-free mode; a
parameter). Storing the table in the checkpoint means export and runtime never need CLIP.
"""
from __future__ import annotations

import torch
from torch import nn

from .unet import I2IGalipUNet, UNetConfig


class ConditionedGenerator(nn.Module):
    """G(x, target) = U-Net(x, context[target], class_ids[target]).

    image (N, 1, H, W), target (N,) int64 domain indices → (N, 1, H, W).
    """

    def __init__(self, unet_config: UNetConfig, class_ids: list[int], context: torch.Tensor,
                 learn_context: bool):
        super().__init__()
        if context.shape[0] != len(class_ids) or context.shape[-1] != unet_config.context_dim:
            raise ValueError(f"context table {tuple(context.shape)} does not fit {len(class_ids)} domains "
                             f"and context_dim {unet_config.context_dim}")
        if max(class_ids) >= unet_config.n_classes:
            raise ValueError(f"class id {max(class_ids)} needs n_classes > {max(class_ids)}, "
                             f"config has {unet_config.n_classes}")
        self.unet = I2IGalipUNet(unet_config)
        self.register_buffer("class_ids", torch.tensor(class_ids, dtype=torch.long))
        if learn_context:
            self.context = nn.Parameter(context.clone())
        else:
            self.register_buffer("context", context.clone())

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.unet(image, self.context[target], self.class_ids[target])


def generator_from_checkpoint(payload: dict, ema: bool = True) -> tuple[I2IGalipUNet, torch.Tensor, list[dict]]:
    """Rebuild the bare U-Net from a ``galip-train generator`` checkpoint.

    Returns (unet in eval mode, context table (D, L, C) float32 in domain order, domains
    as dicts with name/caption/class_id/kind/suffix). ``ema=True`` takes the EMA weights,
    which is what the paper evaluates.
    """
    config = UNetConfig.from_dict(payload["unet_config"])
    state = payload["generator_ema"]["module"] if ema else payload["generator"]
    unet = I2IGalipUNet(config)
    unet.load_state_dict({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
    return unet.eval(), state["context"].float(), list(payload["domains"])
