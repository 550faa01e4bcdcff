"""``galip-data``: write a folder of co-registered T1w/T2w/PDw subjects and its index.

The synthesis lives in :mod:`galip.train.phantom`; this module owns the folder layout
(``write_dataset``, usable from Python) and the thin typer command over it::

    OUT/index.json
    OUT/sub-000/sub-000_T1w.nii.gz  sub-000_T2w.nii.gz  sub-000_PDw.nii.gz  sub-000_mask.nii.gz

Images are float32 (signal in units of pure water's magnetisation), the mask uint8; all
files of a run share one shape and affine (the MNI152 affine scaled to the spacing,
qform/sform code 4, mm). The same settings give byte-identical files (on one machine
and library stack: BLAS and zlib versions may change the last bits elsewhere).
"""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Annotated, Callable

import nibabel as nib
import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from galip import __version__
from galip.runtime.atomic import atomic_path
from galip.runtime.cli_support import user_errors
from galip.runtime.errors import ConfigError, OutputError

from . import phantom

MAX_SUBJECTS = 1000


def write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically; an OS failure becomes a one-line ``OutputError``."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(payload)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, descrip: str = "") -> None:
    """Write ``(X, Y, Z)`` ``data`` with its ``(4, 4)`` affine as ``.nii.gz``, atomically.

    qform and sform code 4 (MNI152), units mm. Byte-identical for identical input:
    nibabel 5 also writes a zero gzip mtime, but compressing here (mtime 0, no file
    name) guarantees it for any nibabel and keeps the temporary name out of the header.
    """
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=4)
    image.header.set_sform(affine, code=4)
    image.header.set_xyzt_units(xyz="mm")
    image.header["descrip"] = descrip.encode("ascii")[:79]
    write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def check_settings(subjects: int, seed: int, spacing: float, noise: float) -> None:
    """Raise ``ConfigError`` naming the first unusable value."""
    if not 1 <= subjects <= MAX_SUBJECTS:
        raise ConfigError(f"--subjects must be between 1 and {MAX_SUBJECTS}, got {subjects}")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    phantom.check_spacing(spacing)
    if not np.isfinite(noise) or not 0.0 <= noise <= 1.0:
        raise ConfigError(f"--noise must be between 0 and 1 (a fraction of the WM signal), got {noise!r}")


