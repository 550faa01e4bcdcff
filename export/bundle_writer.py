"""Checkpoint → bundle: graphs, fp16 variants, engines and the manifest entry of one model.

:func:`export_checkpoint` is what ``galip-export`` runs. It adds one model to a bundle
folder (creating it if needed) and keeps every other model already there: a generator
export writes ``models.generator``, a diffusion export ``models.diffusion.<TARGET>`` plus
the LMI graph. Files written (bundle-relative)::

    generator.onnx, generator_fp16.onnx, generator_fp16.engine (or _fp32 without --fp16)
    diffusion_<T>_step.onnx, diffusion_<T>_step_fp16.onnx, diffusion_<T>_step_fp16.engine
    lmi.onnx (lmi_<T>.onnx when another target of the bundle uses other LMI settings),
    lmi.engine

The manifest is written (sha256 of every file, :func:`galip.runtime.bundle.write_manifest`)
once the graphs are in place and again after the engines, so a failed engine build still
leaves a complete ONNX bundle. Where TensorRT cannot build, engines are skipped with one
line that says why.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from galip.runtime.bundle import MANIFEST_NAME, load_bundle, verify_checksums, write_manifest
from galip.runtime.errors import BundleError, ConfigError
from galip.runtime.preprocess import PreprocessConfig
from galip.runtime.contract import DEFAULT_SAMPLER, DEFAULT_STEPS
from galip.runtime.schedule import parse_sampler

DOMAIN_KEYS = ("caption", "class_id", "kind", "suffix")
#: ``--sampler`` default: the contract's default sampler (runtime/contract/entries.py)
EXPORT_SAMPLER = f"{DEFAULT_SAMPLER}:{DEFAULT_STEPS}"
MIN_OPSET, MAX_OPSET = 18, 20       # LayerNormalization et al.; torch.onnx TorchScript exporter max


@dataclass(frozen=True)
class ExportOptions:
    """What ``galip-export`` was asked for (CLI options, checked by :meth:`check`)."""

    fp16: bool = True
    engines: bool = True
    min_size: int = 32
    opt_size: int = 256
    max_size: int = 512
    max_batch: int = 32
    opset: int = 18
    timing_cache: Path | None = None
    version_compatible: bool = False
    sampler: str = EXPORT_SAMPLER       # the diffusion model's default sampler in the manifest

    def check(self, multiple: int = 1) -> None:
        """ConfigError unless min <= opt <= max are positive multiples of ``multiple``."""
        sizes = {"--min-size": self.min_size, "--opt-size": self.opt_size, "--max-size": self.max_size}
        for flag, value in sizes.items():
            if value < multiple or value % multiple:
                raise ConfigError(f"{flag} {value} is not a positive multiple of {multiple} (the size "
                                  f"multiple slices are padded to); use e.g. {max(1, -(-value // multiple)) * multiple}")
        if not self.min_size <= self.opt_size <= self.max_size:
            raise ConfigError(f"sizes must satisfy --min-size <= --opt-size <= --max-size, got "
                              f"{self.min_size}, {self.opt_size}, {self.max_size}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        parse_sampler(self.sampler)
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"--opset {self.opset} is not supported; galip writes opsets {MIN_OPSET} to "
                              f"{MAX_OPSET} (the newest PyTorch's TorchScript exporter writes)")

    @property
    def opt_batch(self) -> int:
        return min(8, self.max_batch)

    def image_profile(self) -> tuple[list[int], list[int], list[int]]:
        """(min, opt, max) of an [N, 1, H, W] input."""
        return ([1, 1, self.min_size, self.min_size], [self.opt_batch, 1, self.opt_size, self.opt_size],
                [self.max_batch, 1, self.max_size, self.max_size])


class Reporter:
    """Status lines of an export; the CLI passes one that prints with rich."""

    def stage(self, text: str) -> ContextManager:   # noqa: D102 - a long step, e.g. a spinner
        return contextlib.nullcontext()

    def note(self, text: str) -> None:              # noqa: D102 - one finished step
        pass


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` did: model key, written files, engine note, manifest."""

    kind: str
    key: str
    files: list[str] = field(default_factory=list)
    engines_note: str | None = None
    manifest: Path | None = None


