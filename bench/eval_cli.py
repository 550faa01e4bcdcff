"""``galip-eval PRED REF``: the papers' PSNR/SSIM of a translated volume against its reference.

Each slice along ``--axis`` is divided by its own max; PSNR with data range 1 (capped at
100 dB, so identical volumes score 100), SSIM with Gaussian weights, sigma 1.5,
use_sample_covariance False, data range 1 (scikit-image); mean over the slices whose
reference is not empty (see :mod:`galip.bench.metrics`). PRED and REF may both be folders:
files are paired by name (``sub-000_T2w.nii.gz`` in both), and the overall line is the mean
over the volumes. Errors print one line and exit with code 2.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from galip.runtime.atomic import atomic_path
from galip.runtime.cli_support import user_errors
from galip.runtime.errors import InputError, OutputError

from .metrics import PSNR_CAP, VolumeScore, evaluate

app = typer.Typer(add_completion=False, rich_markup_mode=None)
console = Console()
NIFTI = (".nii.gz", ".nii")


def _stem(path: Path) -> str | None:
    name = path.name
    for suffix in NIFTI:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    return {stem: path for path in sorted(folder.iterdir())
            if path.is_file() and (stem := _stem(path)) is not None}


def pair_files(pred: Path, ref: Path, mask: Path | None) -> tuple[list[tuple[str, Path, Path, Path | None]], list[str]]:
    """(name, pred, ref, mask) pairs and notes on unpaired files; files or two folders.

    Folders are paired by file name without the .nii/.nii.gz suffix; ``mask`` may be one
    file for every pair or a folder paired the same way.
    """
    if pred.is_dir() != ref.is_dir() and pred.exists() and ref.exists():
        raise InputError(f"PRED and REF must both be files or both be folders, got {pred} and {ref}")
    if not pred.is_dir():
        if mask is not None and mask.is_dir():
            raise InputError(f"--mask {mask} is a folder; give one mask file when PRED and REF are files")
        return [(ref.name, pred, ref, mask)], []
    preds, refs = _nifti_files(pred), _nifti_files(ref)
    masks = _nifti_files(mask) if mask is not None and mask.is_dir() else {}
    common = sorted(set(preds) & set(refs))
    if not common:
        raise InputError(f"no NIfTI file name appears in both {pred} ({len(preds)} files) and {ref} "
                         f"({len(refs)} files); name predictions like their references")
    notes = [f"only in {pred}: {name}" for name in sorted(set(preds) - set(refs))]
    notes += [f"only in {ref}: {name}" for name in sorted(set(refs) - set(preds))]
    pairs = []
    for name in common:
        if mask is not None and mask.is_dir():
            if name not in masks:
                raise InputError(f"--mask folder {mask} has no {name}.nii(.gz) for the pair {name}")
            pair_mask = masks[name]
        else:
            pair_mask = mask
        pairs.append((name, preds[name], refs[name], pair_mask))
    return pairs, notes


def score_pair(pred: Path, ref: Path, mask: Path | None, axis: int) -> VolumeScore:
    """Load the volumes (one-line InputError on any problem) and score them."""
    from galip.runtime.volume import load_volume
    p = load_volume(pred, require_signal=False)
    r = load_volume(ref, require_signal=False)
    m = load_volume(mask, require_signal=False).data if mask is not None else None
    return evaluate(p.data, r.data, m, axis, names=(str(pred), str(ref)))


def _fmt(value: float, std: float, digits: int) -> str:
    capped = " (cap)" if digits == 2 and value >= PSNR_CAP else ""
    return f"{value:.{digits}f} ± {std:.{digits}f}{capped}"


HELP = ("The papers' metric of a translated volume against its reference: each slice along --axis divided "
        "by its own max; PSNR with data range 1 (capped at 100 dB: identical volumes score 100); SSIM with "
        "Gaussian weights, sigma 1.5, use_sample_covariance False, data range 1; mean over the slices whose "
        "reference is not empty. PRED and REF may both be folders (files paired by name). "
        "Example: galip-eval out/sub-000_T2_galip.nii.gz data/sub-000/sub-000_T2w.nii.gz --mask data/sub-000/sub-000_mask.nii.gz")


@app.command(help=HELP)
def main(
    pred: Annotated[Path, typer.Argument(help="Translated volume (NIfTI), or a folder of them.")],
    ref: Annotated[Path, typer.Argument(help="Reference volume on the same grid, or a folder paired by name.")],
    mask: Annotated[Optional[Path], typer.Option(help="Evaluate inside this mask only (voxels > 0): a file, "
                                                 "or a folder paired by name.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the scores (per slice too) here.")] = None,
    axis: Annotated[int, typer.Option(help="Slicing axis of the stored voxel array (0, 1 or 2).")] = 2,
) -> None:
    with user_errors():
        pairs, notes = pair_files(pred, ref, mask)
        scores = {name: score_pair(p, r, m, axis) for name, p, r, m in pairs}
        table = Table(title=f"galip-eval: per-slice max-normalised PSNR (data range 1, cap {PSNR_CAP:g} dB) "
                            "and SSIM (Gaussian, sigma 1.5)")
        for column, justify in (("volume", "left"), ("slices", "right"), ("skipped", "right"),
                                ("PSNR dB", "right"), ("SSIM", "right")):
            table.add_column(column, justify=justify)
        for name, score in scores.items():
            table.add_row(name, str(score.slices), str(score.skipped), _fmt(score.psnr, score.psnr_std, 2),
                          _fmt(score.ssim, score.ssim_std, 4))
        overall = {"psnr": sum(s.psnr for s in scores.values()) / len(scores),
                   "ssim": sum(s.ssim for s in scores.values()) / len(scores), "volumes": len(scores)}
        if len(scores) > 1:
            table.add_row("mean over volumes", str(sum(s.slices for s in scores.values())), "",
                          f"{overall['psnr']:.2f}", f"{overall['ssim']:.4f}")
        console.print(table)
        for note in notes:
            console.print(f"note: {note}", markup=False, highlight=False)
        if json_out is not None:
            data = {"metric": {"normalisation": "each slice / its own max", "psnr_data_range": 1.0,
                               "psnr_cap_db": PSNR_CAP, "ssim": {"gaussian_weights": True, "sigma": 1.5,
                                                                 "use_sample_covariance": False, "data_range": 1.0},
                               "axis": axis, "empty_reference_slices": "skipped"},
                    "overall": overall, "volumes": {name: s.to_json() for name, s in scores.items()},
                    "unpaired": notes}
            try:
                with atomic_path(json_out) as tmp:
                    tmp.write_text(json.dumps(data, indent=2) + "\n")
            except OSError as error:
                raise OutputError(f"cannot write --json {json_out}: {error.strerror or error}") from None
