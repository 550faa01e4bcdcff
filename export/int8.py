"""int8 generator graphs: static QDQ quantisation, shipped only where quality holds.

``galip-export --int8`` runs :func:`add_int8_generator` after the fp32 graph is in the bundle:

1. Calibration on training-like slices: phantom subjects (:mod:`galip.train.phantom`, seed
   :data:`CALIBRATION_SEED`, never the held-out one) at the bundle's spacing, every MRI
   contrast the generator knows, through the bundle's own preprocessing, each slice paired
   with a target class id (all targets in turn), as training feeds them.
2. ``onnxruntime.quantization.quantize_static`` in QDQ format: int8 weights per output
   channel, uint8 activations from MinMax ranges over the calibration slices; Conv, MatMul
   and Gemm are quantised, everything else (normalisations, softmax, the class tables)
   stays fp32.
3. Quality check on held-out phantoms (seed :data:`HELD_OUT_SEED`, as ``galip-eval
   quality``): every direction between the contrasts is translated by the runtime pipeline
   with the fp32 and the int8 graph, and scored against the true target with the papers'
   PSNR inside the brain (each slice divided by its own max, data range 1, mean over slices
   with brain). The int8 graph enters the manifest (``graphs.int8``, with these scores) only
   when its PSNR is within :data:`MAX_DROP_DB` of fp32's in every direction; otherwise it is
   deleted and :class:`Int8Refused` (a one-line ConfigError) says by how much it missed.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from galip.runtime.errors import ConfigError

CALIBRATION_SEED = 7        # phantom data set of the calibration slices (training uses 0/1, held-out 123)
HELD_OUT_SEED = 123         # galip-eval quality's held-out seed
MAX_DROP_DB = 0.3           # int8 PSNR may be at most this far below fp32's, per direction
SPACING_MM: float | None = None   # phantom grid of calibration and check; None: the bundle's spacing
CALIBRATION_SLICES = 8      # per contrast
NOISE = 0.02                # galip-data's Rician noise
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
INT8_FILE = "generator_int8.onnx"
INSTALL = "pip install 'galip[cpu]' (onnxruntime with its quantization tools)"


class Int8Refused(ConfigError):
    """The int8 graph lost more than MAX_DROP_DB of PSNR against fp32 in some direction."""


@dataclass
class Int8Check:
    """PSNR (dB, inside the brain, against the true target) per direction for fp32 and int8."""

    fp32: dict[str, float] = field(default_factory=dict)
    int8: dict[str, float] = field(default_factory=dict)
    max_drop_db: float = MAX_DROP_DB

    @property
    def drops(self) -> dict[str, float]:
        return {d: self.fp32[d] - self.int8[d] for d in self.fp32}

    def __bool__(self) -> bool:
        return bool(self.fp32) and all(drop <= self.max_drop_db for drop in self.drops.values())

    def __str__(self) -> str:
        if not self.fp32:
            return "no MRI to MRI direction among the generator's domains to check int8 on"
        worst = max(self.drops, key=self.drops.get)
        return (f"int8 PSNR {self.int8[worst]:.2f} dB vs fp32 {self.fp32[worst]:.2f} dB on {worst} "
                f"(drop {self.drops[worst]:.2f} dB, allowed {self.max_drop_db:g} dB)")

    def to_json(self) -> dict:
        return {"metric": "PSNR dB inside the brain vs the true target (per slice / its max, data range 1)",
                "held_out_seed": HELD_OUT_SEED, "max_drop_db": self.max_drop_db,
                "fp32": self.fp32, "int8": self.int8}


# ----------------------------------------------------------------------------- data
def _spacing(bundle) -> float:
    return float(SPACING_MM or bundle.preprocess.get("spacing") or 2.0)


def _subjects(seed: int, count: int, spacing: float):
    from galip.train import phantom
    anatomy = phantom.load_anatomy()
    return [phantom.make_subject(anatomy, i, seed, spacing, NOISE) for i in range(count)]


def _generator_domains(bundle) -> tuple[str, ...]:
    """The generator's targets (``domains`` is optional in a manifest: then every bundle domain)."""
    return tuple(bundle.generator.domains or bundle.domains)


def _contrasts(bundle) -> dict[str, str]:
    """{domain name: phantom image key} of the generator's MRI domains the phantoms have."""
    from galip.train import phantom
    names = _generator_domains(bundle)
    return {n: bundle.domains[n].suffix for n in names
            if bundle.domains[n].kind == "mri" and bundle.domains[n].suffix in phantom.SEQUENCES}


