"""Tiny checkpoints and phantom-like slices for the export tests (seconds on 2 cores)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

TINY_UNET = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, groups=4, head_channels=8,
                 attention_ds=(4,), context_dim=16)
TINY_NET = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), groups=4, dropout=0.0)
SHORT_SCHEDULE = dict(num_timesteps=20, beta_start=1e-3, beta_end=0.2)


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Untrained but well-scaled weights: zero-initialised convs/linears get PyTorch's default
    init, then every parameter a little noise (norm affines, tables), so outputs depend on
    every layer and keep the magnitude of a trained network's."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)) and not layer.weight.any():
                layer.reset_parameters()
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def generator_payload(seed: int = 0, domains: str = "T1,T2,PD", unet: dict | None = None) -> dict:
    """A clip-free ``galip-train generator`` payload with random (EMA) weights."""
    from galip.runtime.domains import parse_domains
    from galip.train.i2i.trainer import I2ITrainer, TrainConfig
    from galip.train.i2i.unet import UNetConfig
    from galip.train.slices import preprocess_config

    config = TrainConfig(steps=1, size=32, batch=1, backbone="none", seed=seed,
                         unet=UNetConfig(**(unet or TINY_UNET)), context_tokens=4, conv_channels=8)
    trainer = I2ITrainer(config, parse_domains(domains))
    _randomise(trainer.ema.module, seed + 1)
    _randomise(trainer.generator, seed + 2)
    return {**trainer.state_dict(), "preprocess": preprocess_config(32), "data_dir": None}


def diffusion_payload(seed: int = 0, target: str = "T2", net: dict | None = None,
                      schedule: dict | None = None) -> dict:
    """A ``galip-train diffusion`` payload (the trainer's keys) with random (EMA) weights."""
    from galip.runtime.domains import get_domain
    from galip.train.midiffusion.conditioning import LMIConfig
    from galip.train.midiffusion.schedule import DATA_RANGE, DDPMSchedule
    from galip.train.midiffusion.scorenet import ScoreNet, ScoreNetConfig
    from galip.train.midiffusion.trainer import DiffusionTrainConfig
    from galip.train.slices import preprocess_config
    from dataclasses import asdict

    torch.manual_seed(seed)
    net_config = ScoreNetConfig(**(net or TINY_NET))
    model = ScoreNet(net_config)
    ema = ScoreNet(net_config)
    ema.load_state_dict(model.state_dict())
    _randomise(ema, seed + 1)
    return {
        "format": "galip-midiffusion", "version": 1, "step": 1, "total_steps": 1,
        "model": model.state_dict(), "ema": {"decay": 0.9999, "module": ema.state_dict()},
        "config": {"train": asdict(DiffusionTrainConfig(target=target, size=32)),
                   "net": net_config.to_dict(),
                   "schedule": DDPMSchedule(**(schedule or SHORT_SCHEDULE)).to_dict(),
                   "lmi": LMIConfig().to_dict(), "data_range": list(DATA_RANGE)},
        "target": get_domain(target).to_dict(),
        "preprocess": preprocess_config(32), "data_dir": None,
    }


def ort_session(model, threads: int = 1):
    """onnxruntime CPU session of an in-memory ModelProto (one thread: the CPU is shared)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def save_payload(payload: dict, path: Path) -> Path:
    from galip.train.checkpoint import save_checkpoint
    return save_checkpoint(path, payload)


def phantom_slices(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Brain-like slices (n, 1, h, w) float32 in [0, 1]: a smooth head ellipse with a
    darker rim, smooth 'tissue' texture inside and a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, 1, h, w), np.float32)
    for i in range(n):
        cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
        r = ((yy - cy) / (0.42 * h)) ** 2 + ((xx - cx) / (0.40 * w)) ** 2
        head = (r < 1.0).astype(np.float64)
        tissue = ndimage.gaussian_filter(rng.random((h, w)), sigma=max(h, w) / 16)
        tissue = (tissue - tissue.min()) / (np.ptp(tissue) + 1e-12)
        img = head * (0.35 + 0.55 * tissue) + 0.25 * ((r > 0.8) & (r < 1.0))
        out[i, 0] = ndimage.gaussian_filter(img, 0.7).clip(0, 1)
    return out
