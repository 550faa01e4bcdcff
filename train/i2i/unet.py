"""The I2I-Galip generator: a thin LDM U-Net conditioned on a text context and a class label.

Mirrors ``openaimodel.UNetModel`` of latent-diffusion (paper §4.1, Fig. 1a) with the
timestep embedding replaced by the target domain's class embedding
(``nn.Embedding(n_classes, 4 * base)``), which every res block adds to its features
through ``SiLU → Linear(4 * base, out_ch)``. The target caption's context tokens enter
through cross-attention in SpatialTransformers. Written for export: plain matmul/softmax
attention, no gradient-checkpointing autograd Function, any H, W multiple of 2^(levels-1).

Reference configuration (docs/design.md): base 32, multipliers (1, 1, 2, 2, 4, 4), 2 res
blocks, attention at downsample factors 8/16/32 + middle, 32 channels per head,
context 512, 3 class rows (T1/T2/PD, IXI) → 13,242,881 parameters (context 768 →
14,127,617). The class embedding is indexed by ``Domain.class_id`` of the runtime's
domain registry, so it has ``max(class_id) + 1`` rows for the trained domains.

Not in the paper, off by default (``curve_knots``): an :class:`IntensityCurve` beside the
output head. The head ends in GroupNorm, so the output's level and scale over an image
come from the normalised features alone; a translation that is mostly a re-mapping of
intensities (T1 -> T2 inverts them) is then slow to learn on a few thousand CPU steps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    """Serialisable generator hyper-parameters (stored in checkpoints and manifests)."""

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (8, 16, 32)
    head_channels: int = 32
    transformer_depth: int = 1
    context_dim: int = 512
    n_classes: int = 3          # rows of the class embedding: max(Domain.class_id) + 1
    groups: int = 32            # GroupNorm groups
    dropout: float = 0.0
    # knots of the intensity curve added to the output (0: none, the paper's U-Net; IntensityCurve)
    curve_knots: int = 0

    @property
    def emb_dim(self) -> int:
        return 4 * self.base_channels

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_ds"] = list(self.attention_ds)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attention_ds"] = tuple(d["attention_ds"])
        return cls(**d)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm→SiLU→conv, + Linear(emb), GroupNorm→SiLU→dropout→zero conv, skip.

    ``down``/``up`` resample inside the block (avg-pool / nearest ×2) on both the
    features and the skip path, as ``resblock_updown=True`` in LDM.
    x: (N, C_in, H, W), emb: (N, E) → (N, C_out, H', W'). ``term``: the class term
    ``emb(SiLU(emb))`` (N, C_out) when the caller has it already (export's per-domain table).
    """

    takes = "emb"      # what a Stage passes it besides x

    def __init__(self, ch: int, emb_dim: int, out_ch: int, groups: int, dropout: float,
                 down: bool = False, up: bool = False):
        super().__init__()
        self.in_norm = nn.GroupNorm(groups, ch)
        self.in_conv = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.down, self.up = down, up
        self.emb = nn.Linear(emb_dim, out_ch)
        self.out_norm = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return F.avg_pool2d(x, 2)
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None, term: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        term = self.emb(F.silu(emb)) if term is None else term
        h = h + term[:, :, None, None]
        h = self.out_conv(self.dropout(F.silu(self.out_norm(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head (cross-)attention, softmax(QKᵀ/√d)V with plain matmuls (exports to ONNX).

    x: (N, T, C), context: (N, L, C_ctx) or None (self-attention) → (N, T, C). ``kv``: keys
    and values already projected and split into heads, (N, h, L, d) each (export's
    per-domain table), instead of ``context``.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads, self.scale = heads, head_dim ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (N, T, h·d) → (N, h, T, d)
        n, length, _ = t.shape
        return t.reshape(n, length, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if kv is None:
            context = x if context is None else context
            kv = self._split(self.to_k(context)), self._split(self.to_v(context))
        q, (k, v) = self._split(self.to_q(x)), kv
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2)          # (N, T, h, d)
        return self.to_out(out.reshape(out.shape[0], out.shape[1], -1))


class GEGLUFeedForward(nn.Module):
    """Linear(dim, 2·4dim) → a·GELU(g) → Linear(4dim, dim). x: (N, T, dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm → 1×1 conv → transformer blocks over H·W tokens → zero 1×1 conv, residual.

    x: (N, C, H, W), context: (N, L, C_ctx) → (N, C, H, W).
    """

    takes = "context"

    def __init__(self, ch: int, head_dim: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        heads = ch // head_dim
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, inner, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth))
        self.proj_out = _zero(nn.Conv2d(inner, ch, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        t = self.proj_in(self.norm(x))
        t = t.flatten(2).transpose(1, 2)                         # (N, H·W, inner)
        for block in self.blocks:
            t = block(t, context)
        t = t.transpose(1, 2).reshape(n, -1, h, w)
        return x + self.proj_out(t)


class Stage(nn.ModuleList):
    """A sequence of layers; a layer whose ``takes`` is ``emb`` (res blocks) gets ``emb``, one
    whose ``takes`` is ``context`` (transformers) gets ``context``, others x alone."""

    def forward(self, x, emb, context):  # noqa: D102 - see class docstring
        for layer in self:
            takes = getattr(layer, "takes", None)
            x = layer(x, emb) if takes == "emb" else layer(x, context) if takes == "context" else layer(x)
        return x


class I2IGalipUNet(nn.Module):
    """Generator G(x, context, class) of I2I-Galip (paper Eq. 6–7, 9, 12).

    forward(image (N, 1, H, W), context (N, L, context_dim), class_id (N,) int64)
    → (N, 1, H, W), no output activation. H, W multiples of ``config.size_multiple``.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        emb, g, p = cfg.emb_dim, cfg.groups, cfg.dropout

        def attention(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.head_channels, cfg.transformer_depth, cfg.context_dim, g)

        self.class_embed = nn.Embedding(cfg.n_classes, emb)
        ch = cfg.base_channels
        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * cfg.base_channels, g, p)]
                ch = mult * cfg.base_channels
                if ds in cfg.attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(Stage(layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Stage([ResBlock(ch, emb, ch, g, p, down=True)]))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = Stage([ResBlock(ch, emb, ch, g, p), attention(ch), ResBlock(ch, emb, ch, g, p)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb, mult * cfg.base_channels, g, p)]
                ch = mult * cfg.base_channels
                if ds in cfg.attention_ds:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, g, p, up=True))
                    ds //= 2
                self.output_blocks.append(Stage(layers))
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))
        mid = cfg.channel_mult[-1] * cfg.base_channels
        if cfg.curve_knots and (cfg.in_channels, cfg.out_channels) != (1, 1):
            raise ValueError("an intensity curve maps one input channel to one output channel")
        self.curve = IntensityCurve(mid, cfg.curve_knots) if cfg.curve_knots else None

    def forward(self, image: torch.Tensor, context: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        return self.body(image, self.class_embed(class_id), context)    # emb: (N, 4·base)

    def body(self, image: torch.Tensor, emb, context) -> torch.Tensor:
        """The U-Net over ``image`` with ``emb`` for the res blocks and ``context`` for the
        transformers (export passes the domain index for both; its table layers read it)."""
        h, skips = image, []
        for stage in self.input_blocks:
            h = stage(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        curve = None if self.curve is None else self.curve(image, h)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h) if curve is None else self.out(h) + curve


class IntensityCurve(nn.Module):
    """A piecewise-linear curve of the input intensity, added to the U-Net's output: the
    values at ``knots`` evenly spaced intensities in [0, 1] are read off the pooled
    bottleneck features (which carry the target's conditioning and what the source looks
    like), so one curve per image and target, as a histogram match is one per volume.
    Zero at initialisation (the plain U-Net). image (N, 1, H, W), features (N, C, h, w)
    → (N, 1, H, W)."""

    def __init__(self, channels: int, knots: int):
        super().__init__()
        if knots < 2:
            raise ValueError(f"an intensity curve needs at least 2 knots, got {knots}")
        self.to_values = _zero(nn.Linear(channels, knots))
        self.register_buffer("positions", torch.arange(knots, dtype=torch.float32).view(1, knots, 1, 1))

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        values = self.to_values(features.mean(dim=(2, 3)))[:, :, None, None]        # (N, K, 1, 1)
        where = image.clamp(0.0, 1.0) * (self.positions.shape[1] - 1)              # in knot units
        weights = F.relu(1.0 - (where - self.positions).abs())                     # linear interpolation
        return (weights * values).sum(dim=1, keepdim=True)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())
