"""``galip-run``: translate a NIfTI volume into another contrast with a bundle (no PyTorch).

Thin typer command over :mod:`galip.runtime.pipeline`::

    galip-run sub-000_T1w.nii.gz --to T2                    # -> sub-000_T1w_T2.nii.gz
    galip-run ct.nii.gz --to T1 --model diffusion --steps 50 --seed 1 --preview ct_T1.png

Every user error is one line on stderr and exit code 2 (:func:`cli_support.user_errors`);
the output folder is checked before any inference and files are written atomically, so a
failed run leaves no output and never touches the input.
"""
from __future__ import annotations

import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .api import SHIPPED_BUNDLE, default_output, shipped_bundle  # noqa: F401  (re-exported)
from .atomic import check_name, probe_writable
from .batch_cli import is_batch, run_batch
from .bundle import load_bundle
from .cli_support import err_console, user_errors
from .errors import ConfigError, OutputError
from .foreground import mask_from_file
from .pipeline import CT_GUESS_BELOW, MASKS, Result, Settings, Translator, guess_kind, prepare
from .settings import LMI_MODES, parse_slices
from .signals import stop_on_signals
from .volume import load_volume, save_volume

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
LMI_ENV = "GALIP_LMI"      # the default of --lmi, read here only (never inside the library)


class ModelName(str, Enum):
    generator = "generator"
    diffusion = "diffusion"


class BackendName(str, Enum):
    auto = "auto"
    tensorrt = "tensorrt"
    onnxruntime_cuda = "onnxruntime-cuda"
    onnxruntime_cpu = "onnxruntime-cpu"


class PrecisionName(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class SamplerName(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"
    dpmpp2m = "dpmpp2m"


class SourceKind(str, Enum):
    auto = "auto"
    mri = "mri"
    ct = "ct"


# ----------------------------------------------------------------------------- plain helpers
def check_writable(path: Path, *, overwrite: bool, suffixes: tuple[str, ...], what: str,
                   source: Path | None = None) -> None:
    """OutputError unless ``path`` can be written: right suffix, not a folder, not the input,
    new (or ``overwrite``), in an existing folder where a file can really be created."""
    check_name(path, suffixes, what)
    if path.is_dir():
        raise OutputError(f"{path}: expected a {what} file name, found a folder; give a file name inside it")
    if source is not None and path.exists() and source.exists() and os.path.samefile(path, source):
        raise OutputError(f"{path}: the {what} would replace the input; choose another --out")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: expected a new {what} file, found an existing one; "
                          "pass --overwrite or choose another path")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{path}: expected an existing {what} folder, found no folder {folder}; create it first")
    try:
        probe_writable(folder, path.name)
    except OSError as exc:
        raise OutputError(f"{path}: expected a writable {what} folder, found {folder} unwritable "
                          f"({exc.strerror or exc}); check its permissions or choose another --out") from None


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    # Drawn only on a terminal: piped or captured stderr stays free of bar remnants.
    return Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)


def _summary(out: Path, translator: Translator, result: Result, wall: float) -> str:
    settings, choice = translator.settings, translator.choice
    how = settings.model
    if translator.table is not None:
        table = translator.table
        eta = f", eta {table.eta:g}" if table.sampler == "ddim" else ""
        how += f" ({table.sampler}, {len(table)} steps{eta}, seed {settings.seed})"
    if result.bias_field is not None:
        how += ", the source's coil bias field divided out and given back (N4)"
    return (f"wrote {out}: {translator.target.name} by {how}, {result.n_slices} slices, {wall:.1f} s; "
            f"{choice.reason}")


# ----------------------------------------------------------------------------- the command
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)


