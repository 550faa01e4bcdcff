"""``galip-train generator``: train the I2I-Galip multi-domain generator.

The body is thin: it checks the arguments and calls
:func:`galip.train.i2i.loop.train_generator` (torch is imported only when the command
runs). Bad arguments print one line and exit with code 2; Ctrl-C finishes the current
step, writes the checkpoint and exits with 130.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from galip.runtime.cli_support import is_interactive, user_errors


class BiasField(str, Enum):
    none = "none"
    n4 = "n4"


class Backbone(str, Enum):
    biomedclip = "biomedclip"
    tiny = "tiny"
    none = "none"


def generator(
    data: Annotated[Path, typer.Option(help="Folder written by galip-data (holds index.json).",
                                       file_okay=False)],
    out: Annotated[Path, typer.Option(help="Output folder; the checkpoint is OUT/checkpoint.pt.",
                                      file_okay=False)],
    domains: Annotated[Optional[str], typer.Option(
        help="Comma-separated domains, at least two, e.g. T1,T2,PD \\[default on --resume: the checkpoint's].")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Total optimiser steps; lr decays linearly to 0 over the second half \\[default: 10000].")] = None,
    size: Annotated[Optional[int], typer.Option(min=32, help="Slice size in pixels, a multiple of 32 \\[default: 128].")] = None,
    batch: Annotated[Optional[int], typer.Option(min=1, help="Batch size per domain \\[default: 4].")] = None,
    backbone: Annotated[Optional[Backbone], typer.Option(
        help="Vision-language backbone: biomedclip (open_clip, offline HF cache), tiny (test ViT) "
             "or none (clip-free: learned context, conv heads) \\[default: biomedclip].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, domain pairs and batches \\[default: 0].")] = None,
    crop: Annotated[Optional[int], typer.Option(min=0, help="Train on random CROP x CROP windows (a multiple of 32, at most --size; 0 = whole slices) \\[default: 0].")] = None,
    min_foreground: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Skip slices with less foreground than this (0 keeps empty slices, at their natural rate) \\[default: 0.05].")] = None,
    histogram_head: Annotated[Optional[bool], typer.Option("--histogram-head/--no-histogram-head", help="Clip-free: add an intensity-histogram discriminator head per domain \\[default: off].")] = None,
    curve_knots: Annotated[Optional[int], typer.Option(min=0, help="Add an intensity curve with this many knots beside the U-Net's output head (not in the paper; docs/training.md); 0 = the paper's U-Net \\[default: 0].")] = None,
    bias_field: Annotated[Optional[BiasField], typer.Option(help="n4: train on slices with the coil's bias field divided out (SimpleITK's N4), as galip-run then does for this model's bundle; none: slices as they are \\[default: none].")] = None,
    init_from: Annotated[Optional[Path], typer.Option(
        help="Start from this generator checkpoint's networks (same domains and shapes) with fresh "
             "optimisers and lr schedule: fine-tunes a trained generator.", dir_okay=False)] = None,
    save_every: Annotated[int, typer.Option(min=1, help="Write the checkpoint every K steps.")] = 1000,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUT/checkpoint.pt on the same schedule.")] = False,
) -> None:
    """Train the I2I-Galip generator (cycle-consistent LSGAN with CLIP-feature discriminators)."""
    console = Console(stderr=True)
    with user_errors():
        from .loop import train_generator          # checks the arguments before torch loads
        given = {"steps": steps, "size": size, "batch": batch, "seed": seed,
                 "backbone": None if backbone is None else backbone.value, "crop": crop,
                 "min_foreground": min_foreground, "histogram_head": histogram_head, "curve_knots": curve_knots,
                 "bias_field": None if bias_field is None else bias_field.value}
        result = train_generator(out, data, domains, given, save_every=save_every, resume=resume,
                                 progress=is_interactive(), init_from=init_from)
    losses = " ".join(f"{k} {v:.4g}" for k, v in result["losses"].items())
    if result["interrupted"]:
        console.print(f"interrupted at step {result['step']}; checkpoint saved to {result['checkpoint']} "
                      "(continue with --resume)")
        raise typer.Exit(code=130)
    console.print(f"step {result['step']}: {losses}; checkpoint {result['checkpoint']}")
