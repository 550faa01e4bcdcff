"""Discriminators of I2I-Galip: per-target-domain head sets (paper §4.1, Eq. 2–7).

With a ViT backbone each target domain owns one set of heads, one per tapped ViT block
(BiomedCLIP: blocks 3/6/9/12, 196 × 768 patch tokens), in the style of StyleGAN-T's
projected discriminator: spectral-norm Conv1d k=1 + local batch norm + LeakyReLU(0.2),
a residual block of the same with k=9 (circular padding), then a projection conditioned
on the caption embedding. Clip-free mode replaces the ViT features by per-domain
convolutional (PatchGAN-style) heads on the image itself.

Both discriminators share one call: ``disc(inputs, domain_index, text_emb) -> (N, K)``
logits, K = all positions of all heads of that domain, for the LSGAN losses (Eq. 2–3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class BatchNormLocal(nn.Module):
    """Batch norm over groups of ``virtual_bs`` samples, no running statistics.

    x: (N, C, T) → (N, C, T); statistics per group and channel over (samples, T).
    """

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t = x.shape
        groups = math.ceil(n / self.virtual_bs)
        while n % groups:                         # equal groups, vectorised (no loop over samples)
            groups += 1
        g = x.reshape(groups, n // groups, c, t)
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return g.reshape(n, c, t) * self.weight[None, :, None] + self.bias[None, :, None]


def _block(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        spectral_norm(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                                padding_mode="circular")),
        BatchNormLocal(channels),
        nn.LeakyReLU(0.2),
    )


class DiscHead(nn.Module):
    """One head on one ViT block. tokens (N, T, C), text_emb (N, E) → logits (N, T).

    out(t) = ⟨SNConv(h)(t), Linear(ê)⟩ / √cmap_dim with ê the L2-normalised caption
    embedding (projection discriminator conditioned on E_T, Eq. 2–3).
    """

    def __init__(self, channels: int, embed_dim: int, cmap_dim: int = 64):
        super().__init__()
        self.conv = _block(channels, 1)
        self.res = _block(channels, 9)
        self.cls = spectral_norm(nn.Conv1d(channels, cmap_dim, 1))
        self.cmapper = nn.Linear(embed_dim, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, tokens: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv(tokens.transpose(1, 2))                 # (N, C, T)
        h = (h + self.res(h)) / math.sqrt(2.0)
        out = self.cls(h)                                     # (N, cmap, T)
        cmap = self.cmapper(F.normalize(text_emb, dim=-1))    # (N, cmap)
        return (out * cmap[:, :, None]).sum(dim=1) / math.sqrt(self.cmap_dim)


class ViTDiscriminator(nn.Module):
    """``n_domains`` sets of ``n_taps`` heads; set d judges images of target domain d.

    forward(patch_tokens: list of (N, T, width), domain_index, text_emb (N, E)) → (N, Σ T).
    """

    def __init__(self, n_domains: int, n_taps: int, width: int, embed_dim: int, cmap_dim: int = 64):
        super().__init__()
        self.sets = nn.ModuleList(
            nn.ModuleList(DiscHead(width, embed_dim, cmap_dim) for _ in range(n_taps))
            for _ in range(n_domains))

    def forward(self, patch_tokens: list[torch.Tensor], domain_index: int,
                text_emb: torch.Tensor | None) -> torch.Tensor:
        heads = self.sets[domain_index]
        return torch.cat([head(t, text_emb) for head, t in zip(heads, patch_tokens)], dim=1)


class HistogramHead(nn.Module):
    """One logit from the distribution of an image's foreground intensities.

    What first tells a T2 from a T1 is which tissue is bright, a property of the whole
    image that a small patch discriminator learns slowly (with 64² windows it barely
    told them apart after 800 steps). This head sees a soft, differentiable histogram
    of the foreground (pixels above ``FOREGROUND``, soft-thresholded) over ``bins``
    Gaussian bins of [0, 1], then a spectral-norm MLP. image (N, 1, H, W) → (N, 1).
    """

    FOREGROUND = 0.05

    def __init__(self, bins: int = 32, width: int = 64):
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, 1.0, bins), persistent=False)
        self.sigma = 1.0 / (bins - 1)
        self.mlp = nn.Sequential(spectral_norm(nn.Linear(bins, width)), nn.LeakyReLU(0.2),
                                 spectral_norm(nn.Linear(width, 1)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.flatten(1)                                              # (N, P)
        weight = torch.sigmoid((x - self.FOREGROUND) * 200.0)            # soft foreground
        kernel = torch.exp(-0.5 * ((x[..., None] - self.centres) / self.sigma) ** 2)   # (N, P, B)
        hist = (kernel * weight[..., None]).sum(1)
        hist = hist / (hist.sum(1, keepdim=True) + 1e-6)                 # a distribution (empty: 0)
        return self.mlp(hist * len(self.centres))


class ConvDiscriminator(nn.Module):
    """Clip-free mode: one PatchGAN-style head per target domain on the image itself.

    Each head: spectral-norm conv k4 s2 (1→c→2c→4c) + LeakyReLU(0.2), then conv k3 → 1.
    forward(image (N, 1, H, W), domain_index, text_emb ignored) → (N, (H/8)·(W/8)).
    ``histogram``: each domain also gets a :class:`HistogramHead`, whose logit is
    repeated over the patch positions so the two weigh equally in the LSGAN means
    (then K = 2·(H/8)·(W/8)).
    """

    def __init__(self, n_domains: int, channels: int = 64, histogram: bool = False):
        super().__init__()
        self.sets = nn.ModuleList(self._head(channels) for _ in range(n_domains))
        self.histograms = nn.ModuleList(HistogramHead() for _ in range(n_domains)) if histogram else None

    @staticmethod
    def _head(c: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for cin, cout in ((1, c), (c, 2 * c), (2 * c, 4 * c)):
            layers += [spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers.append(spectral_norm(nn.Conv2d(4 * c, 1, 3, padding=1)))
        return nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, domain_index: int, text_emb: torch.Tensor | None = None) -> torch.Tensor:
        patches = self.sets[domain_index](image).flatten(1)
        if self.histograms is None:
            return patches
        whole = self.histograms[domain_index](image).expand(-1, patches.shape[1])
        return torch.cat([patches, whole], dim=1)
