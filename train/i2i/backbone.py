"""The frozen vision-language backbone behind I2I-Galip's discriminator and CLIP losses.

One small interface (paper §3.2, Fig. 1a), two implementations:

- :class:`BiomedCLIPBackbone` — the real BiomedCLIP (open_clip), imported lazily and
  loaded offline from the user's Hugging Face cache only;
- :class:`TinyViTBackbone` — a small pure-PyTorch ViT + byte-level text encoder with the
  same shapes contract and a deterministic initialisation, so CI exercises every line
  behind the interface (heads, CLIP and CLS losses) without open_clip.

Both are frozen (``requires_grad=False``, eval mode); gradients still flow through
``encode_image`` to the generated images.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from galip.runtime.errors import ConfigError

from .unet import Attention

BIOMEDCLIP_HUB = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
# OpenAI CLIP normalisation, which BiomedCLIP's preprocessing uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageFeatures(NamedTuple):
    """What the discriminator and the CLIP/CLS losses read from the ViT.

    patch_tokens: list of (N, T, width), tapped blocks after the final LayerNorm,
    CLS token dropped (BiomedCLIP: 4 × (N, 196, 768)); cls: (N, width) final-norm CLS
    token; embedding: (N, embed_dim) joint image embedding (unnormalised).
    """

    patch_tokens: list[torch.Tensor]
    cls: torch.Tensor
    embedding: torch.Tensor


class VisionLanguageBackbone(Protocol):
    """``encode_captions(list[str]) -> (context (D, L, C), embedding (D, E))`` and
    ``encode_image((N, 1, H, W) in [0, 1]) -> ImageFeatures``."""

    name: str
    context_dim: int     # C: width of the caption context tokens fed to cross-attention
    embed_dim: int       # E: joint embedding (conditions the heads; Eq. 10)
    width: int           # ViT token width read by the heads
    n_taps: int          # number of tapped blocks (one head each)

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_image(self, x: torch.Tensor) -> ImageFeatures: ...


def clip_preprocess(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Gray → 3 channels → bicubic resize to ``image_size`` → CLIP mean/std.

    x: (N, 1, H, W) in [0, 1] → (N, 3, image_size, image_size); differentiable.
    """
    x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- tiny ViT
@dataclass
class TinyViTConfig:
    """Shapes of the test backbone. Defaults mirror BiomedCLIP's token grid (224/16 → 196
    tokens, blocks 3/6/9/12) at a fraction of the width; tests shrink it further."""

    image_size: int = 224
    patch: int = 16
    width: int = 64
    depth: int = 12
    heads: int = 4
    taps: tuple[int, ...] = (3, 6, 9, 12)   # 1-based block indices read by the heads
    embed_dim: int = 512
    context_dim: int = 512
    context_length: int = 32
    text_width: int = 64
    seed: int = 0                           # init is a function of this seed only

    def to_dict(self) -> dict:
        d = asdict(self)
        d["taps"] = list(self.taps)
        return d


class TinyViTBackbone(nn.Module):
    """Pure-PyTorch stand-in for BiomedCLIP with the same interface and frozen weights."""

    name = "tiny"

    def __init__(self, config: TinyViTConfig | None = None):
        super().__init__()
        cfg = self.config = config or TinyViTConfig()
        if cfg.image_size % cfg.patch:
            raise ConfigError(f"tiny ViT image_size {cfg.image_size} is not a multiple of patch {cfg.patch}")
        self.context_dim, self.embed_dim, self.width = cfg.context_dim, cfg.embed_dim, cfg.width
        self.n_taps = len(cfg.taps)
        n_tokens = (cfg.image_size // cfg.patch) ** 2
        with torch.random.fork_rng():            # deterministic init, global RNG untouched
            torch.manual_seed(cfg.seed)
            self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)
            self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, cfg.width))
            self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_tokens + 1, cfg.width))
            self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
            self.norm = nn.LayerNorm(cfg.width)
            self.image_proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
            self.byte_embed = nn.Embedding(257, cfg.text_width)       # 256 bytes + pad
            self.text_pos = nn.Parameter(0.02 * torch.randn(1, cfg.context_length, cfg.text_width))
            self.text_block = _Block(cfg.text_width, 2)
            self.token_proj = nn.Linear(cfg.text_width, cfg.context_dim, bias=False)
            self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "TinyViTBackbone":  # frozen: always eval
        return super().train(False)

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        length = self.config.context_length
        ids = torch.full((len(captions), length), 256, dtype=torch.long)
        for row, caption in enumerate(captions):
            data = list(caption.encode("utf-8"))[:length]
            ids[row, :len(data)] = torch.tensor(data, dtype=torch.long)
        return ids

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (D strings) → context (D, context_length, context_dim), embedding (D, embed_dim)."""
        h = self.text_block(self.byte_embed(self._tokenize(captions)) + self.text_pos)
        return self.token_proj(h), self.text_proj(h[:, 0])

    def encode_image(self, x: torch.Tensor) -> ImageFeatures:
        """x (N, 1, H, W) in [0, 1] → ImageFeatures with (N, (S/p)², width) tokens per tap."""
        h = self.patch_embed(clip_preprocess(x, self.config.image_size)).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        taps = []
        for index, block in enumerate(self.blocks, start=1):
            h = block(h)
            if index in self.config.taps:
                taps.append(self.norm(h)[:, 1:])
        cls = self.norm(h)[:, 0]
        return ImageFeatures(taps, cls, self.image_proj(cls))


class _Block(nn.Module):
    """Pre-norm ViT block: x + attn(LN x), x + MLP(LN x). x: (N, T, width)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, width // heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- BiomedCLIP
