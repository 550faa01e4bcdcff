"""``galip-bids BIDS_DIR OUT_DIR participant --to T2 [--from T1w] [--participant-label 01 ...]``:
a BIDS-App over the batch mode of galip-run.

pybids (``pip install 'galip[bids]'``) finds the ``anat`` images with suffix ``--from``;
they run as one galip-run batch, and ``OUT_DIR`` becomes a BIDS derivative dataset::

    OUT_DIR/dataset_description.json                   DatasetType "derivative", GeneratedBy galip
    OUT_DIR/.bidsignore                                failures*.tsv (galip-run's failure lists)
    OUT_DIR/sub-01/[ses-1/]anat/sub-01_[ses-1_]..._desc-galip_T2w.nii.gz
    OUT_DIR/sub-01/[ses-1/]anat/sub-01_[ses-1_]..._desc-galip_T2w.json
                                                       Sources (BIDS URI) + galip provenance

Every other option (``--to``, ``--bundle``, ``--model``, ``--steps``, ``--skip-existing``,
``--ray``, ...) is galip-run's and is passed to it unchanged, so both commands always
accept the same translation settings. Only the ``participant`` level exists (there is no
group step).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .atomic import atomic_path
from .batch import Naming
from .cli_support import user_errors
from .errors import ConfigError, OutputError

INSTALL_BIDS = "pip install 'galip[bids]'"
BIDS_VERSION = "1.10.0"
DESC = "galip"
RAW = "raw"    # the DatasetLinks name of the source dataset in Sources URIs


def derivative_name(source: Path, suffix: str) -> str:
    """``sub-01_ses-1_run-2_T1w.nii.gz`` → ``sub-01_ses-1_run-2_desc-galip_T2w.nii.gz`` for ``T2w``."""
    stem = source.name
    for ext in (".nii.gz", ".nii"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    entities = [part for part in stem.split("_")[:-1] if not part.startswith("desc-")]
    return "_".join(entities + [f"desc-{DESC}", suffix]) + ".nii.gz"


def bids_naming(bids_dir: Path, out_dir: Path, suffix: str) -> Naming:
    """Outputs mirror the source's folder under ``out_dir``; extras hold ``Sources``."""
    root = Path(bids_dir).resolve()

    def name(source: Path) -> tuple[Path, dict]:
        try:
            relative = Path(source).resolve().relative_to(root)
        except ValueError:
            raise ConfigError(f"{source}: expected a file inside the BIDS dataset {root}; "
                              "galip-bids translates only that dataset's images") from None
        return out_dir / relative.parent / derivative_name(relative, suffix), {
            "Sources": [f"bids:{RAW}:{relative.as_posix()}"]}
    return name


def description(bids_dir: Path) -> dict:
    """``dataset_description.json`` of the derivative dataset."""
    from galip import __version__
    raw = Path(bids_dir).resolve()
    try:
        raw_name = json.loads((raw / "dataset_description.json").read_text(encoding="utf-8")).get("Name")
    except (OSError, ValueError, AttributeError):
        raw_name = None
    return {
        "Name": f"galip translations of {raw_name or raw.name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "galip", "Version": __version__,
                         "Description": "unsupervised contrast translation (I2I-Galip / MIDiffusion) of anatomical images"}],
        "SourceDatasets": [{"URL": raw.as_uri()}],
        "DatasetLinks": {RAW: raw.as_uri()},
    }


def write_description(out_dir: Path, bids_dir: Path) -> Path:
    """``dataset_description.json``, and a ``.bidsignore`` for galip's failure lists."""
    path = Path(out_dir) / "dataset_description.json"
    for target, text in ((path, json.dumps(description(bids_dir), indent=2) + "\n"),
                         (path.with_name(".bidsignore"), "failures*.tsv\n")):
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path


