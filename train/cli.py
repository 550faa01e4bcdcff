"""``galip-train``: one command per model (generator, diffusion).

The command bodies live beside their models (train/i2i/cli.py, train/midiffusion/cli.py);
this module only joins them, so ``galip-train --help`` stays fast and torch is imported
when a command runs.
"""
import typer

from .i2i.cli import generator
from .midiffusion.cli import diffusion

app = typer.Typer(
    help="Train galip models on galip-data output (PyTorch).",
    no_args_is_help=True,
    add_completion=False,
)
app.command("generator", help="Train the I2I-Galip multi-domain generator (cycle-consistent LSGAN).")(generator)
app.command("diffusion", help="Train a MIDiffusion score network on one target contrast (DDPM).")(diffusion)
