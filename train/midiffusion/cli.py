"""``galip-train diffusion``: train a MIDiffusion score network on one target contrast.

The body is thin: cheap argument checks, then
:func:`galip.train.midiffusion.trainer.train_diffusion` (torch is imported only when the
command runs). Bad arguments print one line and exit with code 2; Ctrl-C finishes the
current step, writes the checkpoint and exits with 130.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from galip.runtime.cli_support import is_interactive, user_errors
from galip.runtime.domains import get_domain
from galip.runtime.errors import ConfigError
from galip.train.run_folder import check_run_folder

SIZE_MULTIPLE = 8     # the reference score network halves 3 times


def check_arguments(data_dir: Path, target: str, given: dict, out: Path, resume: bool) -> None:
    """Cheap checks before torch loads: one-line ConfigError for each mistake."""
    get_domain(target)
    check_run_folder(data_dir, out, resume)
    size = given.get("size")
    if size is not None and (size < SIZE_MULTIPLE or size % SIZE_MULTIPLE):
        raise ConfigError(f"--size {size} is not a positive multiple of {SIZE_MULTIPLE} "
                          "(the score network halves 3 times)")


def diffusion(
    data: Annotated[Path, typer.Option(help="Folder written by galip-data (holds index.json).",
                                       file_okay=False)],
    target: Annotated[str, typer.Option(help="Target contrast the model learns: T1, T2, PD or CT.")],
    out: Annotated[Path, typer.Option(help="Output folder; the checkpoint is OUT/checkpoint.pt.",
                                      file_okay=False)],
    steps: Annotated[Optional[int], typer.Option(min=1, help="Total optimiser steps; a resumed run continues to this count \\[default: 100000].")] = None,
    size: Annotated[Optional[int], typer.Option(min=8, help="Slice size in pixels, a multiple of 8 \\[default: 128].")] = None,
    batch: Annotated[Optional[int], typer.Option(min=1, help="Batch size \\[default: 4].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, noise and batches \\[default: 0].")] = None,
    crop: Annotated[Optional[int], typer.Option(min=0, help="Train on random CROP x CROP windows (centred on anatomy) instead of whole slices; 0 = whole \\[default: 0].")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Adam learning rate \\[default: 3e-4].")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(min=0.0, max=0.999999, help="EMA decay of the weights; about 1/(1-decay) steps are averaged \\[default: 0.9999].")] = None,
    channels: Annotated[Optional[int], typer.Option(min=8, help="Base width of the score network (fresh runs; the paper's 64 has 8.95M parameters, 32 has 2.25M) \\[default: 64].")] = None,
    save_every: Annotated[int, typer.Option(min=1, help="Write the checkpoint every K steps.")] = 1000,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUT/checkpoint.pt.")] = False,
) -> None:
    """Train a MIDiffusion score network (DDPM, LMI-conditioned) on the target contrast only."""
    console = Console(stderr=True)
    with user_errors():
        given = {"target": target, "steps": steps, "size": size, "batch": batch, "seed": seed,
                 "save_every": save_every, "crop": crop, "lr": lr, "ema_decay": ema_decay}
        check_arguments(data, target, given, out, resume)       # before torch loads
        if channels is not None and resume:
            raise ConfigError("--channels applies to a fresh run; a resumed run keeps its checkpoint's network")
        from .scorenet import ScoreNetConfig
        from .trainer import train_diffusion
        net_config = None if channels is None else ScoreNetConfig.with_width(channels)
        result = train_diffusion(out, given, data_dir=data, resume=resume, net_config=net_config,
                                 progress=is_interactive())
    if result["interrupted"]:
        console.print(f"interrupted at step {result['step']}; checkpoint saved to {result['checkpoint']} "
                      "(continue with --resume)")
        raise typer.Exit(code=130)
    console.print(f"step {result['step']}: loss {result['loss']:.4g}; checkpoint {result['checkpoint']}")
