"""Typed model entries of the bundle manifest (schema 1), read once by ``load_bundle``.

``from_manifest`` takes an entry that :func:`galip.runtime.manifest_schema.validate_manifest`
has checked; ``to_manifest`` gives it back (keys this galip does not read, such as ``io``,
``unet``, ``net``, travel in ``extra`` unchanged). The pattern is
:class:`~galip.runtime.schedule.NoiseSchedule`'s: export writes ``to_manifest()``, the
runtime reads ``from_manifest()``; nothing else spells the keys out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..preprocess import PreprocessConfig
from ..schedule import DEFAULT_SPACING, NoiseSchedule
from .lmi import LmiParams

PRECISIONS = ("fp32", "fp16", "int8")   # int8: galip-export --int8 (generator, CPU)
#: A diffusion model's sampler when neither the manifest nor the user names one, and what
#: galip-export writes unless --sampler: DPM-Solver++(2M), which reached the 1000-step
#: ancestral sampler's PSNR within 0.1–0.3 dB at 5–20 steps on the demo model (docs/diffusion.md;
#: the demo bundle records its own measured choice, the cheapest within 0.5 dB).
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_ETA = "dpmpp2m", 20, 0.0


def _extra(entry: Mapping, known: tuple[str, ...]) -> dict:
    return {k: v for k, v in entry.items() if k not in known}


@dataclass(frozen=True)
class GraphFile:
    """An ONNX graph of the bundle: its ``file`` and the external-data files it reads
    (bundle-relative; recorded by ``write_manifest``, empty for galip-export's graphs)."""

    file: str
    external_data: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)    # e.g. an int8 graph's quality check

    def to_manifest(self) -> dict:
        return {"file": self.file, **({"external_data": list(self.external_data)} if self.external_data else {}),
                **self.extra}

    @classmethod
    def from_manifest(cls, entry: Mapping) -> "GraphFile":
        return cls(entry["file"], tuple(entry.get("external_data", ())),
                   {k: v for k, v in entry.items() if k not in ("file", "external_data")})


_ENGINE_KEYS = ("file", "precision", "tensorrt_version", "compute_capability", "version_compatible",
                "hardware_compatibility", "ptx_isa", "min_driver_cuda")


@dataclass(frozen=True)
class EngineEntry:
    """A TensorRT engine and what it needs (galip.export.tensorrt.builder writes it);
    ``extra``: profiles, strongly_typed and whatever else the builder records."""

    file: str
    precision: str
    tensorrt_version: str
    compute_capability: str
    version_compatible: bool = False
    hardware_compatibility: str | None = None
    ptx_isa: str | None = None
    min_driver_cuda: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def to_manifest(self) -> dict:
        entry = {k: getattr(self, k) for k in _ENGINE_KEYS}
        return {k: v for k, v in entry.items() if v is not None} | self.extra

    @classmethod
    def from_manifest(cls, entry: Mapping) -> "EngineEntry":
        return cls(entry["file"], entry["precision"], str(entry["tensorrt_version"]), str(entry["compute_capability"]),
                   bool(entry.get("version_compatible", False)), entry.get("hardware_compatibility"),
                   entry.get("ptx_isa"), entry.get("min_driver_cuda"), _extra(entry, _ENGINE_KEYS))


def _graphs(entry: Mapping) -> dict[str, GraphFile]:
    return {precision: GraphFile.from_manifest(g) for precision, g in entry["graphs"].items()}


def _engines(entries) -> tuple[EngineEntry, ...]:
    return tuple(EngineEntry.from_manifest(e) for e in entries or ())


def _preprocess(entry: Mapping) -> PreprocessConfig | None:
    return PreprocessConfig.from_dict(entry["preprocess"]) if entry.get("preprocess") else None


_GENERATOR_KEYS = ("graphs", "engines", "domains", "source_kinds", "preprocess")


