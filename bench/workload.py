"""What the benchmark runs on: phantom inputs, random-weight models, their bundle, eager runners.

Latency does not depend on training, so without ``--bundle`` the models are the full-size
architectures (docs/design.md: generator 13,242,881 parameters, score network 8,950,913) with
seeded random weights, saved as ``galip-train`` checkpoints and exported with
:func:`galip.export.bundle_writer.export_checkpoint` into a temporary bundle. Zero-
initialised output layers would make every output 0 (and every agreement check trivially
perfect), so :func:`randomise_` gives each layer non-zero, well-scaled weights first.

The eager PyTorch side is wrapped as a runtime :class:`~galip.runtime.backends.base.Runner`
(:class:`TorchRunner`), so the runtime pipeline (:mod:`galip.runtime.pipeline`) drives eager
PyTorch, onnxruntime and TensorRT through the very same code: preprocessing, batching, the
sampler loop and restoring are identical for every backend of a whole-volume row.
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from galip.runtime.backends.base import Runner, TensorMeta
from galip.train.slices import centre_fit

GENERATOR_DOMAINS = "T1,T2,PD"
SOURCE_CONTRAST = "T1w"
_DTYPES = {"float32": np.float32, "int64": np.int64, "float16": np.float16}


# ----------------------------------------------------------------------------- weights
def randomise_(module: nn.Module, seed: int, scale: float = 0.02) -> nn.Module:
    """Seeded non-trivial weights: zero-initialised conv/linear layers get PyTorch's default
    init again, then every parameter gets N(0, scale²) added (norm affines and embeddings
    included), so every layer shapes the output as a trained one would."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)) and not layer.weight.any():
                layer.reset_parameters()
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return module


def make_generator_checkpoint(path: Path, unet: dict | None = None, *, seed: int = 0, size: int = 128,
                              domains: str = GENERATOR_DOMAINS) -> Path:
    """A clip-free ``galip-train generator`` checkpoint with random (EMA) weights.

    ``unet``: UNetConfig fields (default: the reference architecture, 13.2M parameters).
    """
    from galip.runtime.domains import parse_domains
    from galip.train.checkpoint import save_checkpoint
    from galip.train.i2i.trainer import I2ITrainer, TrainConfig
    from galip.train.i2i.unet import UNetConfig
    from galip.train.slices import preprocess_config

    config = TrainConfig(steps=1, size=size, batch=1, backbone="none", seed=seed,
                         unet=UNetConfig(**(unet or {})))
    trainer = I2ITrainer(config, parse_domains(domains))
    randomise_(trainer.ema.module, seed + 1)
    payload = {**trainer.state_dict(), "preprocess": preprocess_config(size), "data_dir": None}
    return save_checkpoint(path, payload)


def make_diffusion_checkpoint(path: Path, net: dict | None = None, *, timesteps: int = 1000,
                              seed: int = 0, size: int = 128, target: str = "T2") -> Path:
    """A ``galip-train diffusion`` checkpoint (the trainer's payload keys) with random weights.

    ``net``: ScoreNetConfig fields (default: the reference, 8.95M parameters at 128²).
    """
    from galip.runtime.domains import get_domain
    from galip.train.checkpoint import save_checkpoint
    from galip.train.midiffusion.conditioning import LMIConfig
    from galip.train.midiffusion.schedule import DATA_RANGE, DDPMSchedule
    from galip.train.midiffusion.scorenet import ScoreNet, ScoreNetConfig
    from galip.train.midiffusion.trainer import PAYLOAD_FORMAT, PAYLOAD_VERSION, DiffusionTrainConfig
    from galip.train.slices import preprocess_config

    torch.manual_seed(seed)
    net_config = ScoreNetConfig(**(net or {}))
    model = randomise_(ScoreNet(net_config), seed + 1)
    payload = {
        "format": PAYLOAD_FORMAT, "version": PAYLOAD_VERSION, "step": 0, "total_steps": 0,
        "model": model.state_dict(), "ema": {"decay": 0.9999, "module": model.state_dict()},
        "config": {"train": asdict(DiffusionTrainConfig(target=target, size=size)),
                   "net": net_config.to_dict(), "schedule": DDPMSchedule(num_timesteps=timesteps).to_dict(),
                   "lmi": LMIConfig().to_dict(), "data_range": list(DATA_RANGE)},
        "target": get_domain(target).to_dict(),
        "preprocess": preprocess_config(size), "data_dir": None,
    }
    return save_checkpoint(path, payload)


