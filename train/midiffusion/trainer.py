"""Training of the MIDiffusion score network on the target contrast only (paper Eq. 12).

DDPM training (Ho et al. 2020, Alg. 1) with the LMI condition built from the clean
target slice: ε_θ([x_t, LMI(x_0, u(x_t)), LMI(x_0, x_0)], t) regresses ε. Adam 3e-4,
gradient clipping 1.0, EMA 0.9999, batch 4 (docs/design.md). Checkpoint conventions are the
generator's: ``OUT/checkpoint.pt`` written atomically every ``save_every`` steps, at the
end and on Ctrl-C, holding everything needed to continue bit-for-bit.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from galip.runtime.domains import get_domain
from galip.runtime.errors import ConfigError

from ..checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from ..ema import EMA
from ..interrupt import deferred_interrupt
from ..progress import TrainingProgress
from ..run_folder import check_run_folder
from ..slices import SliceSampler, load_training_slices, preprocess_config
from .conditioning import LMIConfig, LMIDenoiser
from .schedule import DATA_RANGE, DDPMSchedule, img2x, q_sample
from .scorenet import ScoreNet, ScoreNetConfig

PAYLOAD_FORMAT = "galip-midiffusion"
PAYLOAD_VERSION = 1
LOG_EVERY = 50


@dataclass
class DiffusionTrainConfig:
    """Settings of one training run (stored in the checkpoint under config.train)."""

    target: str = "T2"
    steps: int = 100_000
    size: int = 128
    batch: int = 4
    seed: int = 0
    save_every: int = 1000
    lr: float = 3e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    axis: int = 2
    spacing: float | None = None
    crop: int = 0                   # > 0: train on random crop x crop windows of the slices
    crop_on_foreground: bool = True  # centre each window on anatomy when the slice has some
    min_foreground: float = 0.05    # drop slices with less foreground than this


# Settings a resumed run must share with its checkpoint (steps and save_every may change).
FIXED_ON_RESUME = ("target", "size", "batch", "seed", "lr", "grad_clip", "ema_decay", "axis", "spacing",
                   "crop", "crop_on_foreground", "min_foreground")


def resolve_config(given: dict, stored: dict | None) -> DiffusionTrainConfig:
    """Settings given on the command line (``None`` = not given) over the checkpoint's
    (resume) or the defaults (fresh run); a given value that contradicts the checkpoint
    is a one-line ``ConfigError``."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(DiffusionTrainConfig)}
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}")
    if "target" in given:
        given["target"] = get_domain(given["target"]).name
    if stored is None:
        config = DiffusionTrainConfig(**given)
    else:
        for key in FIXED_ON_RESUME:
            if key in given and given[key] != stored[key]:
                raise ConfigError(f"--{key.replace('_', '-')} {given[key]} contradicts the checkpoint "
                                  f"({stored[key]}); omit it to resume, or train into a new --out")
        config = replace(DiffusionTrainConfig(**stored), **given)
    _validate(config)
    return config


def _validate(config: DiffusionTrainConfig) -> None:
    for key in ("steps", "batch", "save_every"):
        if getattr(config, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(config, key)}")
    if config.crop < 0 or config.crop > config.size:
        raise ConfigError(f"--crop must be between 0 (whole slices) and --size {config.size}, got {config.crop}")
    if not 0.0 <= config.ema_decay < 1.0 or config.lr <= 0 or config.grad_clip <= 0:
        raise ConfigError(f"expected lr > 0, grad_clip > 0 and 0 <= ema_decay < 1, got "
                          f"{config.lr}, {config.grad_clip}, {config.ema_decay}")


def training_loss(denoiser: LMIDenoiser, x0_img: torch.Tensor, alpha_bar: torch.Tensor,
                  generator: torch.Generator, lmi_ref_ref: torch.Tensor | None = None) -> torch.Tensor:
    """L_simple = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t | x_0)‖² (Ho et al. Alg. 1; paper Eq. 12).

    ``lmi_ref_ref``: LMI(x_0, x_0) from :func:`cached_reference_lmi` (None recomputes it)."""
    n, device = x0_img.shape[0], x0_img.device
    # 1. t ~ U{0, …, T−1}, ε ~ N(0, I), drawn from the run's own generator (resumable)
    t = torch.randint(0, len(alpha_bar), (n,), generator=generator).to(device)
    eps = torch.randn(x0_img.shape, generator=generator).to(device)
    # 2. forward process q(x_t | x_0) (Ho et al. Eq. 4) in model space [−1, 1]
    x_t = q_sample(img2x(x0_img), t, eps, alpha_bar.to(device))
    # 3. the target slice itself is the LMI reference (zero-shot training, paper Fig. 1 left)
    return F.mse_loss(denoiser(x_t, t, x0_img, lmi_ref_ref), eps)


