"""One I2I-Galip training step, the optimisers, the schedule and the checkpoint payload.

:class:`I2ITrainer` owns the generator (+ EMA), the discriminator, the frozen backbone,
Adam for G and D with a constant-then-linear-decay schedule, and turns into / restores
from a plain-data payload (``torch.load(weights_only=True)``-safe). The step is a
function of (weights, batch, step index) only, so N straight steps equal N/2 + save +
resume + N/2.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from galip.runtime.domains import Domain
from galip.runtime.errors import ConfigError
from galip.train.ema import EMA

from .backbone import TinyViTConfig, make_backbone
from .heads import ConvDiscriminator, ViTDiscriminator
from .losses import (LossWeights, clip_loss, cls_loss, l1, l1_where_known, lsgan_discriminator,
                     lsgan_generator, total_generator_loss)
from .model import ConditionedGenerator
from .unet import UNetConfig

PAYLOAD_FORMAT = "galip-i2i-generator"
PAYLOAD_VERSION = 1
MODES = ("biomedclip", "tiny", "none")


@dataclass
class TrainConfig:
    """Everything that defines a run besides data and domains (stored in the checkpoint)."""

    steps: int = 10_000
    size: int = 128
    batch: int = 4
    backbone: str = "biomedclip"     # biomedclip | tiny | none (clip-free)
    seed: int = 0
    lr: float = 2e-4
    lr_d: float | None = None        # discriminator lr (None: lr); a faster D keeps G's adversarial signal alive
    betas: tuple[float, float] = (0.5, 0.99)
    ema_decay: float = 0.99
    weights: LossWeights = field(default_factory=LossWeights)
    unet: UNetConfig = field(default_factory=UNetConfig)
    tiny: TinyViTConfig = field(default_factory=TinyViTConfig)
    context_tokens: int = 8          # clip-free: learned tokens per domain
    conv_channels: int = 64          # clip-free: width of the PatchGAN heads
    histogram_head: bool = False     # clip-free: add a whole-image intensity-histogram head per domain
    # identity weight from step identity_late_from on (None: weights.identity throughout):
    # a high weight early keeps the generator out of the brightness-flip attractor, a lower
    # one later leaves it room to invert a contrast where the target needs it
    identity_late: float | None = None
    identity_late_from: int = 0
    # prior weight from step prior_late_from on (None: weights.prior throughout): the
    # pseudo-targets show the way early; later the adversarial terms may refine past them
    prior_late: float | None = None
    prior_late_from: int = 0
    prior_split_vote: str = "skip"   # a pair whose sign vote splits: no pseudo-target, or "plain" (prior.py)
    prior_bias_correction: bool = False   # match N4-corrected volumes (prior.py; needs SimpleITK)
    # source domains whose pseudo-pairs are synthetic, made from the other domains' subjects (prior.py)
    prior_back_translate: tuple[str, ...] = ()
    bias_field: str = "none"         # "n4": train on bias-free slices, as the runtime then feeds them (runtime/bias.py)
    crop: int = 0                    # random crop x crop windows of the slices (0: whole slices)
    crop_on_foreground: bool = False  # centre each window on a foreground pixel where the slice has one
    min_foreground: float = 0.05     # drop slices with less foreground (0: every slice, empty ones too)
    axes: tuple[int, ...] = (2,)     # slicing axes the training slices are taken along

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"], d["axes"] = list(self.betas), list(self.axes)
        d["prior_back_translate"] = list(self.prior_back_translate)
        d["unet"], d["tiny"] = self.unet.to_dict(), self.tiny.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        d["axes"] = tuple(d.get("axes", (2,)))
        d["prior_back_translate"] = tuple(d.get("prior_back_translate", ()))
        d["weights"] = LossWeights(**d["weights"])
        d["unet"] = UNetConfig.from_dict(d["unet"])
        tiny = dict(d["tiny"])
        tiny["taps"] = tuple(tiny["taps"])
        d["tiny"] = TinyViTConfig(**tiny)
        return cls(**d)


def lr_factor(step: int, total: int) -> float:
    """Constant lr for the first half of the steps, then linear decay to 0 at ``total``."""
    start = total // 2
    if step < start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - start))


def pick_domains(seed: int, step: int, n_domains: int) -> tuple[int, int]:
    """Source and target domain indices of one step (source ≠ target), stateless in step."""
    a, b = np.random.default_rng([seed, step]).choice(n_domains, size=2, replace=False)
    return int(a), int(b)


class I2ITrainer:
    """Builds the models from ``config`` and ``domains`` (deterministic in ``config.seed``).

    ``backbone`` may be passed to share one frozen instance between trainers (tests).
    """

    def __init__(self, config: TrainConfig, domains: list[Domain], backbone: nn.Module | None = None):
        if config.backbone not in MODES:
            raise ConfigError(f"unknown backbone {config.backbone!r}; expected one of {', '.join(MODES)}")
        if len(domains) < 2:
            raise ConfigError(f"I2I-Galip translates between domains; got {len(domains)}, need at least 2")
        config = copy.deepcopy(config)          # the fields filled in below stay ours
        self.config, self.domains, self.step = config, list(domains), 0
        self.mode = config.backbone
        self.backbone = backbone if backbone is not None else make_backbone(self.mode, config.tiny)
        torch.manual_seed(config.seed)          # initialisation below is a function of the seed
        # 1. per-domain context table: caption tokens (frozen) or learned tokens (clip-free)
        if self.backbone is not None:
            context, self.text_emb = self.backbone.encode_captions([d.caption for d in domains])
            context_dim = self.backbone.context_dim
        else:
            context_dim = config.unet.context_dim
            context, self.text_emb = torch.randn(len(domains), config.context_tokens, context_dim), None
        config.unet.context_dim = context_dim
        config.unet.n_classes = max(config.unet.n_classes, max(d.class_id for d in domains) + 1)
        if self.mode == "none":
            config.weights.clip = config.weights.cls = 0.0
        self.generator = ConditionedGenerator(config.unet, [d.class_id for d in domains], context,
                                              learn_context=self.backbone is None)
        if self.backbone is not None:
            self.discriminator: nn.Module = ViTDiscriminator(
                len(domains), self.backbone.n_taps, self.backbone.width, self.backbone.embed_dim)
        else:
            self.discriminator = ConvDiscriminator(len(domains), config.conv_channels, config.histogram_head)
        self.ema = EMA(self.generator, config.ema_decay)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=config.betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_d or config.lr, betas=config.betas)
        schedule = lambda s: lr_factor(s, config.steps)  # noqa: E731
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, schedule)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, schedule)

    # ------------------------------------------------------------------ one step
    def _disc_inputs(self, images: torch.Tensor, parts: int, grad: bool):
        """Split discriminator inputs of ``images`` (parts·N, 1, H, W) and the ViT features.

        Returns ([inputs of part 0, part 1, ...], ImageFeatures or None); an input is the
        image (clip-free) or the list of tapped patch tokens (ViT modes).
        """
        if self.backbone is None:
            return list(images.chunk(parts)), None
        with torch.set_grad_enabled(grad):
            feats = self.backbone.encode_image(images)
        per_tap = [t.chunk(parts) for t in feats.patch_tokens]
        return [[tap[i] for tap in per_tap] for i in range(parts)], feats

    def weights_at(self, step: int) -> LossWeights:
        """The loss weights of step ``step`` (0-based): the identity weight drops to
        ``identity_late`` from ``identity_late_from`` on, the prior's to ``prior_late``
        from ``prior_late_from``."""
        c, w = self.config, self.config.weights
        if c.identity_late is not None and step >= c.identity_late_from:
            w = dataclasses.replace(w, identity=c.identity_late)
        if c.prior_late is not None and step >= c.prior_late_from:
            w = dataclasses.replace(w, prior=c.prior_late)
        return w

    def train_step(self, x_a: torch.Tensor, x_b: torch.Tensor, a: int, b: int) -> dict[str, float]:
        """One G and one D update on unpaired batches x_a (domain a) and x_b (domain b);
        without adversarial (nor CLIP) terms, no D update and no "D" entry.

        x_a, x_b: (N, 1, H, W) float32 in [0, 1], or (N, 1 + domains, H, W) with channel
        1 + d the pseudo-target for domain d (NaN where there is none; train/i2i/prior.py).
        Returns the loss values as floats. A non-finite G or D loss raises ConfigError
        before that network's optimiser step.
        """
        G, D, w = self.generator, self.discriminator, self.weights_at(self.step)
        pseudo_b = pseudo_a = None
        if x_a.shape[1] > 1:
            pseudo_b, pseudo_a = x_a[:, 1 + b:2 + b], x_b[:, 1 + a:2 + a]
            x_a, x_b = x_a[:, :1], x_b[:, :1]
        n = x_a.shape[0]
        t_a, t_b = torch.full((n,), a, dtype=torch.long), torch.full((n,), b, dtype=torch.long)
        e_a = e_b = None
        if self.text_emb is not None:
            e_a, e_b = self.text_emb[a].expand(n, -1), self.text_emb[b].expand(n, -1)
        G.train(); D.train()

        # 1. translations (Eq. 6–7) and identities (Eq. 12) in one batched pass
        fake_b, fake_a, idt_a, idt_b = G(torch.cat([x_a, x_b, x_a, x_b]),
                                         torch.cat([t_b, t_a, t_a, t_b])).chunk(4)
        terms = {"identity": l1(idt_a, x_a) + l1(idt_b, x_b)}
        # 2. cycle back to the source domains (Eq. 9); a term whose weight is 0 (a
        #    prior-only stage) costs nothing: neither its passes nor the discriminator's
        if w.cycle > 0:
            rec_a, rec_b = G(torch.cat([fake_b, fake_a]), torch.cat([t_a, t_b])).chunk(2)
            terms["cycle"] = l1(rec_a, x_a) + l1(rec_b, x_b)
        adversarial = w.adv > 0 or w.clip > 0 or w.cls > 0     # clip-free mode zeroes clip and cls
        if adversarial:
            # 3. discriminator inputs: ViT features of generated (with grad) and real images (Eq. 4–7)
            (fake_in_a, fake_in_b), fake_feats = self._disc_inputs(torch.cat([fake_a, fake_b]), 2, grad=True)
            (real_in_a, real_in_b), real_feats = self._disc_inputs(torch.cat([x_a, x_b]), 2, grad=False)
            # 4. generator objective: Eq. 1 with Eq. 2, 9, 12 (+ Eq. 10, 11 with a ViT)
            D.requires_grad_(False)
            terms["adv"] = lsgan_generator(D(fake_in_a, a, e_a)) + lsgan_generator(D(fake_in_b, b, e_b))
            if fake_feats is not None:
                emb_fa, emb_fb = fake_feats.embedding.chunk(2)
                cls_fa, cls_fb = fake_feats.cls.chunk(2)
                cls_ra, cls_rb = real_feats.cls.chunk(2)
                terms["clip"] = clip_loss(emb_fa, e_a) + clip_loss(emb_fb, e_b)
                terms["cls"] = cls_loss(cls_ra, cls_fa) + cls_loss(cls_rb, cls_fb)
        if pseudo_b is not None and w.prior > 0:
            terms["prior"] = l1_where_known(fake_b, pseudo_b) + l1_where_known(fake_a, pseudo_a)
        loss_g = total_generator_loss(terms, w)
        g_value = _finite_or_raise("G", loss_g, self.step)     # before any weight changes
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.ema.update(G)

        # 5. discriminator objective, Eq. 3. The ViT is frozen and deterministic, so the
        #    detached features equal the features of the detached images: reuse them.
        if adversarial:
            D.requires_grad_(True)
            loss_d = (lsgan_discriminator(D(real_in_a, a, e_a), D(_detach(fake_in_a), a, e_a))
                      + lsgan_discriminator(D(real_in_b, b, e_b), D(_detach(fake_in_b), b, e_b)))
            d_value = _finite_or_raise("D", loss_d, self.step)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            self.sched_d.step()         # whether a run is adversarial never changes within it

        self.sched_g.step()
        self.step += 1
        out = {name: float(value.detach()) for name, value in terms.items()}
        out["G"] = g_value
        if adversarial:
            out["D"] = d_value
        return out

    def step_from(self, sampler) -> dict[str, float]:
        """Draw the step's domain pair and batches from a SliceSampler, then train once."""
        a, b = pick_domains(self.config.seed, self.step, len(self.domains))
        x_a = torch.from_numpy(np.ascontiguousarray(sampler.sample(self.domains[a].name)))
        x_b = torch.from_numpy(np.ascontiguousarray(sampler.sample(self.domains[b].name)))
        return self.train_step(x_a, x_b, a, b)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Checkpoint payload (plain data + tensors); see module docstring of cli.py."""
        ema_state = self.ema.state_dict()
        return {
            "format": PAYLOAD_FORMAT, "version": PAYLOAD_VERSION,
            "mode": self.mode, "step": self.step, "total_steps": self.config.steps,
            "train_config": self.config.to_dict(),
            "unet_config": self.config.unet.to_dict(),
            "domains": [d.to_dict() for d in self.domains],
            "context": ema_state["module"]["context"].clone(),
            "text_embeddings": None if self.text_emb is None else self.text_emb.clone(),
            "generator": self.generator.state_dict(),
            "generator_ema": ema_state,
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
        }

    def start_from(self, payload: dict, source: str | Path = "checkpoint") -> None:
        """Take the networks (generator, its EMA, discriminator) of another generator
        checkpoint; the optimisers, the lr schedule and the step start afresh (fine-tuning,
        e.g. a trained generator under other loss weights). One-line ConfigError unless its
        networks have the shapes and domains of this trainer's."""
        check_format(payload, source)
        mine = self._network_facts()
        theirs = {"backbone": payload["mode"], "domains": [d["name"] for d in payload["domains"]],
                  "unet": UNetConfig.from_dict(payload["unet_config"]).to_dict(),   # older: fewer keys
                  **{key: payload["train_config"].get(key) for key in ("conv_channels", "histogram_head")}}
        differ = [key for key in mine if mine[key] != theirs[key]]
        if differ:
            raise ConfigError(f"--init-from {source} has another {', '.join(differ)} than this run "
                              f"({'; '.join(f'{k}: {theirs[k]} there, {mine[k]} here' for k in differ)})")
        self._load_networks(payload)

    def _load_networks(self, payload: dict) -> None:
        """The generator, its EMA and the discriminator of a checkpoint payload."""
        self.generator.load_state_dict(payload["generator"])
        self.ema.load_state_dict(payload["generator_ema"])
        self.discriminator.load_state_dict(payload["discriminator"])

    def _network_facts(self) -> dict:
        """What decides the networks' shapes, as a checkpoint records it."""
        return {"backbone": self.mode, "domains": [d.name for d in self.domains],
                "unet": self.config.unet.to_dict(), "conv_channels": self.config.conv_channels,
                "histogram_head": self.config.histogram_head}

    def load_state_dict(self, payload: dict) -> None:
        """Restore weights, EMA, optimisers, schedules and the step from a payload."""
        check_format(payload)
        self._load_networks(payload)
        self.opt_g.load_state_dict(payload["opt_g"]); self.opt_d.load_state_dict(payload["opt_d"])
        self.sched_g.load_state_dict(payload["sched_g"]); self.sched_d.load_state_dict(payload["sched_d"])
        self.step = int(payload["step"])


def check_format(payload: dict, source: str | Path = "checkpoint") -> None:
    """One-line ConfigError unless ``payload`` is a generator checkpoint of this version."""
    if payload.get("format") != PAYLOAD_FORMAT or payload.get("version") != PAYLOAD_VERSION:
        raise ConfigError(f"{source} holds a {payload.get('format', 'unknown')!r} checkpoint (version "
                          f"{payload.get('version')}), expected {PAYLOAD_FORMAT!r} version {PAYLOAD_VERSION}; "
                          "resume it with the command that wrote it or train into another --out")


def _finite_or_raise(name: str, loss: torch.Tensor, step: int) -> float:
    """``loss`` as a float; a one-line ConfigError if it is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ConfigError(f"non-finite {name} loss at step {step + 1} ({value}); lower the learning "
                          "rate or check the data (the last checkpoint is kept)")
    return value


def _detach(inputs):
    """Detach an image tensor or a list of token tensors."""
    return inputs.detach() if isinstance(inputs, torch.Tensor) else [t.detach() for t in inputs]
