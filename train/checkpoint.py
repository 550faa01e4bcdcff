"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is one ``torch.save`` of a plain dict (tensors, numbers, strings, lists,
dicts). It is loaded with ``weights_only=True`` (docs/design.md: a checkpoint is data, never
code), so RNG states of non-torch generators are stored as JSON strings.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from galip.runtime.atomic import atomic_path
from galip.runtime.errors import ConfigError


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` through a temporary file, so a crash or Ctrl-C
    mid-write never leaves a truncated checkpoint where the last good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; train first or check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"checkpoint {path} cannot be read ({first_line}); it may be truncated or not a galip checkpoint") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict written by galip-train")
    return payload


def capture_rng() -> dict:
    """Snapshot of the torch, numpy (legacy global) and Python RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(_numpy_state_to_json(np.random.get_state())),
        "python": json.dumps(_python_state_to_json(random.getstate())),
    }


def restore_rng(state: dict) -> None:
    """Undo :func:`capture_rng`: later random draws continue the saved sequence."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


def _numpy_state_to_json(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _python_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