def cached_reference_lmi(denoiser: LMIDenoiser, slices: np.ndarray, chunk: int = 16) -> np.ndarray:
    """LMI(x_0, x_0) of every training slice, (n, H, W) float32, computed once.

    It depends on the slice only, so recomputing it every step (as the reference code
    does) only costs time. Taken on the whole slice, so a crop of it is the map the
    runtime computes on a whole source slice, cut at the same window."""
    maps = [denoiser.reference_lmi(torch.from_numpy(slices[i:i + chunk, None]))[:, 0].numpy()
            for i in range(0, len(slices), chunk)]
    return np.concatenate(maps).astype(np.float32)


def check_size(size: int, net_config: ScoreNetConfig) -> None:
    if size < net_config.size_multiple or size % net_config.size_multiple:
        raise ConfigError(f"--size must be a positive multiple of {net_config.size_multiple}, got {size}")


def train_diffusion(out_dir: str | Path, given: dict, *, data_dir: str | Path | None = None,
                    slices: np.ndarray | None = None, resume: bool = False,
                    net_config: ScoreNetConfig | None = None, schedule: DDPMSchedule | None = None,
                    lmi_config: LMIConfig | None = None, progress: bool = True,
                    device: str | None = None) -> dict:
    """Train (or resume) into ``out_dir``; returns ``{"step", "loss", "interrupted", "checkpoint"}``.

    ``given``: :class:`DiffusionTrainConfig` fields, ``None`` meaning "not given".
    Training slices come from ``data_dir`` (galip-data output) or, for tests, ``slices``
    (n, size, size) in [0, 1]. ``net_config``/``schedule``/``lmi_config`` apply to a fresh
    run; a resumed run takes them from its checkpoint.
    """
    out_dir = Path(out_dir)
    path = check_run_folder(data_dir if slices is None else None, out_dir, resume)
    payload = None
    if resume:
        payload = load_checkpoint(path)
        _check_format(payload, path)                # before reading any key of it
    config = resolve_config(given, payload["config"]["train"] if payload else None)
    if payload:
        net_config = ScoreNetConfig.from_dict(payload["config"]["net"])
        schedule = DDPMSchedule.from_dict(payload["config"]["schedule"])
        lmi_config = LMIConfig.from_dict(payload["config"]["lmi"])
    net_config, schedule = net_config or ScoreNetConfig(), schedule or DDPMSchedule()
    lmi_config = lmi_config or LMIConfig()
    check_size(config.size, net_config)
    domain = get_domain(config.target)
    if slices is None:
        if data_dir is None:
            raise ValueError("train_diffusion needs data_dir or slices")
        slices = load_training_slices(data_dir, [domain], config.size, axis=config.axis,
                                      spacing=config.spacing, split="all",
                                      min_foreground=config.min_foreground)[domain.name]
    if slices.ndim != 3 or slices.shape[1:] != (config.size, config.size):
        raise ConfigError(f"training slices have shape {slices.shape}, expected (n, {config.size}, {config.size})")

    # 1. model, EMA, optimiser, the run's noise generator and the slice sampler
    torch.manual_seed(config.seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    denoiser = LMIDenoiser(ScoreNet(net_config), lmi_config).to(device).train()
    ema = EMA(denoiser.net, config.ema_decay)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    # each slice travels with its cached LMI(x_0, x_0), cut at the same window
    stack = np.stack([slices, cached_reference_lmi(denoiser, slices)], axis=1)
    sampler = SliceSampler({domain.name: stack}, config.batch, config.seed, config.crop,
                           config.crop_on_foreground)
    alpha_bar = schedule.alphas_cumprod.to(device)
    step = 0
    if payload:
        denoiser.net.load_state_dict(payload["model"])
        ema.load_state_dict(payload["ema"])
        optimizer.load_state_dict(payload["optimizer"])
        generator.set_state(payload["noise_generator"])
        sampler.load_state_dict(payload["sampler"])
        restore_rng(payload["rng"])
        step = int(payload["step"])

    def save() -> None:
        save_checkpoint(path, {
            "format": PAYLOAD_FORMAT, "version": PAYLOAD_VERSION, "step": step,
            "total_steps": config.steps,
            "model": denoiser.net.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": capture_rng(),
            "noise_generator": generator.get_state(), "sampler": sampler.state_dict(),
            "config": {"train": asdict(config), "net": net_config.to_dict(),
                       "schedule": schedule.to_dict(), "lmi": lmi_config.to_dict(),
                       "data_range": list(DATA_RANGE)},
            "target": domain.to_dict(),
            "preprocess": preprocess_config(config.size, axis=config.axis, spacing=config.spacing,
                                            min_foreground=config.min_foreground),
            "data_dir": None if data_dir is None else str(data_dir),
        })

    # 2. the loop; Ctrl-C is deferred to the end of the current step, then saved
    # one JSON line per LOG_EVERY steps in OUT/train_log.jsonl: the window's mean loss
    # (single-step losses swing with t) and the run's wall time, for runs in the background
    loss_value, interrupted, window = float("nan"), False, []
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path, started = out_dir / "train_log.jsonl", time.monotonic()
    with deferred_interrupt() as stop, log_path.open("a") as log, \
            TrainingProgress(config.steps, step, f"diffusion {domain.name}", disable=not progress) as bar:
        while step < config.steps:
            batch = torch.from_numpy(sampler.sample(domain.name)).to(device)
            loss = training_loss(denoiser, batch[:, :1], alpha_bar, generator, batch[:, 1:])
            loss_value = float(loss.detach())
            if not np.isfinite(loss_value):      # checked before the update: the weights stay good
                save()
                raise ConfigError(f"non-finite loss at step {step + 1} ({loss_value}); lower the "
                                  "learning rate or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), config.grad_clip)
            optimizer.step()
            ema.update(denoiser.net)
            step += 1
            bar.update(step, {"loss": loss_value})
            window.append(loss_value)
            if step % LOG_EVERY == 0 or step == config.steps:
                log.write(json.dumps({"step": step, "loss": float(np.mean(window)),
                                      "seconds": round(time.monotonic() - started, 1)}) + "\n")
                log.flush()
                window = []
            if stop.is_set():
                interrupted = True
                break
            if step % config.save_every == 0 and step < config.steps:
                save()
    save()
    return {"step": step, "loss": loss_value, "interrupted": interrupted, "checkpoint": path}


def load_denoiser(path: str | Path, *, ema: bool = True,
                  device: str | torch.device = "cpu") -> tuple[LMIDenoiser, DDPMSchedule, dict]:
    """The trained ε-model (EMA weights by default) in eval mode, its schedule, and the
    checkpoint's config/target/preprocess entries (what export puts in the manifest)."""
    denoiser, schedule, info = denoiser_from_payload(load_checkpoint(path), ema=ema, source=path)
    return denoiser.to(device), schedule, info


def denoiser_from_payload(payload: dict, *, ema: bool = True,
                          source: str | Path = "checkpoint") -> tuple[LMIDenoiser, DDPMSchedule, dict]:
    """:func:`load_denoiser` for an already loaded payload (on the CPU)."""
    _check_format(payload, source)
    config = payload["config"]
    net = ScoreNet(ScoreNetConfig.from_dict(config["net"]))
    net.load_state_dict(payload["ema"]["module"] if ema else payload["model"])
    denoiser = LMIDenoiser(net, LMIConfig.from_dict(config["lmi"])).eval()
    info = {key: payload[key] for key in ("config", "target", "preprocess", "step")}
    return denoiser, DDPMSchedule.from_dict(config["schedule"]), info


def _check_format(payload: dict, path: Path | str) -> None:
    if payload.get("format") != PAYLOAD_FORMAT or payload.get("version") != PAYLOAD_VERSION:
        raise ConfigError(f"{path} holds a {payload.get('format', 'unknown')!r} checkpoint (version "
                          f"{payload.get('version')}), expected {PAYLOAD_FORMAT!r} version {PAYLOAD_VERSION}")