# ----------------------------------------------------------------------------- eager models
class EagerGenerator(nn.Module):
    """The generator as trained, with the graph's interface: (image (N,1,H,W), class id (N,)).

    U-Net(image, context[class id], class id): the caption context is looked up per sample
    and projected by every cross-attention at run time, as in training (the exported graph
    precomputes those projections per domain instead).
    """

    def __init__(self, unet: nn.Module, context_by_class: torch.Tensor):
        super().__init__()
        self.unet = unet.eval()
        self.register_buffer("context_by_class", context_by_class)

    def forward(self, image: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.unet(image, self.context_by_class[domain].to(image.dtype), domain)


def eager_generator(checkpoint: Path | None = None, manifest_entry: dict | None = None,
                    seed: int = 0) -> EagerGenerator:
    """From a checkpoint (EMA weights, as exported), or from a bundle's ``models.generator``
    entry (its U-Net config) with random weights when only a bundle is at hand."""
    from galip.train.i2i.unet import I2IGalipUNet, UNetConfig
    if checkpoint is not None:
        from galip.train.checkpoint import load_checkpoint
        from galip.train.i2i.model import generator_from_checkpoint
        unet, context, domains = generator_from_checkpoint(load_checkpoint(checkpoint))
        table = context.new_zeros((unet.config.n_classes, *context.shape[1:]))
        table[torch.tensor([int(d["class_id"]) for d in domains])] = context
        return EagerGenerator(unet, table)
    if "unet" not in (manifest_entry or {}):
        raise ValueError("the bundle's models.generator has no 'unet' config (not written by galip-export), "
                         "so no eager PyTorch model can be built for it")
    config = UNetConfig.from_dict(manifest_entry["unet"])
    torch.manual_seed(seed)
    unet = randomise_(I2IGalipUNet(config), seed + 1)
    return EagerGenerator(unet, torch.randn(config.n_classes, 8, config.context_dim))


def eager_step(checkpoint: Path | None = None, manifest_entry: dict | None = None, seed: int = 0) -> nn.Module:
    """The diffusion step graph's module (:class:`galip.export.diffusion_graph.DiffusionStep`)
    in eager PyTorch; its LMI is ``galip.train.lmi.lmi`` (native C++ kernel on CPU)."""
    from galip.export.diffusion_graph import DiffusionStep
    from galip.train.midiffusion.trainer import denoiser_from_payload
    if checkpoint is not None:
        from galip.train.checkpoint import load_checkpoint
        denoiser, _, _ = denoiser_from_payload(load_checkpoint(checkpoint))
        return DiffusionStep(denoiser).eval()
    from galip.train.midiffusion.conditioning import LMIConfig, LMIDenoiser
    from galip.train.midiffusion.scorenet import ScoreNet, ScoreNetConfig
    if "net" not in (manifest_entry or {}):
        raise ValueError("the bundle's diffusion entry has no 'net' config (not written by galip-export), "
                         "so no eager PyTorch model can be built for it")
    torch.manual_seed(seed)
    net = randomise_(ScoreNet(ScoreNetConfig.from_dict(manifest_entry["net"])), seed + 1)
    return DiffusionStep(LMIDenoiser(net, LMIConfig(**manifest_entry["lmi"])).eval()).eval()


def eager_lmi(settings: dict) -> Callable:
    """(x, y) → (lmi, y_at) with the contract's PyTorch operator (native fast path on CPU)."""
    from galip.train.lmi import lmi

    def run(x: torch.Tensor, y: torch.Tensor):
        return lmi(x, y, **settings)
    return run


# ----------------------------------------------------------------------------- eager runner
def parse_io(spec: dict[str, str]) -> list[TensorMeta]:
    """Manifest io strings (``"float32[N,1,H,W]"``) → TensorMeta (named dims stay dynamic)."""
    metas = []
    for name, text in spec.items():
        match = re.fullmatch(r"(\w+)\[(.*)\]", text.replace(" ", ""))
        if match is None or match.group(1) not in _DTYPES:
            raise ValueError(f"cannot read io spec {name}: {text!r}")
        dims = tuple(int(d) if d.isdigit() else d for d in match.group(2).split(","))
        metas.append(TensorMeta(name, np.dtype(_DTYPES[match.group(1)]), dims))
    return metas


class TorchRunner(Runner):
    """Eager PyTorch behind the runtime's runner protocol (``infer(feed) -> dict``).

    Args:
        build: makes the module or callable on :meth:`activate` (loading the weights then,
            as an onnxruntime session loads its graph), called with the graph's input names.
        inputs, outputs: the graph contract's io (manifest strings), so feeds are checked
            exactly as for the exported graph.
        device: ``cpu`` or ``cuda``; precision ``fp16`` runs under ``torch.autocast``.
    """

    def __init__(self, build: Callable[[], Callable], inputs: dict[str, str], outputs: dict[str, str], *,
                 name: str = "torch-eager", precision: str = "fp32", device: str = "cpu"):
        super().__init__(name, precision)
        self.build, self.device = build, device
        self._io = (parse_io(inputs), parse_io(outputs))
        self.module: Callable | None = None

    def activate_impl(self) -> None:
        module = self.build()
        if isinstance(module, nn.Module):
            module = module.to(self.device).eval()
        self.module = module

    def io_metadata_impl(self):
        return self._io

    def deactivate_impl(self) -> None:
        self.module = None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {name: torch.from_numpy(array).to(self.device) for name, array in feed.items()}
        autocast = torch.autocast(self.device, dtype=torch.float16, enabled=self.precision == "fp16")
        with torch.inference_mode(), autocast:
            out = self.module(**tensors)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {name: value.float().cpu().numpy() for name, value in zip(self._outputs, out)}


def torch_factory(build: Callable, inputs: dict, outputs: dict, **kwargs) -> Callable[[], TorchRunner]:
    return lambda: TorchRunner(build, inputs, outputs, **kwargs)


# ----------------------------------------------------------------------------- inputs
@functools.lru_cache(maxsize=1)
def _anatomy():
    from galip.train import phantom
    return phantom.load_anatomy()


@dataclass
class Volume:
    """One phantom T1w volume: data (X, Y, Z) float32, affine, spacing (mm)."""

    data: np.ndarray
    affine: np.ndarray
    spacing: float

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.data.shape))} ({self.spacing:g} mm)"


