"""The MIDiffusion score network: the DDPM U-Net of Ho et al. (2020), predicting ε.

The classic ``ddpm`` model family (Ho et al. App. B; score_sde ``models/ddpm.py``; the
``Model`` of the DDIM code): GroupNorm(32) + Swish, res blocks that add a projection of
the sinusoidal timestep embedding, single-head self-attention blocks, strided 3 × 3 conv
downsampling and nearest + 3 × 3 conv upsampling, a middle block res-attn-res. Written for
export: plain matmul/softmax attention, no gradient checkpointing, any H, W multiple of
2^(levels-1).

Reference configuration (docs/design.md): ch 64, multipliers (1, 2, 2, 2), 2 res blocks,
attention at downsample factor 8 (16² at 128²), dropout 0.1, 3 input channels
(x_t, LMI(source, x_t), LMI(source, source)), 1 output channel → 8,950,913 parameters.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from galip.runtime.errors import ConfigError


@dataclass
class ScoreNetConfig:
    """Serialisable score-network hyper-parameters (stored in checkpoints and manifests)."""

    in_channels: int = 3            # x_t + 2 LMI condition channels
    out_channels: int = 1           # ε
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8,)   # downsample factors with self-attention
    dropout: float = 0.1
    groups: int = 32                # GroupNorm groups

    @property
    def temb_dim(self) -> int:
        return 4 * self.ch

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def with_width(cls, ch: int) -> "ScoreNetConfig":
        """The reference design at base width ``ch``, two channels per GroupNorm group at
        the first level as in the reference (64 channels, 32 groups)."""
        if ch % 2:
            raise ConfigError(f"the score network's width must be even, got {ch}")
        return cls(ch=ch, groups=min(32, ch // 2))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attention_ds"] = list(self.attention_ds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreNetConfig":
        d = dict(d)
        d["ch_mult"] = tuple(d["ch_mult"])
        d["attention_ds"] = tuple(d["attention_ds"])
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (N,) timesteps → (N, dim) (Ho et al. App. B; Vaswani et al. §3.5)."""
    half = dim // 2
    # 1. frequencies exp(-log(10000) · k / (half - 1)), k = 0 … half-1
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                      * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    # 2. [sin | cos]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """GN → Swish → conv → + Linear(temb) → GN → Swish → dropout → conv, plus a 1 × 1 skip."""

    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, residual (Ho et al. App. B)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x_norm = self.norm(x)
        q = self.q(x_norm).flatten(2).transpose(1, 2)        # (N, HW, C)
        k = self.k(x_norm).flatten(2)                        # (N, C, HW)
        v = self.v(x_norm).flatten(2).transpose(1, 2)        # (N, HW, C)
        weights = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=-1)
        out = torch.bmm(weights, v).transpose(1, 2).reshape(n, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """3 × 3 conv with stride 2 (halves H and W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then 3 × 3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Res blocks (each optionally followed by attention) of one resolution."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class ScoreNet(nn.Module):
    """ε_θ(x, t): (N, in_channels, H, W), (N,) timesteps → (N, out_channels, H, W) (Ho et al. Alg. 1)."""

    def __init__(self, config: ScoreNetConfig | None = None):
        super().__init__()
        self.config = c = config or ScoreNetConfig()
        temb, groups = c.temb_dim, c.groups
        self.temb = nn.Sequential(nn.Linear(c.ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)

        def attn(channels: int, level: int) -> nn.Module:
            return AttnBlock(channels, groups) if 2 ** level in c.attention_ds else nn.Identity()

        # 1. encoder: num_res_blocks per level, downsample after every level but the last
        skip_channels, cur = [c.ch], c.ch
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in enumerate(c.ch_mult):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(cur, c.ch * mult, temb, c.dropout, groups))
                cur = c.ch * mult
                attns.append(attn(cur, level))
                skip_channels.append(cur)
            self.down.append(Level(blocks, attns))
            last = level == len(c.ch_mult) - 1
            self.downsample.append(nn.Identity() if last else Downsample(cur))
            if not last:
                skip_channels.append(cur)
        # 2. middle: res → attention → res
        self.mid1 = ResBlock(cur, cur, temb, c.dropout, groups)
        self.mid_attn = AttnBlock(cur, groups)
        self.mid2 = ResBlock(cur, cur, temb, c.dropout, groups)
        # 3. decoder: num_res_blocks + 1 per level, each eating one skip connection
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(c.ch_mult))):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(cur + skip_channels.pop(), c.ch * c.ch_mult[level],
                                       temb, c.dropout, groups))
                cur = c.ch * c.ch_mult[level]
                attns.append(attn(cur, level))
            self.up.append(Level(blocks, attns))
            self.upsample.append(Upsample(cur) if level else nn.Identity())
        self.norm_out = nn.GroupNorm(groups, cur)
        self.conv_out = nn.Conv2d(cur, c.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        multiple = self.config.size_multiple
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"ScoreNet input H, W must be multiples of {multiple}, got {tuple(x.shape[-2:])}")
        temb = self.temb(timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.config.ch))
        h = self.conv_in(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, temb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for level, up in zip(self.up, self.upsample):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
