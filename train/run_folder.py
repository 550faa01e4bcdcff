"""Cheap checks of a training run's folders, shared by every ``galip-train`` command.

Torch-free on purpose: the CLIs call :func:`check_run_folder` before torch loads, so a
mistyped path fails in a fraction of a second with one line.
"""
from __future__ import annotations

from pathlib import Path

from galip.runtime.errors import ConfigError

from .slices import read_index

CHECKPOINT_NAME = "checkpoint.pt"     # every run writes OUT/checkpoint.pt


def check_run_folder(data: str | Path | None, out: str | Path, resume: bool) -> Path:
    """One-line ``ConfigError`` unless ``data`` is a galip-data folder and ``out`` suits ``resume``.

    ``data`` None skips the data checks (slices passed in memory). Returns the checkpoint
    path ``out/checkpoint.pt``: it must exist with ``resume`` and must not exist without.
    """
    if data is not None:
        if not Path(data).is_dir():
            raise ConfigError(f"data folder {data} does not exist; write one with galip-data --out {data}")
        read_index(data)
    checkpoint = Path(out) / CHECKPOINT_NAME
    if resume and not checkpoint.is_file():
        raise ConfigError(f"--resume: {checkpoint} does not exist; start without --resume")
    if not resume and checkpoint.exists():
        raise ConfigError(f"{checkpoint} already exists; pass --resume to continue it or choose another --out")
    return checkpoint