def prepare_out(out: Path, overwrite: bool) -> list[str]:
    """Create ``out``; refuse a non-empty one without ``overwrite``.

    Returns the files that a previous galip-data run listed in ``out/index.json``
    (relative paths), so that a smaller re-run can remove the subjects it no longer writes.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; expected a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} is not empty; pass --overwrite to replace its contents, or choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create --out {out}: {error.strerror}") from None
    index = out / "index.json"
    try:
        old = json.loads(index.read_text())
        previous = [f for entry in old["subjects"] for f in entry["files"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        previous = []  # no index, or not one of ours: touch nothing
    index.unlink(missing_ok=True)  # written again last: while it is absent, the set is incomplete
    return previous


def remove_stale(out: Path, previous: list[str], written: set[str]) -> None:
    """Delete files a previous run listed that this run did not rewrite (inside ``out`` only)."""
    root = out.resolve()
    for name in sorted(set(previous) - written):
        path = (out / name).resolve()
        if path.is_relative_to(root) and path.name.endswith(".nii.gz") and path.is_file():
            path.unlink()
            if path.parent != root and not any(path.parent.iterdir()):
                path.parent.rmdir()


def write_dataset(
    out: Path,
    subjects: int = 4,
    seed: int = 0,
    spacing: float = 2.0,
    noise: float = 0.02,
    overwrite: bool = False,
    head: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write ``subjects`` synthetic subjects and ``index.json`` under ``out``; return the index.

    Every file is written atomically, ``index.json`` last, so its presence means the set
    is complete. ``progress(subject_id)`` is called after each subject.
    """
    out = Path(out)
    check_settings(subjects, seed, spacing, noise)
    anatomy = phantom.load_anatomy()  # fails with the install hint before anything is made
    previous = prepare_out(out, overwrite)
    entries, subject = [], None
    for index in range(subjects):
        subject = phantom.make_subject(anatomy, index, seed, spacing, noise, head)
        (out / subject.id).mkdir(exist_ok=True)
        files = {}
        for name, data in subject.images.items():
            files[name] = f"{subject.id}/{subject.id}_{name}.nii.gz"
            save_nifti(out / files[name], data, subject.affine, f"galip-data {name} {subject.id} seed {seed}")
        entries.append({"id": subject.id, "index": index, "files": files, "tissues": subject.tissues})
        if progress is not None:
            progress(subject.id)
    remove_stale(out, previous, {f for entry in entries for f in entry["files"].values()})
    index = {
        "generator": "galip-data",
        "galip_version": __version__,
        "template": "ICBM152 2009a nonlinear symmetric, nilearn's " + phantom.TEMPLATE.format("{t1,gm,wm}"),
        "seed": seed,
        "spacing_mm": float(spacing),
        "shape": list(subject.images["mask"].shape),
        "affine": subject.affine.tolist(),
        "noise": float(noise),
        "head": bool(head),
        "dtype": {"images": "float32", "mask": "uint8", "head": "uint8"},
        "sequences": {c: {"TR_ms": tr, "TE_ms": te} for c, (tr, te) in phantom.SEQUENCES.items()},
        "synthesis": {
            "jitter": phantom.JITTER, "warp_rms_mm": phantom.WARP_RMS_MM,
            "warp_order": phantom.WARP_ORDER, "bias_rms": phantom.BIAS_RMS,
            "bias_order": phantom.BIAS_ORDER, "mask_threshold": phantom.MASK_THRESHOLD,
            "head_layers": [{"layer": name, "tissue": tissue, "thickness_mm": [lo, hi]}
                            for name, tissue, lo, hi in phantom.head_layers.LAYERS] if head else [],
        },
        "subjects": entries,
    }
    write_bytes(out / "index.json", (json.dumps(index, indent=2) + "\n").encode())
    return index


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)


@app.command(
    help=(
        "Write co-registered T1w/T2w/PDw brain MRI volumes synthesised from the real "
        "ICBM152 anatomy (shipped with nilearn): per subject a smooth random warp, "
        "+-10 % tissue-parameter jitter, a bias field and Rician noise; spin-echo "
        "signal with BrainWeb 1.5 T tissue values, the brain wrapped in a CSF rim, skull, "
        "diploe, muscle, scalp fat and skin (--no-head: brain only). Writes one folder "
        "per subject (sub-000/sub-000_T1w.nii.gz, _T2w, _PDw, _mask = brain, _head) and "
        "index.json; the same "
        "settings give byte-identical files. Example: galip-data --out data --subjects 8"
    )
)
def main(
    out: Annotated[Path, typer.Option("--out", help="Output folder (new or empty, unless --overwrite).")],
    subjects: Annotated[int, typer.Option(help="Number of subjects to write.")] = 4,
    seed: Annotated[int, typer.Option(help="Data set seed; subject i uses the stream (seed, i).")] = 0,
    spacing: Annotated[float, typer.Option(help="Isotropic voxel size in mm, 1 to 8 (1 = the template's grid).")] = 2.0,
    noise: Annotated[float, typer.Option(help="Rician noise sigma as a fraction of the WM signal of each contrast.")] = 0.02,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out, replacing earlier galip-data files.")] = False,
    head: Annotated[bool, typer.Option("--head/--no-head", help="Wrap the brain in skull, scalp fat, muscle and skin (default), or write the brain only.")] = True,
) -> None:
    started = time.perf_counter()
    console = Console(stderr=True)
    with user_errors():
        check_settings(subjects, seed, spacing, noise)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("synthesising subjects", total=subjects)
            index = write_dataset(
                out, subjects, seed, spacing, noise, overwrite, head,
                progress=lambda sid: bar.update(task, advance=1, description=f"wrote {sid}"),
            )
    shape = "x".join(str(n) for n in index["shape"])
    typer.echo(
        f"wrote {subjects} subject(s) x T1w/T2w/PDw/mask/head, {shape} at {spacing:g} mm, "
        f"seed {seed}, to {out} ({time.perf_counter() - started:.1f} s)"
    )
