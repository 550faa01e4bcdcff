"""``galip-eval PRED REF``: the papers' PSNR/SSIM of a translated volume against its reference;
``galip-eval quality BUNDLE``: a bundle's translation quality on held-out phantoms against
training-free baselines (:mod:`galip.bench.quality`).

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
from typer.core import TyperGroup

from galip.runtime.atomic import atomic_path
from galip.runtime.cli_support import user_errors
from galip.runtime.errors import ConfigError, InputError, OutputError
from galip.runtime.pipeline import MODELS
from galip.runtime.settings import parse_slices

from .metrics import PSNR_CAP, VolumeScore, evaluate
from .quality import HELD_OUT_SEED, QualityRequest, check_out, run_quality
from .quality_report import write_outputs
from .sampler_table import DEFAULT_SLAB
from .run_options import parse_run_options


class _DefaultScore(TyperGroup):
    """``galip-eval PRED REF`` stays the scoring command: arguments that do not start with a
    command name (or --help) go to ``score``."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["score", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_DefaultScore, add_completion=False, rich_markup_mode=None, no_args_is_help=True,
                  help="The papers' PSNR/SSIM of translated volumes (galip-eval PRED REF, the default "
                       "command 'score'), and a bundle's quality report (galip-eval quality BUNDLE).")
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


@app.command("score", help=HELP)
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


QUALITY_HELP = (
    "Score a bundle on held-out phantoms: write galip-data subjects with a seed training never used "
    f"(default {HELD_OUT_SEED}; the demo bundle trains on seed 1), translate every ordered pair of the "
    "bundle's domains with the runtime, and report per direction the papers' PSNR/SSIM inside the brain "
    "mask and over the whole volume, the training-free baselines (identity, histogram matching to another "
    "subject's target, histogram matching of the negated source), contrast separation, background "
    "hallucination and a through-plane stripe score, with the goal verdicts of issue 10. Writes "
    "quality.json, quality.md and montage.png into --out. "
    "Example: galip-eval quality runtime/bundles/demo --out quality --run-option threads=1")


@app.command("quality", help=QUALITY_HELP)
def quality(
    bundle_dir: Annotated[Optional[Path], typer.Argument(metavar="BUNDLE", show_default=False,
                                                         help="Bundle folder [default: the shipped demo bundle].")] = None,
    out: Annotated[Path, typer.Option(help="Folder for quality.json, quality.md, montage.png (and data/).")]
        = Path("quality"),
    data: Annotated[Optional[Path], typer.Option(show_default=False, help="Score this galip-data folder "
                                                 "instead of writing held-out subjects.")] = None,
    subjects: Annotated[int, typer.Option(help="Held-out subjects (at least 2: histogram matching uses another's).")] = 3,
    seed: Annotated[int, typer.Option(help="galip-data seed of the held-out subjects; never one training used.")]
        = HELD_OUT_SEED,
    spacing: Annotated[float, typer.Option(help="Voxel size of the held-out subjects, mm.")] = 2.0,
    model: Annotated[str, typer.Option(help="generator (I2I-Galip) or diffusion (MIDiffusion).")] = "generator",
    slices: Annotated[Optional[str], typer.Option(show_default=False, help="Only slices A:B along the bundle's "
                                                  "slicing axis (e.g. 40:48, for the slow diffusion sampler).")] = None,
    run_option: Annotated[Optional[list[str]], typer.Option("--run-option", show_default=False,
                                                            help="key=value passed to the runtime: a Settings field "
                                                            "(threads, steps, seed, ...) or a keyword of prepare or "
                                                            "translate; repeat for more.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out.")] = False,
) -> None:
    import shlex

    from galip.runtime.bundle import load_bundle
    from galip.runtime.cli import shipped_bundle
    command = ["galip-eval", "quality", *([str(bundle_dir)] if bundle_dir else []), "--out", str(out)]
    command += ["--data", str(data)] if data else ["--subjects", str(subjects), "--seed", str(seed),
                                                   "--spacing", f"{spacing:g}"]
    command += (["--model", model] if model != "generator" else []) + (["--slices", slices] if slices else [])
    command += [arg for pair in run_option or [] for arg in ("--run-option", pair)]
    with user_errors():
        options = parse_run_options(run_option or [])
        if model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
        request = QualityRequest(
            bundle=load_bundle(bundle_dir) if bundle_dir is not None else shipped_bundle(), out=out, data=data,
            subjects=subjects, seed=seed, spacing=spacing, model=model, slices=parse_slices(slices),
            options=options, command=shlex.join(command))
        check_out(out, overwrite)
        report, views = run_quality(request, log=lambda line: console.print(line, markup=False, highlight=False))
        paths = write_outputs(report, views, out)
    typer.echo(paths["markdown"].read_text(encoding="utf-8"))
    typer.echo(f"wrote {paths['json']}, {paths['markdown']} and {paths['montage']} ({report['wall_s']:.0f} s)")