def find_sources(bids_dir: Path, suffix: str, participants: list[str] | None = None) -> list[Path]:
    """The dataset's ``anat`` NIfTI files with ``suffix`` (of the given participants), sorted."""
    try:
        from bids import BIDSLayout
        from bids.exceptions import PyBIDSError
    except ImportError as exc:
        raise ConfigError(f"galip-bids needs pybids, which does not import here ({exc}); install it: {INSTALL_BIDS}") from None
    try:
        layout = BIDSLayout(str(bids_dir), validate=True)
    except (PyBIDSError, ValueError, OSError) as exc:
        raise ConfigError(f"{bids_dir}: expected a BIDS dataset (with dataset_description.json), found "
                          f"{' '.join(str(exc).split())}; check the path") from None
    subjects = layout.get_subjects()
    labels = [p.removeprefix("sub-") for p in participants or []]
    missing = sorted(set(labels) - set(subjects))
    if missing:
        raise ConfigError(f"--participant-label {', '.join(missing)}: not in {bids_dir}; "
                          f"it has {', '.join(sorted(subjects)) or 'no subjects'}")
    filters = {"subject": labels} if labels else {}
    files = layout.get(return_type="file", suffix=suffix, datatype="anat",
                       extension=[".nii", ".nii.gz"], **filters)
    if not files:
        raise ConfigError(f"{bids_dir}: expected anat images with suffix {suffix}"
                          f"{' for ' + ', '.join(labels) if labels else ''}, found none; check --from")
    return sorted(Path(f) for f in files)


# ----------------------------------------------------------------------------- galip-bids
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    help=("BIDS-App: translate the anat images of a BIDS dataset into OUT_DIR as a BIDS derivative "
          "(sub-*/anat/*_desc-galip_<suffix>.nii.gz with JSON sidecars). Every other option is "
          "galip-run's (--to is required; --bundle, --model, --steps, --skip-existing, --ray, ...; "
          "see galip-run --help). Exit codes as galip-run's batch: 0 all translated, 1 some failed "
          "(failures.tsv), 2 nothing ran. Example: galip-bids ds/ out/ participant --to T2 --from T1w"),
)
def main(
    ctx: typer.Context,
    bids_dir: Annotated[Path, typer.Argument(show_default=False, help="The BIDS dataset (raw); never modified.")],
    out_dir: Annotated[Path, typer.Argument(show_default=False, help="Derivative dataset folder (created).")],
    analysis_level: Annotated[str, typer.Argument(metavar="participant", show_default=False,
                                                  help="BIDS-App level; galip has only participant.")],
    participant_label: Annotated[Optional[list[str]], typer.Option(
        "--participant-label", show_default=False, help="Only these participants (01 or sub-01); repeat the option.")]
        = None,
    source_suffix: Annotated[str, typer.Option("--from", help="Suffix of the source images.")] = "T1w",
) -> None:
    with user_errors():
        if analysis_level != "participant":
            raise ConfigError(f"analysis level {analysis_level!r}: galip-bids has only the participant level")
        if any(arg in ("--out-dir", "--out", "--bids-root") or arg.startswith(("--out-dir=", "--out=")) for arg in ctx.args):
            raise ConfigError("galip-bids writes into OUT_DIR; drop --out/--out-dir")
        raw, out = Path(bids_dir).resolve(), Path(out_dir).resolve()
        if out == raw or raw.is_relative_to(out):
            raise ConfigError(f"OUT_DIR {out_dir} would write into the raw dataset {bids_dir}; use a folder "
                              f"outside it or under its derivatives/, e.g. {Path(bids_dir) / 'derivatives' / 'galip'}")
        sources = find_sources(bids_dir, source_suffix, participant_label)
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_description(out_dir, bids_dir)
        except OSError as exc:
            raise OutputError(f"{out_dir}: expected a folder the derivative dataset can be written to, found "
                              f"{exc.strerror or exc}; choose another OUT_DIR") from None
    from .cli import app as run_app
    command = typer.main.get_command(run_app)
    args = [*map(str, sources), "--out-dir", str(out_dir), "--bids-root", str(bids_dir), *ctx.args]
    command.main(args=args, prog_name="galip-bids", standalone_mode=True)