@app.command(
    help=(
        "Translate a NIfTI volume (.nii or .nii.gz, any orientation) into the contrast --to "
        "with a galip bundle: slices along the bundle's axis, batched inference (TensorRT, "
        "onnxruntime CUDA or CPU), written back with the input's affine and header. "
        "Without --bundle the bundle shipped with galip is used. "
        "Example: galip-run sub-000_T1w.nii.gz --to T2. "
        "Several inputs (files, folders, globs, @list.txt) with --out-dir DIR run as one batch "
        "(bundle loaded once; --ray for a Ray cluster); its exit code is 0 when every volume was "
        "translated, 1 when some failed (listed in DIR/failures.tsv), 2 when nothing ran."
    )
)
def main(
    sources: Annotated[list[Path], typer.Argument(
        metavar="INPUT", show_default=False,
        help="Source volume(s) (.nii or .nii.gz), never modified. Several, a folder, a glob or @list.txt: a batch (needs --out-dir).")],
    to: Annotated[str, typer.Option("--to", show_default=False,
                                    help="Target domain, one of the bundle's (T1, T2, PD, CT, or a suffix like T2w).")],
    model: Annotated[ModelName, typer.Option(help="I2I-Galip generator (one pass) or MIDiffusion (sampling loop).")]
        = ModelName.generator,
    bundle_dir: Annotated[Optional[Path], typer.Option("--bundle", show_default=False,
                                                       help="Bundle folder from galip-export [default: the shipped bundle].")]
        = None,
    out: Annotated[Optional[Path], typer.Option("--out", show_default=False,
                                                help="Output .nii.gz [default: <input stem>_<domain>.nii.gz next to the input].")]
        = None,
    backend: Annotated[BackendName, typer.Option(help="Inference backend; auto tries tensorrt, onnxruntime-cuda, onnxruntime-cpu.")]
        = BackendName.auto,
    precision: Annotated[Optional[PrecisionName], typer.Option(show_default=False,
                                                               help="Graph/engine precision [default: fp16 on GPUs, fp32 on CPU]; int8: the generator graph of galip-export --int8 (CPU).")]
        = None,
    batch: Annotated[int, typer.Option(help="Slices per inference call (model-space memory grows with it; the whole-volume arrays take about 32 bytes per voxel).")] = 8,
    steps: Annotated[Optional[int], typer.Option(show_default=False,
                                                 help="Diffusion: sampler steps of dpmpp2m or ddim [default: the bundle's, e.g. 20].")] = None,
    sampler: Annotated[Optional[SamplerName], typer.Option(show_default=False,
                                                           help="Diffusion: dpmpp2m (DPM-Solver++(2M), --steps), ddim (--steps, --eta) or ddpm (all timesteps, the paper's) [default: the bundle's].")]
        = None,
    eta: Annotated[Optional[float], typer.Option(show_default=False,
                                                 help="Diffusion: DDIM eta, 0 deterministic to 1 ancestral [default: the bundle's or 0].")]
        = None,
    seed: Annotated[int, typer.Option(help="Diffusion: noise seed; every slice draws the same stream, so neighbouring slices come out alike.")] = 0,
    source_kind: Annotated[SourceKind, typer.Option(
        help=f"Intensities of the input: MRI (percentile normalisation) or CT (HU window); auto: CT if a voxel is below {CT_GUESS_BELOW:g}.")]
        = SourceKind.auto,
    preview: Annotated[Optional[Path], typer.Option(show_default=False,
                                                    help="Also write a PNG: source and translation, middle slice of each axis.")]
        = None,
    threads: Annotated[Optional[int], typer.Option(show_default=False,
                                                   help="CPU threads for onnxruntime [default: all cores].")] = None,
    mask: Annotated[str, typer.Option(metavar="auto|none|FILE",
                                      help="Voxels outside the head stay background: auto finds the head in the source; "
                                           "FILE is a mask on the input's grid (nonzero = head); none keeps every voxel as the model made it.")]
        = "auto",
    planes: Annotated[int, typer.Option(help="1: slice along the bundle's axis; 3: along all three axes and average (3x the time, fewer through-plane stripes).")] = 1,
    slices: Annotated[Optional[str], typer.Option(metavar="A:B", show_default=False,
                                                  help="Translate only the input's voxel slices A to B-1 along the bundle's slicing axis "
                                                       "(a quick preview slab; the rest of the output is background).")]
        = None,
    tta: Annotated[str, typer.Option(metavar="none|flip", help="flip: also translate the left-right mirror and average (2x the time).")] = "none",
    any_source: Annotated[bool, typer.Option("--any-source", help="Translate a source kind (MRI/CT) the model was not trained on instead of refusing it.")] = False,
    lmi: Annotated[str, typer.Option("--lmi", envvar=LMI_ENV, metavar="|".join(LMI_MODES),
                                     help="Diffusion on onnxruntime-cpu: run the step's LMI on the native CPU kernel "
                                          "(native), in the ONNX graph (onnx), or native where it can (auto).")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output (and preview).")] = False,
    # -- batch mode (runtime/batch_cli.py) --------------------------------------------------
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", show_default=False,
                                                    help="Batch: folder for <input stem>_<domain>.nii.gz, its provenance .json and failures.tsv (created).")]
        = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing",
                                                help="Batch: keep outputs that exist with their .json (resume an interrupted batch).")]
        = False,
    part: Annotated[Optional[str], typer.Option(metavar="K/N", show_default=False,
                                                help="Batch: translate only the K-th of N deterministic shares of the inputs.")]
        = None,
    ray: Annotated[Optional[str], typer.Option(metavar="ADDRESS", show_default=False,
                                               help="Batch on Ray (pip install 'galip[ray]'): local, auto (ray start --head / $RAY_ADDRESS) or HOST:PORT.")]
        = None,
    workers: Annotated[Optional[int], typer.Option(show_default=False,
                                                   help="Batch on Ray: actors [default: one per GPU, else per CPU of the cluster].")]
        = None,
    bids_root: Annotated[Optional[Path], typer.Option(hidden=True, help="Set by galip-bids: BIDS derivative names.")]
        = None,
) -> None:
    started = time.perf_counter()
    with user_errors(), stop_on_signals():
        settings = Settings(model=model.value, backend=backend.value, precision=precision.value if precision else None,
                            batch=batch, steps=steps, sampler=sampler.value if sampler else None, eta=eta,
                            seed=seed, threads=threads, mask=mask if mask in MASKS else "none",
                            planes=planes, tta=tta, any_source=any_source, slices=parse_slices(slices),
                            lmi=lmi.strip().lower() or "auto")
        settings.check()
        if is_batch(sources, out_dir, skip_existing, part, ray, workers, bids_root):
            if mask not in MASKS:
                raise ConfigError(f"--mask {mask}: a mask file belongs to one input; in batch mode use --mask auto or none")
            raise typer.Exit(run_batch(
                sources, to=to, settings=settings, out_dir=out_dir, bundle_dir=bundle_dir, kind=source_kind.value,
                overwrite=overwrite, skip_existing=skip_existing, part=part, ray=ray, workers=workers, out=out,
                preview=preview, bids_root=bids_root))
        source = sources[0]
        bundle = load_bundle(bundle_dir) if bundle_dir is not None else shipped_bundle()
        translator = prepare(bundle, to, settings)
        volume = load_volume(source)
        if volume.n_nonfinite:
            err_console.print(f"warning: {source}: {volume.n_nonfinite} NaN/Inf voxels set to 0",
                              markup=False, highlight=False, soft_wrap=True)
        out = out if out is not None else default_output(source, translator.target.name)
        check_writable(out, overwrite=overwrite, suffixes=_NIFTI_SUFFIXES, what="output", source=source)
        if preview is not None:
            from .preview import require_matplotlib
            require_matplotlib()
            check_writable(preview, overwrite=overwrite, suffixes=(".png",), what="preview", source=source)
        kind = source_kind.value
        guessed = kind == "auto"
        if guessed:
            kind = guess_kind(volume.data)
        # before any inference or file: a CT into an MRI-only model is refused in one line
        translator.check_source(kind, f"{source} (voxels below {CT_GUESS_BELOW:g})" if guessed and kind == "ct"
                                else str(source))
        if guessed and kind == "ct":
            err_console.print(f"note: reading {source} as CT (voxels below {CT_GUESS_BELOW:g} HU); "
                              "pass --source-kind mri if it is MRI", markup=False, highlight=False, soft_wrap=True)
        foreground = None
        if mask not in MASKS:
            foreground = mask_from_file(load_volume(Path(mask)).data, volume.data.shape, mask)

        with _progress() as bar:
            slices = bar.add_task(f"{translator.target.name} by {settings.model}", total=None)
            steps_task = bar.add_task("sampling steps", total=None, visible=translator.table is not None)

            def on_slices(done: int, total: int) -> None:
                bar.update(slices, completed=done, total=total)

            def on_step(done: int, total: int) -> None:
                bar.update(steps_task, completed=done, total=total)

            result = translator.translate(volume.data, volume.affine_mm, kind, foreground=foreground,
                                          on_slices=on_slices, on_step=on_step)
        save_volume(out, result.data, volume.affine, volume.header, description=translator.description,
                    overwrite=overwrite)
        if preview is not None:
            from .preview import write_preview
            write_preview(preview, volume.data, result.data, volume.affine, source_map=result.plan.source_map,
                          output_map=result.target_map, labels=(f"source ({kind})", translator.target.name),
                          title=translator.description, overwrite=overwrite,
                          centre=translator.preview_centre(volume.data.shape, volume.affine_mm))
    typer.echo(_summary(out, translator, result, time.perf_counter() - started))