# ----------------------------------------------------------------------------- manifest pieces
def checkpoint_kinds() -> dict[str, str]:
    """{payload format: model kind} of the checkpoints galip-train writes (the trainers'
    constants; imported here, not at module top, so the CLI checks its arguments before torch)."""
    from galip.train.i2i.trainer import PAYLOAD_FORMAT as GENERATOR_FORMAT
    from galip.train.midiffusion.trainer import PAYLOAD_FORMAT as DIFFUSION_FORMAT
    return {GENERATOR_FORMAT: "generator", DIFFUSION_FORMAT: "diffusion"}


def checkpoint_kind(payload: dict, source: Path | str = "checkpoint") -> str:
    """``"generator"`` or ``"diffusion"`` from the payload's ``format``; ConfigError otherwise."""
    kinds = checkpoint_kinds()
    kind = kinds.get(payload.get("format"))
    if kind is None:
        raise ConfigError(f"{source} holds a {payload.get('format', 'unknown')!r} checkpoint; galip-export "
                          f"reads {' or '.join(repr(k) for k in kinds)} (written by galip-train)")
    return kind


def read_manifest(root: Path) -> dict:
    """The bundle's manifest (every checksum verified: write_manifest re-hashes what it keeps),
    or an empty skeleton for a new bundle."""
    if (root / MANIFEST_NAME).is_file():
        bundle = load_bundle(root)
        bad = verify_checksums(bundle)
        if bad:
            raise BundleError(f"sha256 mismatch for {', '.join(bad)} in bundle {root}: the file changed after "
                              "export; restore it or export into a new --out")
        return bundle.manifest
    return {"domains": {}, "models": {}}


def merge_preprocess(existing: dict | None, stored: dict | None, multiple: int) -> dict:
    """The manifest's ``preprocess``: the checkpoint's settings with size_multiple = lcm of the
    checkpoint's, the network's (``multiple``) and the bundle's; ConfigError when another model of the bundle was trained differently."""
    config = PreprocessConfig.from_dict(stored or {})
    new = {**config.to_dict(), "size_multiple": math.lcm(config.size_multiple, int(multiple))}
    new.pop("bias_field")      # a fact of each model's training: the model's own entry (model_preprocess)
    if not existing:
        return new
    for key in ("axis", "spacing", "percentiles"):
        if _norm_value(existing.get(key)) != _norm_value(new[key]):
            raise ConfigError(f"this model was trained with preprocess {key}={new[key]!r} but the bundle's "
                              f"other models use {existing.get(key)!r}; export it into another --out")
    return {**existing, "size_multiple": math.lcm(int(existing["size_multiple"]), int(multiple))}


def model_preprocess(manifest: dict, stored: dict | None) -> dict:
    """What a model's entry adds to its manifest entry: ``{"preprocess": the bundle's with
    the model's bias_field}`` where the model was trained on bias-free slices, else nothing."""
    bias = PreprocessConfig.from_dict(stored or {}).bias_field
    return {} if bias == "none" else {"preprocess": {**manifest["preprocess"], "bias_field": bias}}


