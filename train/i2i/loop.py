"""The ``galip-train generator`` run: arguments → data → trainer → checkpoints.

Checkpoint payload (``OUT/checkpoint.pt``, loadable with ``weights_only=True``): the
keys of :meth:`I2ITrainer.state_dict` (format, version, mode, step, total_steps,
train_config, unet_config, domains, context, text_embeddings, generator, generator_ema,
discriminator, opt_g, opt_d, sched_g, sched_d) plus rng (torch/numpy/python states),
sampler (SliceSampler state), preprocess (slice preprocessing config), data_dir and
init_from (checkpoint path and trained steps a fine-tuning run started from, else None).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from galip.runtime.domains import Domain, parse_domains
from galip.runtime.errors import ConfigError
from galip.train.run_folder import check_run_folder

if TYPE_CHECKING:                                   # torch loads only after the arguments are checked
    from .trainer import TrainConfig


def check_arguments(data_dir: Path, domains: str | None, given: dict, out: Path, resume: bool,
                    init_from: Path | None = None) -> Path:
    """Cheap checks before torch loads (one-line ConfigError for each mistake); returns
    ``out/checkpoint.pt``."""
    checkpoint = check_run_folder(data_dir, out, resume)
    if init_from is not None and resume:
        raise ConfigError("--init-from starts a new run from another checkpoint's weights; "
                          "drop it with --resume (the run's own checkpoint already holds them)")
    if domains is not None:
        parsed = parse_domains(domains)
        if len(parsed) < 2:
            raise ConfigError(f"--domains {domains!r} names {len(parsed)} domain; I2I-Galip needs at least 2 (e.g. T1,T2,PD)")
    elif not resume:
        raise ConfigError("--domains is missing; pass at least two, e.g. --domains T1,T2,PD")
    size = given.get("size")
    if size is not None and (size < 32 or size % 32):
        raise ConfigError(f"--size {size} is not a positive multiple of 32 (the U-Net halves 5 times)")
    crop = given.get("crop")
    if crop and (crop % 32 or crop > (size or 128)):
        raise ConfigError(f"--crop {crop} is not a multiple of 32 up to --size {size or 128} (0 trains on whole slices)")
    if given.get("curve_knots") == 1:
        raise ConfigError("--curve-knots 1 is no curve; pass 0 (none) or at least 2")
    return checkpoint


def trained_steps(payload: dict) -> int:
    """Optimiser steps behind a checkpoint's weights: its own, plus those of the checkpoint
    it was fine-tuned from."""
    return int(payload.get("step", 0)) + int((payload.get("init_from") or {}).get("trained_steps", 0))


UNET_SETTINGS = ("curve_knots",)   # options that set a field of the U-Net's config, not of TrainConfig


def _holder(config, key: str):
    """The config object that holds the option ``key``: the U-Net's or the TrainConfig itself."""
    return config.unet if key in UNET_SETTINGS else config


def _resumed_settings(payload: dict, domains: str | None, given: dict) -> tuple[list[Domain], TrainConfig]:
    """Domains and TrainConfig of the checkpoint (its format already checked; older configs
    without a setting: its default); an explicit option that differs is an error."""
    from .trainer import TrainConfig
    config = TrainConfig.from_dict(payload["train_config"])
    saved_domains = [Domain(**d) for d in payload["domains"]]
    if domains is not None and [d.name for d in parse_domains(domains)] != [d.name for d in saved_domains]:
        raise ConfigError(f"--domains {domains} differs from the checkpoint's "
                          f"{','.join(d.name for d in saved_domains)}; drop it or train into another --out")
    for key, value in given.items():
        if value is None:
            continue
        held = getattr(_holder(config, key), key)
        if value != held:
            raise ConfigError(f"--{key.replace('_', '-')} {value} differs from the checkpoint's {held}; "
                              "drop it to continue the same schedule, or train into another --out")
    return saved_domains, config


