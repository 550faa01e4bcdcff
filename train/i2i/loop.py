"""The ``galip-train generator`` run: arguments → data → trainer → checkpoints.

Checkpoint payload (``OUT/checkpoint.pt``, loadable with ``weights_only=True``): the
keys of :meth:`I2ITrainer.state_dict` (format, version, mode, step, total_steps,
train_config, unet_config, domains, context, text_embeddings, generator, generator_ema,
discriminator, opt_g, opt_d, sched_g, sched_d) plus rng (torch/numpy/python states),
sampler (SliceSampler state), preprocess (slice preprocessing config) and data_dir.
"""
from __future__ import annotations

import copy
import signal
import threading
from pathlib import Path

from galip.runtime.domains import Domain, parse_domains
from galip.runtime.errors import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"


def check_arguments(data_dir: Path, domains: str | None, given: dict, out: Path, resume: bool) -> None:
    """Cheap checks before torch loads: one-line ConfigError for each mistake."""
    if not Path(data_dir).is_dir():
        raise ConfigError(f"data folder {data_dir} does not exist; write one with galip-data --out {data_dir}")
    if not (Path(data_dir) / "index.json").is_file():
        raise ConfigError(f"{data_dir} has no index.json; expected a folder written by galip-data")
    if domains is not None:
        parsed = parse_domains(domains)
        if len(parsed) < 2:
            raise ConfigError(f"--domains {domains!r} names {len(parsed)} domain; I2I-Galip needs at least 2 (e.g. T1,T2,PD)")
    elif not resume:
        raise ConfigError("--domains is missing; pass at least two, e.g. --domains T1,T2,PD")
    size = given.get("size")
    if size is not None and (size < 32 or size % 32):
        raise ConfigError(f"--size {size} is not a positive multiple of 32 (the U-Net halves 5 times)")
    checkpoint = Path(out) / CHECKPOINT_NAME
    if resume and not checkpoint.is_file():
        raise ConfigError(f"--resume: {checkpoint} does not exist; start without --resume")
    if not resume and checkpoint.exists():
        raise ConfigError(f"{checkpoint} exists; pass --resume to continue it or choose another --out")


def _resumed_settings(payload: dict, domains: str | None, given: dict) -> tuple[list[Domain], dict]:
    """Domains and settings of the checkpoint; an explicit option that differs is an error."""
    saved = payload["train_config"]
    saved_domains = [Domain(**d) for d in payload["domains"]]
    if domains is not None and [d.name for d in parse_domains(domains)] != [d.name for d in saved_domains]:
        raise ConfigError(f"--domains {domains} differs from the checkpoint's "
                          f"{','.join(d.name for d in saved_domains)}; drop it or train into another --out")
    for key, value in given.items():
        if value is not None and value != saved[key]:
            raise ConfigError(f"--{key} {value} differs from the checkpoint's {saved[key]}; "
                              "drop it to continue the same schedule, or train into another --out")
    return saved_domains, saved


class _StopFlag:
    """First Ctrl-C: finish the current step, save, stop. Second: interrupt at once."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signals live in the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train_generator(out: Path, data_dir: Path, domains: str | None, given: dict, *, save_every: int = 1000,
                    resume: bool = False, progress: bool = True, trainer_config=None) -> dict:
    """Train (or continue) an I2I-Galip generator; returns step, losses, checkpoint, interrupted.

    ``given`` holds steps/size/batch/backbone/seed as passed (None = the TrainConfig
    default, or the checkpoint's value on resume). ``trainer_config`` (a TrainConfig) overrides the
    network shapes for tests; the CLI leaves it None.
    """
    out, data_dir = Path(out), Path(data_dir)
    check_arguments(data_dir, domains, given, out, resume)
    from galip.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
    from galip.train.progress import TrainingProgress
    from galip.train.slices import SliceSampler, load_training_slices, preprocess_config

    from .trainer import I2ITrainer, TrainConfig

    checkpoint = out / CHECKPOINT_NAME
    payload = load_checkpoint(checkpoint) if resume else None
    if payload is not None:
        domain_list, saved = _resumed_settings(payload, domains, given)
        config = TrainConfig.from_dict(saved)
    else:
        domain_list = parse_domains(domains)
        config = copy.deepcopy(trainer_config) if trainer_config is not None else TrainConfig()
        for key, value in given.items():
            if value is not None:
                setattr(config, key, value)
    trainer = I2ITrainer(config, domain_list)          # backbone errors before the slow data load
    slices = load_training_slices(data_dir, domain_list, config.size)
    sampler = SliceSampler(slices, config.batch, config.seed)
    if payload is not None:
        trainer.load_state_dict(payload)
        sampler.load_state_dict(payload["sampler"])
        restore_rng(payload["rng"])
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        save_checkpoint(checkpoint, {**trainer.state_dict(), "rng": capture_rng(),
                                     "sampler": sampler.state_dict(),
                                     "preprocess": preprocess_config(config.size),
                                     "data_dir": str(data_dir)})

    losses: dict[str, float] = {}
    total = trainer.config.steps
    with _StopFlag() as flag, TrainingProgress(total, trainer.step, "generator", disable=not progress) as bar:
        while trainer.step < total and not flag.stop:
            losses = trainer.step_from(sampler)
            if not all(map(_finite, losses.values())):
                save()
                raise ConfigError(f"non-finite loss at step {trainer.step} ({losses}); "
                                  "lower the learning rate or check the data")
            bar.update(trainer.step, losses)
            if trainer.step % save_every == 0:
                save()
    save()
    return {"step": trainer.step, "losses": losses, "checkpoint": checkpoint,
            "interrupted": trainer.step < total}


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