@app.command("samplers", help="The diffusion model's samplers on the same held-out slab: PSNR/SSIM inside the brain, "
             "seconds per slice, gap to the first setting (the 1000-step ancestral sampler), and the cheapest setting "
             "within 0.5 dB of it. "
             "Writes samplers.json and samplers.md. Example: galip-eval samplers runtime/bundles/demo --slices 44:48 "
             "--run-option threads=1")
def samplers(
    bundle_dir: Annotated[Optional[Path], typer.Argument(metavar="BUNDLE", show_default=False,
                                                         help="Bundle folder [default: the shipped demo bundle].")] = None,
    out: Annotated[Path, typer.Option(help="Folder for samplers.json, samplers.md (and data/).")] = Path("samplers"),
    source: Annotated[str, typer.Option(help="Source domain.")] = "T1",
    target: Annotated[str, typer.Option(help="Target domain (the diffusion model's).")] = "T2",
    slices: Annotated[str, typer.Option(help="Voxel slices A:B along the bundle's slicing axis.")] = "{}:{}".format(*DEFAULT_SLAB),
    subjects: Annotated[int, typer.Option(help="Held-out subjects (at least 2).")] = 2,
    seed: Annotated[int, typer.Option(help="galip-data seed of the held-out subjects.")] = HELD_OUT_SEED,
    data: Annotated[Optional[Path], typer.Option(show_default=False, help="Use this galip-data folder.")] = None,
    setting: Annotated[Optional[list[str]], typer.Option("--setting", show_default=False,
                                                         help="ddpm, ddim:STEPS[:ETA] or dpmpp2m:STEPS; repeat "
                                                              "(the first is the reference) [default: ddpm, DDIM "
                                                              "50/20/10 and 20 with eta 0.5/1, DPM-Solver++(2M) 20/10/5].")] = None,
    run_option: Annotated[Optional[list[str]], typer.Option("--run-option", show_default=False,
                                                            help="key=value Settings field for every run (e.g. threads=1).")] = None,
) -> None:
    import shlex

    from galip.runtime.bundle import load_bundle
    from galip.runtime.cli import shipped_bundle

    from .sampler_table import DEFAULT_SETTINGS, SamplerSetting, SamplerTableRequest, run_sampler_table
    command = ["galip-eval", "samplers", *([str(bundle_dir)] if bundle_dir else []), "--out", str(out),
               "--source", source, "--target", target, "--slices", slices, "--subjects", str(subjects)]
    command += ["--data", str(data)] if data else ["--seed", str(seed)]
    command += [arg for text in setting or [] for arg in ("--setting", text)]
    command += [arg for pair in run_option or [] for arg in ("--run-option", pair)]
    with user_errors():
        options = parse_run_options(run_option or [])
        request = SamplerTableRequest(
            bundle=load_bundle(bundle_dir) if bundle_dir is not None else shipped_bundle(), out=out,
            source=source, target=target, slices=parse_slices(slices), subjects=subjects, seed=seed, data=data,
            settings=[SamplerSetting.parse(text) for text in setting or DEFAULT_SETTINGS],
            run_options=options.settings, command=shlex.join(command))
        result = run_sampler_table(request, log=lambda line: console.print(line, markup=False, highlight=False))
    typer.echo((out / "samplers.md").read_text(encoding="utf-8"))
    typer.echo(f"cheapest within {result['tolerance_db']:g} dB: {result['cheapest_within_tolerance']}")