def phantom_volume(spacing: float, seed: int = 0) -> Volume:
    """Subject 0 of the ``galip-data`` phantom set (``train/phantom.py``), T1w, at ``spacing`` mm."""
    from galip.train import phantom
    subject = phantom.make_subject(_anatomy(), 0, seed, spacing, noise=0.02)
    return Volume(subject.images[SOURCE_CONTRAST].astype(np.float32), subject.affine, spacing)


def model_slices(volume: Volume, preprocess: dict, n: int, size: int | None = None) -> np.ndarray:
    """The ``n`` middle slices of ``volume`` in model space (n, 1, H, W), through the bundle's
    own preprocessing (:func:`galip.runtime.preprocess.plan_volume`); ``size``: centre
    pad/crop to size × size (for a fixed-size latency case)."""
    from galip.runtime.preprocess import PreprocessConfig, plan_volume
    plan, raw = plan_volume(volume.data, volume.affine, "mri", PreprocessConfig.from_dict(preprocess))
    middle = len(raw) // 2
    start = max(0, min(len(raw) - n, middle - n // 2))
    picked = [raw[(start + i) % len(raw)] for i in range(n)]
    slices = plan.prepare(np.stack(picked))
    if size is not None:
        slices = centre_fit(slices, size)
    return np.ascontiguousarray(slices[:, None], dtype=np.float32)


def noisy_sample(source: np.ndarray, alpha_bar: float = 0.5, seed: int = 0) -> np.ndarray:
    """x_t = √ᾱ (2·source − 1) + √(1−ᾱ) ε in model space [−1, 1] (a mid-sampling step's input)."""
    eps = np.random.default_rng(seed).standard_normal(source.shape).astype(np.float32)
    return (np.sqrt(alpha_bar) * (2.0 * source - 1.0) + np.sqrt(1.0 - alpha_bar) * eps).astype(np.float32)


def lmi_input(x_t: np.ndarray) -> np.ndarray:
    """u(x_t) = clip((x_t + 1)/2, 0, 1): the sample as the LMI sees it (conditioning.lmi_input)."""
    return np.clip((x_t + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)


@dataclass
class Models:
    """Checkpoints (None for a user bundle without them), the bundle and its entries."""

    bundle: object                       # galip.runtime.bundle.Bundle
    target: str
    generator_checkpoint: Path | None = None
    diffusion_checkpoint: Path | None = None
    export_seconds: dict = field(default_factory=dict)

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    @property
    def generator(self) -> dict | None:
        return self.manifest["models"].get("generator")

    @property
    def diffusion(self) -> dict | None:
        return self.manifest["models"].get("diffusion", {}).get(self.target)

    @property
    def preprocess(self) -> dict:
        return self.manifest["preprocess"]


def add_speed_only_int8(bundle_dir: Path, per_contrast: int = 4) -> None:
    """The generator's int8 graph (``galip-export --int8``'s quantisation) added to the bench's
    random-weight bundle WITHOUT the quality gate: random weights have no quality to keep, so
    the int8 rows of the bench measure speed only (the manifest entry says so)."""
    from galip.export.int8 import INT8_FILE, calibration_feeds, quantize_generator
    from galip.runtime.bundle import load_bundle, write_manifest
    bundle = load_bundle(bundle_dir)
    quantize_generator(bundle.path(bundle.manifest["models"]["generator"]["graphs"]["fp32"]["file"]),
                       bundle_dir / INT8_FILE, calibration_feeds(bundle, per_contrast))
    manifest = bundle.manifest
    manifest["models"]["generator"]["graphs"]["int8"] = {"file": INT8_FILE, "note": "galip-bench: speed only"}
    manifest["files"] = {}
    write_manifest(bundle_dir, manifest)


def build_models(root: Path, *, unet: dict | None, net: dict | None, timesteps: int, fp16: bool,
                 engines: bool, seed: int = 0, target: str = "T2", log: Callable[[str], None] = print,
                 int8: bool = False) -> Models:
    """Random-weight checkpoints under ``root`` exported into ``root/bundle`` (module docstring)."""
    import time
    from galip.export.bundle_writer import ExportOptions, export_checkpoint
    from galip.runtime.bundle import load_bundle

    root.mkdir(parents=True, exist_ok=True)
    seconds = {}
    options = ExportOptions(fp16=fp16, engines=engines)
    started = time.perf_counter()
    gen = make_generator_checkpoint(root / "generator.pt", unet, seed=seed)
    diff = make_diffusion_checkpoint(root / "diffusion.pt", net, timesteps=timesteps, seed=seed, target=target)
    seconds["checkpoints"] = time.perf_counter() - started
    notes = []
    for name, checkpoint in (("generator", gen), ("diffusion", diff)):
        started = time.perf_counter()
        result = export_checkpoint(checkpoint, root / "bundle", options)
        seconds[f"export_{name}"] = time.perf_counter() - started
        log(f"exported {name} ({', '.join(result.files)}) in {seconds[f'export_{name}']:.1f} s")
        if result.engines_note:
            notes.append(result.engines_note)
    if int8:
        started = time.perf_counter()
        add_speed_only_int8(root / "bundle")
        seconds["int8_generator"] = time.perf_counter() - started
        log(f"quantised the generator to int8 (speed only) in {seconds['int8_generator']:.1f} s")
    models = Models(load_bundle(root / "bundle"), target, gen, diff, seconds)
    models.export_seconds["engines_note"] = "; ".join(dict.fromkeys(notes))
    return models


def user_models(bundle_dir: Path, target: str | None = None) -> Models:
    """A user's bundle: graphs as exported; eager rows use its architectures with random weights."""
    from galip.runtime.bundle import load_bundle
    bundle = load_bundle(bundle_dir)
    targets = list(bundle.manifest["models"].get("diffusion", {}))
    domains = bundle.manifest["models"].get("generator", {}).get("domains", [])
    chosen = target or (targets[0] if targets else next((d for d in domains if d != "T1"), domains[0] if domains else "T2"))
    return Models(bundle, chosen)
