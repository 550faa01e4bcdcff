"""``galip-eval quality BUNDLE``: how well a bundle translates held-out phantoms, against
training-free baselines.

1. Held-out data: ``galip-data`` subjects (:func:`galip.train.data_cli.write_dataset`) with a
   seed training never uses (default :data:`HELD_OUT_SEED`), or an existing data folder.
2. Every ordered pair (source, target) of the bundle's domains that the data holds is
   translated with the runtime's Python pipeline (:func:`galip.runtime.pipeline.prepare`,
   what ``galip-run`` calls), with any ``--run-option`` passed through.
3. Per direction and subject: the papers' PSNR/SSIM (:mod:`galip.bench.metrics`) inside the
   brain mask and over the whole volume, for the model and each baseline
   (:mod:`galip.bench.baselines`; histogram matching takes the NEXT subject's target), and
   the failure checks of :mod:`galip.bench.artifacts`. Means over subjects are reported.
4. JSON, a markdown table with the goal verdicts (:mod:`galip.bench.quality_report`) and a
   montage PNG (:mod:`galip.bench.montage`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from galip.runtime.bundle import Bundle
from galip.runtime.errors import ConfigError
from galip.runtime.geometry import voxel_axis

from . import artifacts
from .baselines import BASELINES
from .metrics import evaluate
from .run_options import RunOptions

#: Phantom seed of the held-out data. The shipped demo bundle trains on seed 1
#: (galip.export.demo_bundle.DEMO_DATA); any seed training never used will do.
HELD_OUT_SEED = 123
NOISE = 0.02          # galip-data's default Rician noise, as in training
Log = Callable[[str], None]


@dataclass
class QualityRequest:
    """What to score and where the results go (``out``: quality.json, quality.md, montage.png)."""

    bundle: Bundle
    out: Path
    data: Path | None = None            # an existing galip-data folder; None: write one under out/data
    subjects: int = 3
    seed: int = HELD_OUT_SEED
    spacing: float = 2.0
    model: str = "generator"
    slices: tuple[int, int] | None = None
    options: RunOptions = field(default_factory=RunOptions)
    command: str = ""


@dataclass
class Subject:
    """One held-out subject: images by domain name, brain and (optional) head masks."""

    id: str
    images: dict[str, np.ndarray]
    brain: np.ndarray
    head: np.ndarray | None
    affine: np.ndarray


def _crop(volume: np.ndarray, axis: int, span: tuple[int, int]) -> np.ndarray:
    index = [slice(None)] * 3
    index[axis] = slice(*span)
    return np.ascontiguousarray(volume[tuple(index)])


def load_subjects(folder: Path, names: dict[str, str], limit: int, axis_world: int,
                  slices: tuple[int, int] | None) -> list[Subject]:
    """The first ``limit`` ``sub-*`` folders of ``folder``: images of ``names`` (domain ->
    file suffix) that exist, the brain mask (required), the head mask if there is one."""
    from galip.runtime.volume import load_volume
    folders = sorted(p for p in folder.glob("sub-*") if p.is_dir())[:limit]
    if len(folders) < 2:
        raise ConfigError(f"{folder} holds {len(folders)} subject folder(s) (sub-*); the histogram-matching "
                          "baselines need at least 2 (one subject's target is matched to another's)")
    subjects = []
    for path in folders:
        sid = path.name
        files = {name: path / f"{sid}_{suffix}.nii.gz" for name, suffix in names.items()}
        files = {name: f for name, f in files.items() if f.is_file()}
        mask_file = path / f"{sid}_mask.nii.gz"
        if not mask_file.is_file():
            raise ConfigError(f"{mask_file} is missing; quality needs each subject's brain mask (galip-data writes it)")
        volumes = {name: load_volume(f, require_signal=False) for name, f in files.items()}
        mask = load_volume(mask_file, require_signal=False)
        head_file = path / f"{sid}_head.nii.gz"
        head = load_volume(head_file, require_signal=False).data > 0 if head_file.is_file() else None
        affine = mask.affine_mm.copy()
        images, brain = {n: v.data for n, v in volumes.items()}, mask.data > 0
        if slices is not None:
            axis = voxel_axis(affine, axis_world)
            if slices[1] > brain.shape[axis]:
                raise ConfigError(f"--slices {slices[0]}:{slices[1]} runs past the {brain.shape[axis]} slices "
                                  f"along voxel axis {axis}")
            images = {n: _crop(v, axis, slices) for n, v in images.items()}
            brain = _crop(brain, axis, slices)
            head = _crop(head, axis, slices) if head is not None else None
            affine[:3, 3] += affine[:3, axis] * slices[0]
        subjects.append(Subject(sid, images, brain, head, affine))
    return subjects


def plan_directions(bundle: Bundle, model: str, present: set[str]) -> list[tuple[str, str]]:
    """Ordered (source, target) pairs: targets the model produces, sources any bundle domain,
    both present in the data, source != target."""
    models = bundle.manifest["models"]
    if model not in models:
        raise ConfigError(f"bundle {bundle.root} has no {model} model; it has {', '.join(models)}")
    spec = models[model]
    targets = list(spec) if model == "diffusion" else list(spec.get("domains", bundle.domains))
    domains = [d for d in bundle.domains if d in present]
    pairs = [(s, t) for t in targets if t in present for s in domains if s != t]
    if not pairs:
        raise ConfigError(f"no direction to score: the data holds {', '.join(sorted(present)) or 'no domain'}, "
                          f"the {model} translates to {', '.join(targets)}")
    return pairs


def direction_name(source: str, target: str) -> str:
    return f"{source}->{target}"


def _scores(pred: np.ndarray, truth: np.ndarray, brain: np.ndarray, axis: int) -> dict:
    inside, whole = evaluate(pred, truth, brain, axis), evaluate(pred, truth, None, axis)
    return {"brain": {"psnr": inside.psnr, "ssim": inside.ssim, "slices": inside.slices},
            "whole": {"psnr": whole.psnr, "ssim": whole.ssim, "slices": whole.slices}}


def _views(volume: np.ndarray, subject: Subject, centre: tuple[int, ...]) -> list[np.ndarray]:
    """Axial and sagittal planes through ``centre``, scaled by the volume's brain 99th percentile."""
    scaled = np.asarray(volume, np.float32) / artifacts.brain_scale(volume, subject.brain)
    views = []
    for world in (2, 0):                    # axial (normal z), sagittal (normal x)
        axis = voxel_axis(subject.affine, world)
        views.append(np.take(scaled, centre[axis], axis=axis))
    return views