def calibration_feeds(bundle, per_contrast: int = CALIBRATION_SLICES, seed: int = CALIBRATION_SEED) -> list[dict]:
    """Training-like generator feeds ({"image": (1, 1, H, W), "domain": (1,)}): the middle
    slices of one phantom subject per contrast, through the bundle's preprocessing."""
    from galip.runtime.preprocess import PreprocessConfig, plan_volume
    config = PreprocessConfig.from_dict(bundle.preprocess)
    contrasts = _contrasts(bundle)
    if not contrasts:
        raise ConfigError("--int8 calibrates on MRI phantoms, but the generator has no T1/T2/PD domain")
    (subject,) = _subjects(seed, 1, _spacing(bundle))
    class_ids = [bundle.domains[n].class_id for n in _generator_domains(bundle)]
    feeds = []
    for key in contrasts.values():
        plan, raw = plan_volume(subject.images[key], subject.affine, "mri", config)
        middle, picked = len(raw) // 2, []
        step = max(1, len(raw) // (2 * per_contrast))
        for i in range(per_contrast):
            picked.append(raw[min(len(raw) - 1, middle - per_contrast // 2 * step + i * step)])
        for i, image in enumerate(plan.prepare(np.stack(picked))):
            feeds.append({"image": image[None, None].astype(np.float32),
                          "domain": np.array([class_ids[(len(feeds) + i) % len(class_ids)]], np.int64)})
    return feeds


# ----------------------------------------------------------------------------- quantisation
def quantize_generator(fp32: Path, out: Path, feeds: list[dict]) -> None:
    """Static QDQ quantisation of ``fp32`` into ``out`` (written atomically), calibrated on ``feeds``."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
    except ImportError as error:
        raise ConfigError(f"--int8 needs onnxruntime's quantization tools ({error}); {INSTALL}") from None

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem + ".", suffix=".tmp.onnx")
    os.close(fd)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)     # quantize_static logs advice on the root logger
    try:
        quantize_static(str(fp32), tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=["CPUExecutionProvider"])
        os.replace(tmp, out)
    finally:
        root_logger.setLevel(level)
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- quality check
def _psnr_in_brain(pred: np.ndarray, truth: np.ndarray, brain: np.ndarray, axis: int) -> float:
    """The papers' PSNR inside ``brain``: per slice along ``axis`` divided by its own max, data
    range 1, mean over slices with brain (capped at 100 dB)."""
    keep = brain > 0
    pred, truth = np.moveaxis(np.where(keep, pred, 0.0), axis, 0), np.moveaxis(np.where(keep, truth, 0.0), axis, 0)
    scores = []
    for p, t in zip(pred, truth):
        if not np.any(t > 0):
            continue
        p = p / p.max() if p.max() > 0 else np.zeros_like(p)
        mse = float(np.mean((p - t / t.max()) ** 2))
        scores.append(100.0 if mse <= 0 else min(100.0, 10 * math.log10(1 / mse)))
    return float(np.mean(scores))


def check_quality(bundle, subjects: int = 2, max_drop_db: float | None = None, threads: int | None = None,
                  log=lambda line: None) -> Int8Check:
    """Score the bundle's fp32 and int8 generator graphs on held-out phantoms (module docstring);
    ``max_drop_db`` default :data:`MAX_DROP_DB`."""
    from galip.runtime.geometry import voxel_axis
    from galip.runtime.pipeline import Settings, prepare
    check = Int8Check(max_drop_db=MAX_DROP_DB if max_drop_db is None else max_drop_db)
    contrasts = _contrasts(bundle)
    people = _subjects(HELD_OUT_SEED, subjects, _spacing(bundle))
    axis = voxel_axis(people[0].affine, int(bundle.preprocess.get("axis", 2)))
    for precision in ("fp32", "int8"):
        for target in contrasts:
            translator = prepare(bundle, target, Settings(model="generator", backend="onnxruntime-cpu",
                                                          precision=precision, threads=threads))
            for source in contrasts:
                if source == target:
                    continue
                direction = f"{source}->{target}"
                scores = [_psnr_in_brain(translator.translate(s.images[contrasts[source]], s.affine, "mri").data,
                                         s.images[contrasts[target]], s.images["mask"], axis) for s in people]
                getattr(check, precision)[direction] = float(np.mean(scores))
                log(f"{precision} {direction}: {getattr(check, precision)[direction]:.2f} dB")
    return check


# ----------------------------------------------------------------------------- into the bundle
def add_int8_generator(root: Path, log=lambda line: None, *, subjects: int = 2, max_drop_db: float | None = None,
                       feeds: list[dict] | None = None, threads: int | None = None) -> Int8Check:
    """Quantise the bundle's fp32 generator into ``generator_int8.onnx`` and ship it (manifest
    ``graphs.int8`` with the check's scores) only when :func:`check_quality` passes; otherwise
    delete it and raise :class:`Int8Refused`. ``feeds``: calibration feeds (default
    :func:`calibration_feeds`)."""
    import copy

    from galip.runtime.bundle import Bundle, load_bundle, write_manifest
    bundle = load_bundle(root)
    if "generator" not in bundle.manifest["models"]:
        raise ConfigError(f"--int8 quantises the generator, but {root} has none; export a generator checkpoint")
    out = Path(root) / INT8_FILE
    fp32 = bundle.path(bundle.manifest["models"]["generator"]["graphs"]["fp32"]["file"])
    feeds = calibration_feeds(bundle) if feeds is None else feeds
    log(f"quantising {fp32.name} to int8 (static QDQ, {len(feeds)} calibration slices)")
    quantize_generator(fp32, out, feeds)
    # Checked through an in-memory manifest: the bundle on disk never lists an unchecked graph
    # (nor a checksum for it yet, so this check opens the graphs unverified: export wrote them).
    manifest = copy.deepcopy(bundle.manifest)
    graphs = manifest["models"]["generator"]["graphs"]
    graphs["int8"] = {"file": INT8_FILE}
    check = check_quality(Bundle.parsed(bundle.root, manifest, verify=False), subjects, max_drop_db, threads, log)
    if not check:
        out.unlink()
        raise Int8Refused(f"int8 generator not shipped: {check} on held-out phantoms; the bundle keeps "
                          "its fp32/fp16 graphs (use them, or re-export without --int8)")
    graphs["int8"]["quality"] = check.to_json()
    manifest["files"] = {}
    write_manifest(root, manifest)
    return check
