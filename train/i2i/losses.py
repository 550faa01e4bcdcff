"""I2I-Galip losses (paper Eq. 1–12) as plain functions over tensors.

Every function returns a scalar tensor, the expectation taken as a batch mean. The
weights of Eq. 1 are :class:`LossWeights` (paper §4.3: cycle 10, the rest 1; clip-free
mode zeroes the CLIP and CLS terms).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    """λ of Eq. 1."""

    cycle: float = 10.0
    adv: float = 1.0
    clip: float = 1.0
    cls: float = 1.0
    identity: float = 1.0
    prior: float = 0.0          # L1 to a training-free pseudo-target (train/i2i/prior.py); not in the paper

    def to_dict(self) -> dict:
        return asdict(self)


def lsgan_generator(fake_logits: torch.Tensor) -> torch.Tensor:
    """One term of Eq. 2: E[(Head(E_out, E_T) − 1)²]; logits (N, K) over all heads' positions."""
    return (fake_logits - 1.0).square().mean()


def lsgan_discriminator(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """One bracket of Eq. 3: E[(Head(E_in, E_T) − 1)² + Head(E_out, E_T)²]."""
    return (real_logits - 1.0).square().mean() + fake_logits.square().mean()


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E‖x − y‖₁ as a per-pixel mean (one term of Eq. 9 or Eq. 12)."""
    return (x - y).abs().mean()


def l1_where_known(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`l1` over the finite entries of ``target`` (NaN marks "no pseudo-target");
    0 when there is none."""
    known = torch.isfinite(target)
    if not bool(known.any()):
        return x.new_zeros(())
    return (x[known] - target[known]).abs().mean()


def negative_cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """−E[⟨u, v⟩ / (‖u‖‖v‖)] over the batch; u, v: (N, E). One term of Eq. 10 / Eq. 11."""
    return -F.cosine_similarity(u, v, dim=-1).mean()


def clip_loss(image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
    """One term of Eq. 10: −cos(E_T, E_X^out,last); (N, E) each (text row broadcast)."""
    return negative_cosine(image_embedding, text_embedding.expand_as(image_embedding))


def cls_loss(cls_real: torch.Tensor, cls_fake: torch.Tensor) -> torch.Tensor:
    """One term of Eq. 11: −cos(cls_in, cls_out) between real target-domain images and
    generated images of the same domain (unpaired: sample i against sample i)."""
    return negative_cosine(cls_real, cls_fake)


def total_generator_loss(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """Eq. 1: Σ λ_k · L_k over the keys of ``terms`` (cycle, adv, clip, cls, identity, prior)."""
    w = weights.to_dict()
    return sum(w[name] * value for name, value in terms.items())
