"""``galip-export``: a training checkpoint → a bundle folder for ``galip-run``.

    galip-export OUT/checkpoint.pt --out bundle/            # generator or diffusion, detected
    galip-export diffusion/checkpoint.pt --out bundle/      # adds models.diffusion.<T> + lmi.onnx

The body is thin: it checks the arguments (before torch loads), then calls
:func:`galip.export.bundle_writer.export_checkpoint`. Status lines go to stderr; a user
error (missing or unreadable checkpoint, unknown checkpoint kind, bad sizes, a bundle the
model cannot join) prints one line and exits with code 2.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from galip.runtime.cli_support import is_interactive, user_errors
from galip.runtime.errors import ConfigError

from .bundle_writer import EXPORT_SAMPLER

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Export a galip-train checkpoint (generator or diffusion) into a bundle.")


class _RichReporter:
    """Bundle-writer status lines: a spinner while a step runs (interactive), a line when done."""

    def __init__(self, console: Console, interactive: bool):
        self.console, self.interactive = console, interactive

    def stage(self, text: str):
        return self.console.status(f"{text} …") if self.interactive else contextlib.nullcontext()

    def note(self, text: str) -> None:
        self.console.print(f"[green]✓[/] {text}", highlight=False)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by galip-train (OUT/checkpoint.pt).",
                                               show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder: created, or extended (other models are kept).",
                                      file_okay=False)],
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16", help="Also write fp16 graphs (fp32 I/O, fp32 LMI/softmax/norms); engines are then fp16.")] = True,
    engines: Annotated[bool, typer.Option("--engines/--no-engines", help="Build TensorRT engines (needs TensorRT and a GPU; skipped with a note otherwise).")] = True,
    min_size: Annotated[int, typer.Option(help="Smallest slice side an engine accepts (multiple of the model's size multiple).")] = 32,
    opt_size: Annotated[int, typer.Option(help="Slice side the engine is tuned for.")] = 256,
    max_size: Annotated[int, typer.Option(help="Largest slice side an engine accepts.")] = 512,
    max_batch: Annotated[int, typer.Option(help="Largest batch an engine accepts.")] = 32,
    opset: Annotated[int, typer.Option(help="ONNX opset of the graphs (18 or newer).")] = 18,
    timing_cache: Annotated[Optional[Path], typer.Option(help="TensorRT timing-cache file name, keyed by TensorRT version and GPU (timing.trt10.13.0.sm_90.cache), read if present and updated.",
                                                         dir_okay=False)] = None,
    sampler: Annotated[str, typer.Option(metavar="SAMPLER", help="Default sampler of a diffusion model in the manifest: ddpm, ddim:STEPS[:ETA] or dpmpp2m:STEPS (galip-run --sampler/--steps override it).")] = EXPORT_SAMPLER,
    int8: Annotated[bool, typer.Option("--int8", help="Generator: also write an int8 graph (static QDQ, calibrated on "
                                       "phantom slices through the bundle's preprocessing), shipped only if its PSNR on "
                                       "held-out phantoms is within 0.3 dB of fp32's in every direction (else exit 2).")] = False,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="Build version-compatible engines: they run on later TensorRT of the same major and on the lean runtime (tensorrt_lean), possibly slower.")] = False,
) -> None:
    """Export CHECKPOINT into the bundle folder --out (graphs, fp16 graphs, engines, manifest.json)."""
    console = Console(stderr=True)
    with user_errors():
        from galip.export.bundle_writer import ExportOptions
        options = ExportOptions(fp16=fp16, engines=engines, min_size=min_size, opt_size=opt_size,
                                max_size=max_size, max_batch=max_batch, opset=opset,
                                timing_cache=timing_cache, version_compatible=version_compatible, sampler=sampler)
        options.check()
        if not checkpoint.is_file():
            what = "is a folder" if checkpoint.is_dir() else "does not exist"
            raise ConfigError(f"checkpoint {checkpoint} {what}; pass the checkpoint.pt written by galip-train")
        from galip.export.bundle_writer import checkpoint_kind, export_checkpoint
        if int8:                                      # refused before anything is written
            from galip.train.checkpoint import load_checkpoint
            if checkpoint_kind(load_checkpoint(checkpoint), checkpoint) != "generator":
                raise ConfigError("--int8 quantises generator checkpoints only; this one is a diffusion model")
        result = export_checkpoint(checkpoint, out, options, _RichReporter(console, is_interactive()))
        if int8:
            from galip.export.int8 import INT8_FILE, add_int8_generator
            check = add_int8_generator(out, log=lambda line: console.print(line, markup=False, highlight=False))
            result.files.append(INT8_FILE)
            console.print(f"int8 generator shipped: {check}", markup=False, highlight=False)
    if result.engines_note:
        console.print(result.engines_note, markup=False, highlight=False, soft_wrap=True)
    console.print(f"exported {result.kind} → {out} ({result.key}: {', '.join(result.files)})",
                  highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console-script convenience
    app()