def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except Exception:  # huggingface_hub missing: report the default location
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))


def _import_open_clip():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never download at training time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import open_clip
    except Exception as error:  # ImportError, or torchvision failing against a CPU torch
        raise ConfigError(
            f"--backbone biomedclip needs open_clip, which does not import here ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no detail'}); it pulls torchvision, "
            "which needs a CUDA torch build: install open_clip_torch, transformers and timm where torchvision "
            "works, or use --backbone tiny / none") from None
    return open_clip


class BiomedCLIPBackbone(nn.Module):
    """BiomedCLIP (ViT-B/16 224 + PubMedBERT, context 256, joint 512) behind the interface.

    Loaded offline from the local Hugging Face cache; a missing cache is a one-line
    ConfigError naming the cache folder. Caption context = the text projection applied
    to every last-hidden-state token: (D, 256, 512).
    """

    name = "biomedclip"
    context_dim, embed_dim, width, n_taps = 512, 512, 768, 4
    taps = (3, 6, 9, 12)
    image_size = 224

    def __init__(self, hub_name: str = BIOMEDCLIP_HUB):
        super().__init__()
        open_clip = _import_open_clip()
        try:
            model, _ = open_clip.create_model_from_pretrained(hub_name)
            self.tokenizer = open_clip.get_tokenizer(hub_name)
        except Exception as error:
            raise ConfigError(
                f"BiomedCLIP weights {hub_name} are not in the Hugging Face cache {_hf_cache_dir()} "
                f"({type(error).__name__}); download them once with network access, e.g. "
                f"python -c \"import open_clip; open_clip.create_model_from_pretrained('{hub_name}'); "
                f"open_clip.get_tokenizer('{hub_name}')\"") from None
        trunk = getattr(model.visual, "trunk", None)
        missing = [a for a in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm")
                   if not hasattr(trunk, a)]
        if missing:
            raise ConfigError(f"BiomedCLIP's image tower lacks {', '.join(missing)}; galip reads the timm "
                              "VisionTransformer API of timm >= 0.9: upgrade timm")
        self.model = model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "BiomedCLIPBackbone":  # frozen: always eval
        return super().train(False)

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions → context (D, 256, 512) projected tokens, embedding (D, 512)."""
        ids = self.tokenizer(captions)
        text = self.model.text
        mask = (ids != text.config.pad_token_id).long()
        hidden = text.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        return text.proj(hidden), self.model.encode_text(ids)

    def encode_image(self, x: torch.Tensor) -> ImageFeatures:
        """x (N, 1, H, W) in [0, 1] → 4 × (N, 196, 768) tokens, CLS (N, 768), embedding (N, 512)."""
        trunk = self.model.visual.trunk                       # timm VisionTransformer
        h = trunk.patch_embed(clip_preprocess(x, self.image_size))
        h = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(h)))
        prefix = getattr(trunk, "num_prefix_tokens", 1)
        taps = []
        for index, block in enumerate(trunk.blocks, start=1):
            h = block(h)
            if index in self.taps:
                taps.append(trunk.norm(h)[:, prefix:])
        cls = trunk.norm(h)[:, 0]
        return ImageFeatures(taps, cls, self.model.visual.head(cls))


def make_backbone(mode: str, tiny: TinyViTConfig | None = None) -> nn.Module | None:
    """``"biomedclip"`` | ``"tiny"`` → a frozen backbone; ``"none"`` → None (clip-free)."""
    if mode == "biomedclip":
        return BiomedCLIPBackbone()
    if mode == "tiny":
        return TinyViTBackbone(tiny)
    if mode == "none":
        return None
    raise ConfigError(f"unknown backbone {mode!r}; expected biomedclip, tiny or none")
