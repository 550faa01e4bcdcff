"""The provenance JSON written beside every translated volume: what was translated, by
which bundle, model, backend and sampler, with which galip, and how long it took.

``<output stem>.json`` beside ``<output stem>.nii.gz`` (in BIDS mode that file is also
the BIDS sidecar, with ``Sources`` merged in by the caller). Keys::

    galip_version, created (UTC, ISO 8601), source {path, sha256}, output,
    bundle {name, path, manifest_sha256}, model, target, source_kind,
    backend, precision, backend_reason, sampler (diffusion: {name, steps, eta, seed}; else null),
    settings (every pipeline Settings field), seconds {read, translate, write}, wall_seconds
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_path
from .errors import OutputError

if TYPE_CHECKING:   # api imports this module; the names are only for annotations
    from .api import Session, Source
    from .pipeline import Result

FIELDS = ("galip_version", "created", "source", "output", "bundle", "model", "target", "source_kind",
          "backend", "precision", "backend_reason", "sampler", "settings", "seconds", "wall_seconds")


def sidecar_path(output: str | Path) -> Path:
    """``x.nii.gz`` / ``x.nii`` → ``x.json`` in the same folder."""
    output = Path(output)
    name = output.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")


def _galip_version() -> str:
    from galip import __version__
    return __version__


def provenance_record(session: "Session", source: "Source", result: "Result", output: Path,
                      seconds: dict[str, float]) -> dict:
    """The record for one translated file (keys in :data:`FIELDS` order)."""
    from .pipeline import bundle_name
    translator = session.translator
    settings = translator.settings
    table = result.table
    sampler = None if table is None else {"name": table.sampler, "steps": len(table),
                                          "eta": float(table.eta), "seed": settings.seed}
    record = {
        "galip_version": _galip_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(Path(source.path).resolve()) if source.path else None, "sha256": source.sha256},
        "output": str(Path(output).resolve()),
        "bundle": {"name": bundle_name(session.bundle), "path": str(session.bundle.root.resolve()),
                   "manifest_sha256": session.manifest_sha256},
        "model": settings.model,
        "target": translator.target.name,
        "source_kind": source.kind,
        "backend": result.choice.name,
        "precision": result.choice.precision,
        "backend_reason": result.choice.reason,
        "sampler": sampler,
        "settings": dataclasses.asdict(settings),
        "seconds": {k: round(float(v), 4) for k, v in seconds.items()},
        "wall_seconds": round(float(sum(seconds.values())), 4),
    }
    return record


def write_json(path: Path, record: dict) -> Path:
    """Write ``record`` as indented JSON, atomically (replacing an older file)."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{path}: expected a writable folder for the provenance JSON, found "
                          f"{exc.strerror or exc}; check permissions and disk space") from None
    return path