def train_generator(out: Path, data_dir: Path, domains: str | None, given: dict, *, save_every: int = 1000,
                    resume: bool = False, progress: bool = True, trainer_config=None,
                    check_every: int = 50, init_from: Path | None = None) -> dict:
    """Train (or continue) an I2I-Galip generator; returns step, losses, checkpoint, interrupted.

    Every ``check_every`` steps the EMA generator is probed for the failure modes of
    :mod:`.monitor` (identity lost, target-blind); the numbers join the progress line
    and one JSON line per check is appended to ``out/train_log.jsonl``.

    ``init_from``: a generator checkpoint whose networks the new run starts from
    (:meth:`I2ITrainer.start_from`); its path and :func:`trained_steps` are kept in the
    run's checkpoint.

    ``given`` holds steps/size/batch/backbone/seed as passed (None = the TrainConfig
    default, or the checkpoint's value on resume). ``trainer_config`` (a TrainConfig) overrides the
    network shapes for tests; the CLI leaves it None.
    """
    out, data_dir = Path(out), Path(data_dir)
    checkpoint = check_arguments(data_dir, domains, given, out, resume, init_from)   # before torch loads
    from galip.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
    from galip.train.interrupt import deferred_interrupt
    from galip.train.progress import TrainingProgress
    from galip.train.slices import SliceSampler, load_training_slices, preprocess_config

    from .monitor import condition_check, probe_batch, warning
    from .trainer import I2ITrainer, TrainConfig, check_format

    payload = load_checkpoint(checkpoint) if resume else None
    if payload is not None:
        check_format(payload, checkpoint)              # before reading any key of it
        domain_list, config = _resumed_settings(payload, domains, given)
    else:
        domain_list = parse_domains(domains)
        config = copy.deepcopy(trainer_config) if trainer_config is not None else TrainConfig()
        for key, value in given.items():
            if value is not None:
                setattr(_holder(config, key), key, value)
    trainer = I2ITrainer(config, domain_list)          # backbone errors before the slow data load
    started_from = payload.get("init_from") if payload is not None else None
    if init_from is not None:
        source = load_checkpoint(init_from)
        trainer.start_from(source, init_from)
        started_from = {"checkpoint": str(init_from), "trained_steps": trained_steps(source)}
    signs = None
    if config.weights.prior > 0 or config.prior_late:
        from .prior import load_slices_with_pseudo_targets
        slices, signs = load_slices_with_pseudo_targets(data_dir, domain_list, config.size,
                                                        min_foreground=config.min_foreground, axes=config.axes,
                                                        split_vote=config.prior_split_vote,
                                                        bias_correction=config.prior_bias_correction,
                                                        bias_field=config.bias_field,
                                                        back_translate=config.prior_back_translate)
    else:
        slices = load_training_slices(data_dir, domain_list, config.size, min_foreground=config.min_foreground,
                                      axes=config.axes, bias_field=config.bias_field)
    sampler = SliceSampler(slices, config.batch, config.seed, config.crop, config.crop_on_foreground)
    probes = probe_batch(slices)
    if payload is not None:
        trainer.load_state_dict(payload)
        sampler.load_state_dict(payload["sampler"])
        restore_rng(payload["rng"])
    out.mkdir(parents=True, exist_ok=True)
    if signs is not None:
        (out / "prior.json").write_text(json.dumps(signs, indent=1) + "\n")

    def save() -> None:
        save_checkpoint(checkpoint, {**trainer.state_dict(), "rng": capture_rng(),
                                     "sampler": sampler.state_dict(),
                                     "preprocess": preprocess_config(
                                         config.size, min_foreground=config.min_foreground,
                                         bias_field=config.bias_field),
                                     "data_dir": str(data_dir), "init_from": started_from})

    losses: dict[str, float] = {}
    total = trainer.config.steps
    names = [d.name for d in domain_list]
    log_path, started, checks = out / "train_log.jsonl", time.monotonic(), {}
    # a non-finite loss raises inside the step, before the update and without a save here,
    # so the last checkpoint on disk keeps its good weights
    with deferred_interrupt() as stop, log_path.open("a") as log, \
            TrainingProgress(total, trainer.step, "generator", disable=not progress) as bar:
        while trainer.step < total and not stop.is_set():
            losses = trainer.step_from(sampler)
            if trainer.step % check_every == 0 or trainer.step == total:
                checks = condition_check(trainer.ema.module, probes, names)
                log.write(json.dumps({"step": trainer.step, "seconds": round(time.monotonic() - started, 1),
                                      **losses, **checks, "warning": warning(checks)}) + "\n")
                log.flush()
            bar.update(trainer.step, {**losses, **checks}, warning(checks) if checks else "")
            if trainer.step % save_every == 0:
                save()
    save()
    return {"step": trainer.step, "losses": losses, "checkpoint": checkpoint,
            "interrupted": trainer.step < total}

