"""The bundle manifest's schema (version 1): every field the runtime reads, its type and range.

:func:`parse_manifest` reads the JSON text with its size and nesting capped *before*
``json.loads`` runs (100,000 nested ``[`` would otherwise end in a RecursionError);
:func:`validate_manifest` checks the parsed object so that no malformed bundle reaches
the pipeline. Every failure is one :class:`BundleError` line naming the field, the value
found and the fix. Fields the runtime does not read (``io``, ``unet``, ``net``, ...) may
hold anything; the layout is documented in :mod:`galip.runtime.bundle` and
docs/contracts.md.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .bias import BIAS_FIELDS
from .contract.entries import DEFAULT_SAMPLER, PRECISIONS
from .errors import BundleError
from .limits import VOXEL_MM
from .schedule import DEFAULT_SPACING, SAMPLERS, SCHEDULE_KIND, SPACINGS

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 4 << 20      # real manifests are a few KB
MAX_DEPTH = 32                    # real manifests nest 6 deep
MAX_DOMAINS = 256
MAX_FILES = 10_000
KINDS = ("mri", "ct")
MODELS = ("generator", "diffusion")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$")
_CAPABILITY = re.compile(r"^([0-9]{1,2}\.[0-9]{1,2}|unknown)$")   # "unknown": built where none was read
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_REEXPORT = "re-export the bundle"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _fail(source: Path, where: str, expected: str, found: Any, fix: str = _REEXPORT) -> BundleError:
    return BundleError(f"{source}: {where} should be {expected}, found {_show(found)}; {fix}")


# ----------------------------------------------------------------------------- JSON text
def max_depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting of JSON text ``raw`` (string contents ignored), vectorised."""
    codes = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int32) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_manifest(raw: bytes, source: Path) -> Any:
    """``json.loads`` of ``raw`` after capping its size and nesting; BundleError on any failure."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{source}: expected a manifest of at most {MAX_MANIFEST_BYTES >> 20} MiB, found "
                          f"{len(raw):,} bytes; {_REEXPORT}")
    depth = max_depth(raw)
    if depth > MAX_DEPTH:
        raise BundleError(f"{source}: expected JSON nested at most {MAX_DEPTH} deep, found {depth} levels; "
                          f"{_REEXPORT}")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_constant)
    except json.JSONDecodeError as error:
        raise BundleError(f"{source} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                          f"{_REEXPORT}") from None
    except UnicodeDecodeError:
        raise BundleError(f"{source} is not UTF-8 text; {_REEXPORT}") from None
    except (ValueError, RecursionError) as error:   # NaN/Infinity, 5,000-digit integers
        raise BundleError(f"{source} is not valid JSON for a manifest ({' '.join(str(error).split())[:120]}); "
                          f"{_REEXPORT}") from None


# ----------------------------------------------------------------------------- field checks
class _Checker:
    """Type and range checks that raise one BundleError naming ``source`` and the field."""

    def __init__(self, source: Path):
        self.source = source

    def fail(self, where: str, expected: str, found: Any) -> BundleError:
        return _fail(self.source, where, expected, found)

    def obj(self, value: Any, where: str, required: tuple[str, ...] = (), *, nonempty: bool = False) -> dict:
        if not isinstance(value, dict) or (nonempty and not value):
            raise self.fail(where, "a non-empty object" if nonempty else "an object", value)
        for key in required:
            if key not in value:
                raise self.fail(f"{where}.{key}", "present", None)
        return value

    def integer(self, value: Any, where: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(where, f"an integer from {lo} to {hi}", value)
        return value

    def number(self, value: Any, where: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (lo < value if open_lo else lo <= value) and value <= hi
        if not ok:
            raise self.fail(where, f"a number in {'(' if open_lo else '['}{lo:g}, {hi:g}]", value)
        return float(value)

    def string(self, value: Any, where: str, *, pattern: re.Pattern | None = None, choices=None,
               max_len: int = 1000) -> str:
        if choices is not None:
            if value not in choices:
                raise self.fail(where, f"one of {', '.join(map(str, choices))}", value)
        elif not isinstance(value, str) or not value or len(value) > max_len or \
                (pattern is not None and not pattern.match(value)):
            shape = f"matching {pattern.pattern}" if pattern is not None else f"of 1 to {max_len} characters"
            raise self.fail(where, f"a string {shape}", value)
        return value

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, "true or false", value)
        return value

    def file(self, value: Any, where: str) -> None:
        self.string(self.obj(value, where, ("file",))["file"], f"{where}.file")
        extra = value.get("external_data", [])
        if not isinstance(extra, list) or len(extra) > MAX_FILES:
            raise self.fail(f"{where}.external_data", "a list of file names", extra)
        for i, name in enumerate(extra):
            self.string(name, f"{where}.external_data[{i}]")

    def pair(self, value: Any, where: str, lo: float, hi: float) -> tuple[float, float]:
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail(where, "a list of two numbers", value)
        first = self.number(value[0], f"{where}[0]", lo, hi)
        second = self.number(value[1], f"{where}[1]", lo, hi)
        if not first < second:
            raise self.fail(where, "[low, high] with low < high", value)
        return first, second


def _preprocess(c: _Checker, pre: Any, where: str) -> None:
    c.obj(pre, where, ("axis", "spacing", "size_multiple", "percentiles"))
    c.integer(pre["axis"], f"{where}.axis", 0, 2)
    if pre["spacing"] is not None:
        c.number(pre["spacing"], f"{where}.spacing (mm, or null to keep the input's)", *VOXEL_MM)
    c.integer(pre["size_multiple"], f"{where}.size_multiple", 1, 1024)
    c.pair(pre["percentiles"], f"{where}.percentiles", 0.0, 100.0)
    if "bias_field" in pre:                       # absent in bundles written before it existed: none
        c.string(pre["bias_field"], f"{where}.bias_field", choices=BIAS_FIELDS)


def _domains(c: _Checker, domains: Any) -> None:
    c.obj(domains, "domains", nonempty=True)
    if len(domains) > MAX_DOMAINS:
        raise c.fail("domains", f"at most {MAX_DOMAINS} entries", f"{len(domains)} entries")
    seen_ids: dict[int, str] = {}
    seen_names: dict[str, str] = {}
    for name, entry in domains.items():
        where = f"domains.{name}"
        c.string(name, f"the domain name {name!r}", pattern=_NAME)
        c.obj(entry, where, ("caption", "class_id", "kind", "suffix"))
        c.string(entry["caption"], f"{where}.caption")
        class_id = c.integer(entry["class_id"], f"{where}.class_id", 0, 1023)
        c.string(entry["kind"], f"{where}.kind", choices=KINDS)
        c.string(entry["suffix"], f"{where}.suffix", pattern=_NAME)
        if class_id in seen_ids:
            raise c.fail(f"{where}.class_id", f"unique (domains.{seen_ids[class_id]} has it too)", class_id)
        seen_ids[class_id] = name
        for alias in {name.lower(), entry["suffix"].lower()}:   # --to matches names and suffixes
            if seen_names.get(alias, name) != name:
                raise c.fail(f"{where}", f"a name and suffix no other domain uses (domains.{seen_names[alias]})",
                             alias)
            seen_names[alias] = name


def _graphs_and_engines(c: _Checker, spec: dict, where: str) -> None:
    graphs = c.obj(spec.get("graphs"), f"{where}.graphs", nonempty=True)
    for precision, entry in graphs.items():
        c.string(precision, f"{where}.graphs key", choices=PRECISIONS)
        c.file(entry, f"{where}.graphs.{precision}")
    engines = spec.get("engines", [])
    if not isinstance(engines, list):
        raise c.fail(f"{where}.engines", "a list", engines)
    for i, engine in enumerate(engines):
        at = f"{where}.engines[{i}]"
        c.obj(engine, at, ("file", "precision", "tensorrt_version", "compute_capability"))
        c.file(engine, at)
        c.string(engine["precision"], f"{at}.precision", choices=PRECISIONS)
        c.string(engine["tensorrt_version"], f"{at}.tensorrt_version", max_len=40)
        c.string(engine["compute_capability"], f"{at}.compute_capability", pattern=_CAPABILITY)
        for key in ("version_compatible", "strongly_typed"):
            if key in engine:
                c.boolean(engine[key], f"{at}.{key}")
        if engine.get("min_driver_cuda") is not None:
            c.integer(engine["min_driver_cuda"], f"{at}.min_driver_cuda", 0, 10 ** 6)
        for key in ("ptx_isa", "hardware_compatibility"):
            if key in engine:
                c.string(engine[key], f"{at}.{key}", max_len=40)
    if "preprocess" in spec and spec["preprocess"] is not None:
        _preprocess(c, spec["preprocess"], f"{where}.preprocess")


def _generator(c: _Checker, spec: Any, domains: dict) -> None:
    c.obj(spec, "models.generator")
    _graphs_and_engines(c, spec, "models.generator")
    if spec.get("source_kinds") is not None:
        kinds = spec["source_kinds"]
        if not isinstance(kinds, list) or not kinds or not all(k in KINDS for k in kinds):
            raise c.fail("models.generator.source_kinds", f"a non-empty list of {', '.join(KINDS)}", kinds)
    if "domains" in spec:
        targets = spec["domains"]
        if not isinstance(targets, list) or not targets or not all(isinstance(d, str) for d in targets) \
                or len(set(targets)) != len(targets):
            raise c.fail("models.generator.domains", "a non-empty list of distinct domain names", targets)
        unknown = [d for d in targets if d not in domains]
        if unknown:
            raise c.fail("every model domain", f"one of domains ({', '.join(domains)})", unknown)


def _diffusion(c: _Checker, spec: Any, where: str) -> None:
    c.obj(spec, where, ("schedule", "lmi_graph"))
    _graphs_and_engines(c, spec, where)
    c.file(spec["lmi_graph"], f"{where}.lmi_graph")
    lmi_engines = spec["lmi_graph"].get("engines", [])
    if lmi_engines:
        _graphs_and_engines(c, {"graphs": {"fp32": spec["lmi_graph"]}, "engines": lmi_engines},
                            f"{where}.lmi_graph")
    schedule = c.obj(spec["schedule"], f"{where}.schedule", ("beta_start", "beta_end", "timesteps"))
    c.string(schedule.get("kind", SCHEDULE_KIND), f"{where}.schedule.kind", choices=(SCHEDULE_KIND,))
    start = c.number(schedule["beta_start"], f"{where}.schedule.beta_start", 0.0, 1.0, open_lo=True)
    c.number(schedule["beta_end"], f"{where}.schedule.beta_end", start, 0.999999)
    timesteps = c.integer(schedule["timesteps"], f"{where}.schedule.timesteps", 1, 100_000)
    if spec.get("sampler") is not None:
        sampler = c.obj(spec["sampler"], f"{where}.sampler")
        c.string(sampler.get("default", DEFAULT_SAMPLER), f"{where}.sampler.default", choices=SAMPLERS)
        c.integer(sampler.get("steps", 1), f"{where}.sampler.steps", 1, timesteps)
        c.number(sampler.get("eta", 0.0), f"{where}.sampler.eta", 0.0, 1.0)
        c.string(sampler.get("spacing", DEFAULT_SPACING), f"{where}.sampler.spacing", choices=SPACINGS)
    if "data_range" in spec:
        c.pair(spec["data_range"], f"{where}.data_range", -1e6, 1e6)
    if spec.get("lmi") is not None:
        lmi = c.obj(spec["lmi"], f"{where}.lmi")
        if "patch" in lmi and c.integer(lmi["patch"], f"{where}.lmi.patch", 1, 31) % 2 == 0:
            raise c.fail(f"{where}.lmi.patch", "odd", lmi["patch"])
        for key, lo, hi in (("radius", 0, 15), ("bins", 2, 256)):
            if key in lmi:
                c.integer(lmi[key], f"{where}.lmi.{key}", lo, hi)
        if "sigma" in lmi:
            c.number(lmi["sigma"], f"{where}.lmi.sigma", 0.0, 1.0, open_lo=True)
        if "normalize" in lmi:
            c.boolean(lmi["normalize"], f"{where}.lmi.normalize")
    conditioning = spec.get("conditioning")
    if conditioning is not None and "clip_x0" in c.obj(conditioning, f"{where}.conditioning"):
        c.boolean(conditioning["clip_x0"], f"{where}.conditioning.clip_x0")


def validate_manifest(manifest: Any, source: Path, *, require_files: bool = True) -> None:
    """Check every field the runtime reads; BundleError naming the first bad one."""
    c = _Checker(source)
    c.obj(manifest, "the manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise BundleError(
            f"{source}: unknown schema_version {_show(version)}; this galip reads schema {SCHEMA_VERSION}: "
            "upgrade galip (pip install -U galip) or re-export the bundle with this version")
    for key in ("galip_version", "name"):
        if manifest.get(key) is not None:
            c.string(manifest[key], key, max_len=200)
    _preprocess(c, manifest.get("preprocess"), "preprocess")
    domains = manifest.get("domains")
    _domains(c, domains)
    models = c.obj(manifest.get("models"), "models", nonempty=True)
    for name in models:
        c.string(name, "a model name in models", choices=MODELS)
    if "generator" in models:
        _generator(c, models["generator"], domains)
    if "diffusion" in models:
        diffusion = c.obj(models["diffusion"], "models.diffusion", nonempty=True)
        unknown = [d for d in diffusion if d not in domains]
        if unknown:
            raise c.fail("every model domain", f"one of domains ({', '.join(domains)})", unknown)
        for target, spec in diffusion.items():
            _diffusion(c, spec, f"models.diffusion.{target}")
    if "files" not in manifest and not require_files:
        return
    files = c.obj(manifest.get("files"), "files")
    if len(files) > MAX_FILES:
        raise c.fail("files", f"at most {MAX_FILES} entries", f"{len(files)} entries")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise c.fail(f"files[{name!r}]", "a 64-digit lowercase sha256 hex string", digest)
    sizes = c.obj(manifest.get("sizes", {}), "sizes")    # absent in older bundles
    if len(sizes) > MAX_FILES:
        raise c.fail("sizes", f"at most {MAX_FILES} entries", f"{len(sizes)} entries")
    for name, size in sizes.items():
        c.integer(size, f"sizes[{name!r}]", 0, 1 << 50)