def _norm_value(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def merge_domains(existing: dict, domains: list[dict]) -> dict:
    """``existing`` plus ``domains`` (dicts with name + DOMAIN_KEYS); a clash is a ConfigError."""
    merged = dict(existing)
    for domain in domains:
        entry = {key: domain[key] for key in DOMAIN_KEYS}
        old = merged.get(domain["name"])
        if old is not None and {k: old.get(k) for k in DOMAIN_KEYS} != entry:
            raise ConfigError(f"domain {domain['name']} is {entry} in this checkpoint but {old} in the bundle; "
                              "export into another --out")
        merged[domain["name"]] = entry
    return merged


# ----------------------------------------------------------------------------- engines
def engine_skip_reason(options: ExportOptions) -> str | None:
    """Why no engine is built (one line), or None when TensorRT and a GPU are here."""
    if not options.engines:
        return "engines skipped: --no-engines"
    from galip.export.tensorrt.builder import compute_capability, unavailable_reason
    reason = unavailable_reason()
    if reason is None and compute_capability() is None:
        reason = "no CUDA GPU found (TensorRT builds engines for the GPU it runs on)"
    return None if reason is None else f"engines skipped: {reason}"


# ----------------------------------------------------------------------------- the export
def _timed(reporter: Reporter, text: str):
    @contextlib.contextmanager
    def run() -> Iterator[None]:
        start = time.perf_counter()
        with reporter.stage(text):
            yield
        reporter.note(f"{text} ({time.perf_counter() - start:.1f} s)")
    return run()


def _write(model, root: Path, name: str, result: ExportResult) -> str:
    from galip.export.generator_graph import save_graph
    save_graph(model, root / name)
    result.files.append(name)
    return name


def export_checkpoint(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None,
                      reporter: Reporter | None = None,
                      build: Callable[..., dict] | None = None) -> ExportResult:
    """Export the model in ``checkpoint`` into the bundle folder ``out`` (module docstring).

    ``build``: the engine builder (default :func:`galip.export.tensorrt.builder.build_engine`).
    Raises ConfigError (a one-line GalipError) for an unreadable checkpoint, an unknown
    kind, bad sizes or a bundle it cannot join; BackendError when an engine build fails.
    """
    options, reporter = options or ExportOptions(), reporter or Reporter()
    options.check()
    from galip.train.checkpoint import load_checkpoint
    checkpoint, root = Path(checkpoint), Path(out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} is a file; pass a folder for the bundle")
    manifest = read_manifest(root) if root.is_dir() else {"domains": {}, "models": {}}
    with _timed(reporter, f"read {checkpoint}"):
        payload = load_checkpoint(checkpoint)
        kind = checkpoint_kind(payload, checkpoint)
    root.mkdir(parents=True, exist_ok=True)
    if kind == "generator":
        result, engine_jobs = _export_generator(payload, root, manifest, options, reporter)
    else:
        result, engine_jobs = _export_diffusion(payload, root, manifest, options, reporter)
    manifest["files"] = {}                  # recomputed from what the models reference
    result.manifest = write_manifest(root, manifest)
    reporter.note(f"wrote {result.manifest} ({result.key})")

    # Engines last: the ONNX bundle above stays complete whatever happens here.
    result.engines_note = engine_skip_reason(options)
    if result.engines_note is None and engine_jobs:
        if build is None:
            from galip.export.tensorrt.builder import build_engine as build
        for entry_engines, job in engine_jobs:
            with _timed(reporter, f"build TensorRT engine {job['engine']}"):
                engine = build(root / job["graph"], root / job["engine"], fp16=job["fp16"],
                               profiles=job["profiles"], timing_cache=options.timing_cache,
                               plugins=job["plugins"], version_compatible=options.version_compatible)
            entry_engines.append(engine)
            result.files.append(engine["file"])
        result.manifest = write_manifest(root, manifest)
        reporter.note(f"wrote {result.manifest} with {len(engine_jobs)} engine(s)")
    return result


def _export_generator(payload: dict, root: Path, manifest: dict, options: ExportOptions,
                      reporter: Reporter):
    from galip.export import fp16 as fp16_mod
    from galip.export.generator_graph import INPUTS, OUTPUTS, export_generator
    from galip.train.i2i.loop import trained_steps
    from galip.train.i2i.unet import UNetConfig

    unet_config = UNetConfig.from_dict(payload["unet_config"])
    result = ExportResult("generator", "models.generator")
    domains = list(payload["domains"])
    manifest["preprocess"] = merge_preprocess(manifest.get("preprocess"), payload.get("preprocess"),
                                              unet_config.size_multiple)
    options.check(manifest["preprocess"]["size_multiple"])
    manifest["domains"] = merge_domains(manifest.get("domains", {}), domains)
    with _timed(reporter, "export generator graph (fp32)"):
        model = export_generator(payload, opset=options.opset)
        graphs = {"fp32": {"file": _write(model, root, "generator.onnx", result)}}
    if options.fp16:
        with _timed(reporter, "convert generator graph to fp16"):
            half = fp16_mod.to_fp16(model, spatial_inputs=["image"])
            graphs["fp16"] = {"file": _write(half, root, "generator_fp16.onnx", result)}
    entry = {
        "domains": [d["name"] for d in domains], "graphs": graphs, "engines": [],
        # what the generator saw as input: the runtime refuses other source kinds
        "source_kinds": sorted({d["kind"] for d in domains}),
        "io": {"inputs": dict(INPUTS), "outputs": dict(OUTPUTS)},
        "unet": unet_config.to_dict(), "trained_steps": trained_steps(payload),   # a fine-tuning's start too
        "trained_size": (payload.get("preprocess") or {}).get("size"),
        **model_preprocess(manifest, payload.get("preprocess")),
    }
    manifest.setdefault("models", {})["generator"] = entry
    precision = "fp16" if options.fp16 else "fp32"
    image = options.image_profile()
    jobs = [(entry["engines"], {
        "graph": graphs[precision]["file"], "engine": f"generator_{precision}.engine",
        "fp16": options.fp16, "plugins": False,
        "profiles": {"image": image, "domain": tuple([shape[0]] for shape in image)}})]
    return result, jobs


def _lmi_file(manifest: dict, target: str, lmi: dict) -> str:
    """``lmi.onnx`` unless another diffusion target of the bundle uses it with other settings."""
    for other, spec in manifest.get("models", {}).get("diffusion", {}).items():
        if other != target and spec.get("lmi_graph", {}).get("file") == "lmi.onnx" and spec.get("lmi") != lmi:
            return f"lmi_{target}.onnx"
    return "lmi.onnx"


def _export_diffusion(payload: dict, root: Path, manifest: dict, options: ExportOptions,
                      reporter: Reporter):
    from galip.export import fp16 as fp16_mod
    from galip.export import diffusion_graph as dg
    from galip.export.lmi_onnx import DOMAIN, OP_TYPE
    from galip.train.midiffusion.trainer import denoiser_from_payload

    denoiser, schedule, info = denoiser_from_payload(payload)
    target = info["target"]["name"]
    result = ExportResult("diffusion", f"models.diffusion.{target}")
    manifest["preprocess"] = merge_preprocess(manifest.get("preprocess"), info.get("preprocess"),
                                              denoiser.net.config.size_multiple)
    options.check(manifest["preprocess"]["size_multiple"])
    manifest["domains"] = merge_domains(manifest.get("domains", {}), [info["target"]])
    lmi = dg.lmi_settings(denoiser.lmi_config)
    stem = f"diffusion_{target}_step"
    custom = [(DOMAIN, OP_TYPE)]
    with _timed(reporter, f"export diffusion step graph {target} (fp32)"):
        data_range = dg.data_range_entry(info)          # the graph clips x̂0 to what the manifest records
        model = dg.export_step(denoiser, opset=options.opset, clip=tuple(data_range))
        graphs = {"fp32": {"file": _write(model, root, f"{stem}.onnx", result)}}
    if options.fp16:
        with _timed(reporter, f"convert diffusion step graph {target} to fp16"):
            half = fp16_mod.to_fp16(model, spatial_inputs=[*dg.IMAGE_INPUTS, *dg.STATE_INPUTS],
                                    keep_fp32_nodes=dg.update_nodes(model), allowed_custom=custom)
            graphs["fp16"] = {"file": _write(half, root, f"{stem}_fp16.onnx", result)}
    lmi_name = _lmi_file(manifest, target, lmi)
    with _timed(reporter, f"export LMI graph {lmi_name}"):
        _write(dg.export_lmi(lmi, opset=options.opset), root, lmi_name, result)
    entry = {
        "graphs": graphs, "lmi_graph": {"file": lmi_name, "engines": []}, "engines": [],
        "schedule": schedule.noise_schedule.to_manifest(), "lmi": lmi, "sampler": dg.sampler_entry(schedule, *parse_sampler(options.sampler)),
        "data_range": data_range,
        "conditioning": {"xt_map": denoiser.lmi_config.xt_map, "clip_x0": True},
        "io": {"inputs": dict(dg.INPUTS), "outputs": dict(dg.OUTPUTS)}, "lmi_io": dict(dg.LMI_IO),
        "net": denoiser.net.config.to_dict(), "trained_steps": int(info.get("step") or 0),
        **model_preprocess(manifest, info.get("preprocess")),
    }
    manifest.setdefault("models", {}).setdefault("diffusion", {})[target] = entry
    precision = "fp16" if options.fp16 else "fp32"
    image = options.image_profile()
    jobs = [(entry["engines"], {
        "graph": graphs[precision]["file"], "engine": f"{stem}_{precision}.engine",
        "fp16": options.fp16, "plugins": True,
        "profiles": {name: image for name in (*dg.IMAGE_INPUTS, *dg.STATE_INPUTS)}}),
        (entry["lmi_graph"]["engines"], {
            "graph": lmi_name, "engine": lmi_name.replace(".onnx", ".engine"), "fp16": False,
            "plugins": True, "profiles": {"x": image, "y": image}})]
    return result, jobs