@dataclass(frozen=True)
class GeneratorEntry:
    """``models.generator``: graphs by precision, engines, the target domains it translates to
    (None: every domain of the bundle) and the source kinds it was trained on (None: the
    kinds of its domains; older bundles)."""

    graphs: dict[str, GraphFile]
    engines: tuple[EngineEntry, ...] = ()
    domains: tuple[str, ...] | None = None
    source_kinds: tuple[str, ...] | None = None
    preprocess: PreprocessConfig | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def to_manifest(self) -> dict:
        entry: dict[str, Any] = {"graphs": {p: g.to_manifest() for p, g in self.graphs.items()},
                                 "engines": [e.to_manifest() for e in self.engines]}
        if self.domains is not None:
            entry["domains"] = list(self.domains)
        if self.source_kinds is not None:
            entry["source_kinds"] = list(self.source_kinds)
        if self.preprocess is not None:
            entry["preprocess"] = self.preprocess.to_dict()
        return entry | self.extra

    @classmethod
    def from_manifest(cls, entry: Mapping) -> "GeneratorEntry":
        domains, kinds = entry.get("domains"), entry.get("source_kinds")
        return cls(_graphs(entry), _engines(entry.get("engines")), None if domains is None else tuple(domains),
                   tuple(kinds) if kinds else None, _preprocess(entry), _extra(entry, _GENERATOR_KEYS))


@dataclass(frozen=True)
class SamplerDefaults:
    """``sampler``: what ``galip-run`` does without --sampler/--steps/--eta."""

    default: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    eta: float = DEFAULT_ETA
    spacing: str = DEFAULT_SPACING

    def to_manifest(self) -> dict:
        return {"default": self.default, "steps": int(self.steps), "eta": float(self.eta), "spacing": self.spacing}

    @classmethod
    def from_manifest(cls, entry: Mapping | None) -> "SamplerDefaults":
        entry = entry or {}
        return cls(entry.get("default", DEFAULT_SAMPLER), int(entry.get("steps", DEFAULT_STEPS)),
                   float(entry.get("eta", DEFAULT_ETA)), entry.get("spacing", DEFAULT_SPACING))


_DIFFUSION_KEYS = ("graphs", "engines", "lmi_graph", "schedule", "lmi", "sampler", "data_range",
                   "conditioning", "preprocess")


@dataclass(frozen=True)
class DiffusionEntry:
    """``models.diffusion.<TARGET>``: the step graphs and engines, ``lmi_graph`` (LMI(x, y),
    with its own engines), the noise schedule, LMI parameters, sampler defaults, the model's
    data range (None in a broken bundle: the pipeline refuses it) and ``clip_x0``."""

    graphs: dict[str, GraphFile]
    lmi_graph: GraphFile
    schedule: NoiseSchedule
    engines: tuple[EngineEntry, ...] = ()
    lmi_engines: tuple[EngineEntry, ...] = ()
    lmi: LmiParams = LmiParams()
    sampler: SamplerDefaults = SamplerDefaults()
    data_range: tuple[float, float] | None = None
    clip_x0: bool = True
    xt_map: str | None = None
    preprocess: PreprocessConfig | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def to_manifest(self) -> dict:
        entry: dict[str, Any] = {
            "graphs": {p: g.to_manifest() for p, g in self.graphs.items()},
            "lmi_graph": {**self.lmi_graph.to_manifest(), "engines": [e.to_manifest() for e in self.lmi_engines]},
            "engines": [e.to_manifest() for e in self.engines],
            "schedule": self.schedule.to_manifest(), "lmi": self.lmi.to_manifest(),
            "sampler": self.sampler.to_manifest(),
            "conditioning": {**({"xt_map": self.xt_map} if self.xt_map else {}), "clip_x0": self.clip_x0},
        }
        if self.data_range is not None:
            entry["data_range"] = [float(v) for v in self.data_range]
        if self.preprocess is not None:
            entry["preprocess"] = self.preprocess.to_dict()
        return entry | self.extra

    @classmethod
    def from_manifest(cls, entry: Mapping) -> "DiffusionEntry":
        conditioning = entry.get("conditioning") or {}
        data_range = entry.get("data_range")
        return cls(_graphs(entry), GraphFile.from_manifest(entry["lmi_graph"]),
                   NoiseSchedule.from_manifest(entry["schedule"]), _engines(entry.get("engines")),
                   _engines(entry["lmi_graph"].get("engines")), LmiParams.from_manifest(entry.get("lmi")),
                   SamplerDefaults.from_manifest(entry.get("sampler")),
                   None if data_range is None else (float(data_range[0]), float(data_range[1])),
                   bool(conditioning.get("clip_x0", True)), conditioning.get("xt_map"), _preprocess(entry),
                   _extra(entry, _DIFFUSION_KEYS))


ModelEntry = GeneratorEntry | DiffusionEntry