def score_subject(subject: Subject, reference: Subject, outputs: dict[tuple[str, str], np.ndarray],
                  axis: int, keep_views: bool) -> dict:
    """Per direction: model and baseline scores, hallucination, stripes, separation (and views)."""
    backgrounds: dict[str, np.ndarray] = {}   # by source (one for all when there is a head mask)
    centre = tuple(int(round(c)) for c in np.argwhere(subject.brain).mean(axis=0)) if subject.brain.any() \
        else tuple(n // 2 for n in subject.brain.shape)
    found = {}
    for (source, target), output in outputs.items():
        src, truth = subject.images[source], subject.images[target]
        key = source if subject.head is None else ""
        if key not in backgrounds:
            backgrounds[key] = artifacts.background_mask(src, subject.head)
        background = backgrounds[key]
        row = {"model": _scores(output, truth, subject.brain, axis), "baselines": {},
               "hallucination": {"output": artifacts.hallucination(output, background, subject.brain),
                                 "truth": artifacts.hallucination(truth, background, subject.brain),
                                 "background": "head mask file" if key == "" else "source foreground"},
               "stripes": artifacts.stripes(output, truth, subject.brain, axis).to_json()}
        views = {"source": _views(src, subject, centre), "output": _views(output, subject, centre),
                 "truth": _views(truth, subject, centre)} if keep_views else {}
        for name, baseline in BASELINES.items():
            guess = baseline(src, reference.images[target], subject.brain, reference.brain)
            row["baselines"][name] = _scores(guess, truth, subject.brain, axis)
            if keep_views:
                views[name] = _views(guess, subject, centre)
        others = [t for (s, t) in outputs if s == source and t != target]
        row["separation"] = {other: {
            "output_r": artifacts.pearson(output, outputs[(source, other)], subject.brain),
            "truth_r": artifacts.pearson(truth, subject.images[other], subject.brain)} for other in others}
        row["views"] = views
        found[(source, target)] = row
    return found


def _mean(rows: list[dict]) -> dict:
    """Mean over subjects of every number in equally shaped nested dicts (lists are kept per subject)."""
    first = rows[0]
    merged = {}
    for key, value in first.items():
        if isinstance(value, dict):
            merged[key] = _mean([r[key] for r in rows])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = float(np.mean([r[key] for r in rows]))
        else:
            merged[key] = value
    return merged


def summarise(rows: list[dict]) -> tuple[dict, dict]:
    """One direction's scores over subjects (means, the best baseline per metric, stripe totals)
    and the first subject's montage views."""
    views = rows[0].pop("views")
    for row in rows[1:]:
        row.pop("views")
    summary = _mean(rows)
    summary["stripes"] = {"score": summary["stripes"]["score"],
                          "ratios": [float(np.mean([r["stripes"]["ratios"][a] for r in rows])) for a in range(3)],
                          "stripe_slices": sum(len(r["stripes"]["stripe_slices"]) for r in rows),
                          "per_subject": [r["stripes"]["stripe_slices"] for r in rows]}
    best = {}
    for metric in ("psnr", "ssim"):
        name = max(summary["baselines"], key=lambda n: summary["baselines"][n]["brain"][metric])
        best[metric] = {"name": name, "value": summary["baselines"][name]["brain"][metric]}
    summary["best_baseline"] = best
    summary["subjects"] = rows
    return summary, views


def run_quality(request: QualityRequest, log: Log = lambda line: None) -> tuple[dict, dict]:
    """Make or read the data, translate, score; returns the report and the montage views by
    direction (files are written by :func:`galip.bench.quality_report.write_outputs`)."""
    from galip.runtime import pipeline
    started = time.perf_counter()
    bundle, axis_world = request.bundle, int(request.bundle.preprocess.get("axis", 2))
    if "model" in request.options.settings:
        raise ConfigError("pass the model with --model, not --run-option model=...")
    settings = pipeline.Settings(**{**request.options.settings, "model": request.model})
    data = request.data
    if request.subjects < 2:
        raise ConfigError(f"--subjects must be at least 2 (histogram matching takes another subject's target), "
                          f"got {request.subjects}")
    if data is None:
        from galip.train.data_cli import write_dataset
        data = request.out / "data"
        log(f"writing {request.subjects} held-out subjects (seed {request.seed}, {request.spacing:g} mm) to {data}")
        write_dataset(data, request.subjects, request.seed, request.spacing, NOISE, overwrite=True)
    elif not data.is_dir():
        raise ConfigError(f"--data {data} is not a folder; give a galip-data folder or leave --data out")
    names = {name: domain.suffix for name, domain in bundle.domains.items()}
    subjects = load_subjects(data, names, request.subjects, axis_world, request.slices)
    present = set.intersection(*(set(s.images) for s in subjects))
    pairs = plan_directions(bundle, request.model, present)
    translators = {t: pipeline.prepare(bundle, t, settings, **request.options.prepare) for t in dict.fromkeys(t for _, t in pairs)}
    axis = voxel_axis(subjects[0].affine, axis_world)
    per_direction: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    seconds: dict[tuple[str, str], float] = dict.fromkeys(pairs, 0.0)
    for i, subject in enumerate(subjects):
        outputs = {}
        for source, target in pairs:
            result = translators[target].translate(subject.images[source], subject.affine,
                                                   bundle.domains[source].kind, **request.options.translate)
            outputs[(source, target)] = result.data
            seconds[(source, target)] += result.seconds
        log(f"{subject.id}: translated {len(pairs)} directions; scoring")
        reference = subjects[(i + 1) % len(subjects)]
        for pair, row in score_subject(subject, reference, outputs, axis, keep_views=i == 0).items():
            per_direction[pair].append(row)
    directions, views = {}, {}
    for pair, rows in per_direction.items():
        name = direction_name(*pair)
        directions[name], views[name] = summarise(rows)
        directions[name]["translate_s"] = seconds[pair]
    choice = next(iter(translators.values())).choice
    report = {
        "command": request.command,
        "bundle": {"path": str(bundle.root), "name": pipeline.bundle_name(bundle), "model": request.model,
                   "trained_steps": bundle.manifest["models"][request.model].get("trained_steps")},
        "data": {"folder": str(data), "generated": request.data is None, **_data_settings(request, data),
                 "subjects": [s.id for s in subjects], "slices": list(request.slices) if request.slices else None,
                 "head_masks": all(s.head is not None for s in subjects)},
        "runtime": {"settings": dataclasses.asdict(settings), "options": request.options.to_json(),
                    "backend": choice.reason},
        "definitions": definitions(),
        "directions": directions,
        "wall_s": time.perf_counter() - started,
    }
    return report, views


def _data_settings(request: QualityRequest, data: Path) -> dict:
    """Seed and spacing of the data: the request's when generated, else galip-data's index.json (or None)."""
    if request.data is None:
        return {"seed": request.seed, "spacing_mm": request.spacing}
    try:
        index = json.loads((data / "index.json").read_text())
        return {"seed": index.get("seed"), "spacing_mm": index.get("spacing_mm")}
    except (OSError, ValueError, AttributeError):
        return {"seed": None, "spacing_mm": None}


def definitions() -> dict:
    """The thresholds behind every figure, as written into the JSON."""
    return {
        "metric": "papers' PSNR/SSIM: each slice / its own max, PSNR data range 1 (cap 100 dB), SSIM Gaussian "
                  "sigma 1.5, use_sample_covariance False, data range 1; mean over slices with a non-empty "
                  "reference; brain = inside sub-XXX_mask (outside set to 0), whole = no mask",
        "baselines": {"identity": "the source", "histogram match": "the source inside its brain mask matched "
                      "to the next subject's target inside that subject's brain mask, 0 outside",
                      "histogram match (negated)": "the same for -source"},
        "separation": "Pearson r inside the brain between the outputs for two targets of one source, and between the true targets",
        "hallucination": f"share of background voxels (>= {artifacts.BACKGROUND_MARGIN} voxels outside the head mask "
                         f"file, else outside the source's foreground: Gaussian sigma {artifacts.FOREGROUND_SIGMA:g} "
                         f"voxel, > {artifacts.FOREGROUND_FRACTION:g} x 99th percentile, closed, holes filled) above "
                         f"{artifacts.ON_FRACTION:g} x the volume's brain 99th percentile",
        "stripes": f"slice-to-slice mean |step| ratio output/truth along the slicing axis over the mean in-plane "
                   f"ratio (1 = clean); a stripe slice steps more than {artifacts.STRIPE_FACTOR:g} x the truth's "
                   f"largest step within {artifacts.STRIPE_REACH} slices (scaled by the in-plane ratio) + {artifacts.STRIPE_FLOOR:g} of the brain 99th percentile",
    }


def check_out(out: Path, overwrite: bool) -> None:
    """OutputError unless ``out`` is a new or empty folder (or ``overwrite``); creates it.
    galip-data's rule for its --out, shared (``out`` holds no index.json of its own)."""
    from galip.train.data_cli import prepare_out
    prepare_out(out, overwrite)
