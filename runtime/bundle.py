"""The bundle: one folder holding ``manifest.json`` and the graphs and engines it lists.

``galip-export`` writes it with :func:`write_manifest`; ``galip-run`` reads it with
:func:`load_bundle`. JSON + hashlib, and onnx to read graphs' external-data tensors: no torch,
nothing unpickled.

Manifest, schema version 1 (``...`` = same shape as the entry before)::

    {"schema_version": 1, "galip_version": "0.1.0",
     "preprocess": {"axis": 2, "spacing": 2.0, "size_multiple": 32, "percentiles": [0.5, 99.5]},
     "domains": {"T2": {"caption": "this MRI is T2-weighted", "class_id": 1, "kind": "mri", "suffix": "T2w"}},
     "models": {
       "generator": {"domains": ["T1", "T2", "PD"],
                     "graphs": {"fp32": {"file": "generator.onnx"}, "fp16": {"file": "generator_fp16.onnx"}},
                     "engines": [{"file": "generator_fp16.engine", "precision": "fp16",
                                  "tensorrt_version": "10.13.0.35", "compute_capability": "9.0",
                                  "profiles": {"image": {"min": [1,1,32,32], "opt": [...], "max": [...]}}}],
                     "io": {"inputs": {"image": "float32[N,1,H,W]", "domain": "int64[N]"},
                            "outputs": {"translated": "float32[N,1,H,W]"}}},
       "diffusion": {"T2": {"graphs": ..., "lmi_graph": {"file": "lmi.onnx"}, "engines": ...,
                            "schedule": {...}, "lmi": {...}, "sampler": {...}}}},
     "files": {"generator.onnx": "<sha256 hex>", ...}}

Every ``"file"`` value under ``models`` must be listed in ``files``; ``files`` may list more
(ONNX external data, extra data). Engines may add ``"version_compatible": true`` and
``"hardware_compatibility": "ampere+"`` (see :mod:`galip.runtime.backends.select`).

Safety (a bundle is data, never code; docs/design.md "The bundle"): every path must be
relative, canonical (no ``..``, ``.``, empty parts, trailing ``/`` or backslashes) and resolve
inside the folder after following symlinks. The manifest is size- and depth-capped before it
is parsed and checked field by field (:mod:`galip.runtime.manifest_schema`).

Parse once, verify when opened: :func:`load_bundle` reads the manifest, checks paths, that
every referenced file is listed and present with its recorded size, and parses the model
entries into typed :mod:`galip.runtime.contract` entries; it opens no graph. A loader reads a
file through :meth:`Bundle.read` / :meth:`Bundle.graph_source`, which check its sha256 first
(skipped with ``verify=False``), still before any inference. ONNX external data:
``write_manifest`` parses every graph (known by its place, ``graphs`` or ``lmi_graph``,
never by its file name) and records the files its tensors name under the graph's
``external_data``; those must be listed files too. When a graph is opened, a byte scan for
the protobuf key ``location`` (which every external-data entry holds verbatim) tells whether
it stores any; only then is it parsed with ``onnx`` and every location (relative to the
graph's folder, as onnxruntime resolves it) checked to be a listed file inside the bundle
and verified. "Listed" compares the files themselves (device and inode), so no spelling,
case or link of a name gets around it. The path and external-data checks are never skipped.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .bundle_files import (EXTERNAL_KEY, external_files, identity, onnx_external_locations,  # noqa: F401
                           resolve_inside, sha256_file)
from .contract import DiffusionEntry, GeneratorEntry, GraphFile, ModelEntry
from .domains import Domain, get_domain
from .errors import BundleError, ConfigError
from .manifest_schema import MAX_MANIFEST_BYTES, SCHEMA_VERSION, parse_manifest, validate_manifest

MANIFEST_NAME = "manifest.json"
_KEY_ORDER = ("schema_version", "galip_version", "preprocess", "domains", "models", "files", "sizes")


def referenced_files(manifest: dict) -> list[tuple[str, str]]:
    """Every ``"file"`` value under ``manifest["models"]`` and every recorded external-data
    file as ``(file, where)`` pairs, in order.

    ``where`` is the manifest key path (``models.generator.graphs.fp16.file``) for messages.
    """
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "file":
                    found.append((value, f"{where}.file"))
                elif key == "external_data" and isinstance(value, list):
                    found.extend((name, f"{where}.external_data[{i}]") for i, name in enumerate(value))
                else:
                    walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    walk(manifest.get("models", {}), "models")
    return found


def _graph_entries(manifest: dict) -> list[tuple[dict, str]]:
    """``(entry, where)`` of every graph entry (``{"file": ...}`` under ``graphs``/``lmi_graph``)."""
    entries = []
    models = manifest.get("models", {})
    specs = [("models.generator", models["generator"])] if "generator" in models else []
    specs += [(f"models.diffusion.{t}", spec) for t, spec in models.get("diffusion", {}).items()]
    for where, spec in specs:
        entries += [(entry, f"{where}.graphs.{p}") for p, entry in spec.get("graphs", {}).items()]
        if "lmi_graph" in spec:
            entries.append((spec["lmi_graph"], f"{where}.lmi_graph"))
    return entries




# ----------------------------------------------------------------------------- the bundle
@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its folder, its manifest (a plain JSON dict) and the typed model entries.

    ``verify``: check a file's sha256 when it is opened (:meth:`read`, :meth:`graph_source`).
    """

    root: Path
    manifest: dict
    generator: GeneratorEntry | None = None
    diffusion: dict[str, DiffusionEntry] = field(default_factory=dict)
    verify: bool = True
    _verified: set = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def parsed(cls, root: Path, manifest: dict, verify: bool = True) -> "Bundle":
        """A bundle over an already checked manifest, its model entries parsed into types."""
        models = manifest["models"]
        generator = GeneratorEntry.from_manifest(models["generator"]) if "generator" in models else None
        diffusion = {t: DiffusionEntry.from_manifest(spec) for t, spec in models.get("diffusion", {}).items()}
        return cls(root, manifest, generator, diffusion, verify)

    @property
    def schema_version(self) -> int:
        return self.manifest["schema_version"]

    @property
    def galip_version(self) -> str | None:
        return self.manifest.get("galip_version")

    @property
    def preprocess(self) -> dict:
        """``axis`` (int), ``spacing`` (mm), ``size_multiple`` (int), ``percentiles`` ([lo, hi]),
        ``bias_field`` ("none"/"n4", absent in older bundles: none)."""
        return self.manifest["preprocess"]

    @property
    def domains(self) -> dict[str, Domain]:
        """The bundle's domains by name (pass as ``known=`` to :func:`domains.get_domain`)."""
        return {name: Domain(name, e["caption"], e["class_id"], e["kind"], e["suffix"])
                for name, e in self.manifest["domains"].items()}

    @property
    def model_names(self) -> list[str]:
        return list(self.manifest["models"])

    def model(self, name: str, domain: str | None = None) -> ModelEntry:
        """The typed entry of model ``name``; ``diffusion`` needs a ``domain`` (one model each).

        ``domain`` is matched case-insensitively (``t2``, ``T2w``); for the generator it is
        checked against the domains it translates to. Raises ConfigError / BundleError.
        """
        if name not in self.manifest["models"]:
            raise BundleError(f"bundle {self.root} has no {name!r} model; it has {', '.join(self.model_names)}")
        if name == "diffusion":
            if domain is None:
                raise ConfigError(f"the diffusion model needs a target domain; bundle has {', '.join(self.diffusion)}")
            known = {d: v for d, v in self.domains.items() if d in self.diffusion}
            return self.diffusion[get_domain(domain, known).name]
        if domain is not None and self.generator.domains is not None:
            get_domain(domain, {d: v for d, v in self.domains.items() if d in self.generator.domains})
        return self.generator

    def path(self, relative: str) -> Path:
        """Absolute path of a bundle file, checked to lie inside the bundle folder."""
        return resolve_inside(self.root, relative, f"bundle file {relative!r}")

    def graph_path(self, name: str, precision: str = "fp32", domain: str | None = None) -> Path:
        """Path of model ``name``'s ONNX graph at ``precision`` (``fp32``, ``fp16``)."""
        graphs = self.model(name, domain).graphs
        if precision not in graphs:
            raise ConfigError(
                f"model {name!r} has no {precision} graph; the bundle has {', '.join(graphs)}"
            )
        return self.path(graphs[precision].file)

    # -- opening files: checksums are verified here, once per file ---------------------------
    def _check(self, name: str, data: bytes | None = None) -> None:
        if not self.verify or name in self._verified:
            return
        path = self.path(name)
        digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
        if digest != self.manifest["files"].get(name):
            raise BundleError(f"sha256 mismatch for {name} in bundle {self.root}: the file changed after export; "
                              "restore it or re-export the bundle")
        self._verified.add(name)

    def read(self, name: str) -> bytes:
        """The bytes of listed file ``name`` (an engine, a graph), its sha256 checked first."""
        data = self.path(name).read_bytes()
        self._check(name, data)
        return data

    def graph_source(self, graph: GraphFile | str) -> bytes | Path:
        """What a loader opens for ``graph``: its verified bytes, or its path when it stores
        tensors as external data (onnxruntime finds those next to the file), after checking
        that every location is a listed file inside the bundle and verifying it."""
        entry = graph if isinstance(graph, GraphFile) else GraphFile(graph)
        data = self.read(entry.file)
        if EXTERNAL_KEY not in data:     # no external-data entry: nothing to parse
            return data
        listed = {identity(self.path(name)): name for name in self.manifest["files"]}
        for name, path in external_files(self.root, entry.file, f"graph {entry.file!r}", data):
            if identity(path) not in listed:
                raise BundleError(f"graph {entry.file!r}: external data {name!r} is not listed in the manifest's "
                                  "files, so it cannot be checksummed; re-export the bundle (write_manifest lists it)")
            self._check(listed[identity(path)])
        return self.path(entry.file)


def verify_checksums(bundle: Bundle) -> list[str]:
    """Names of listed files whose sha256 differs from the manifest (or that are missing)."""
    bad = []
    for name, expected in bundle.manifest.get("files", {}).items():
        path = resolve_inside(bundle.root, name, f"files[{name!r}]")
        if not path.is_file() or sha256_file(path) != expected:
            bad.append(name)
    return sorted(bad)


def _read_manifest(root: Path) -> tuple[dict, Path]:
    if not root.exists():
        raise BundleError(f"bundle folder {root} does not exist; pass the folder galip-export wrote")
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a folder; pass the folder that holds {MANIFEST_NAME}")
    source = root / MANIFEST_NAME
    if not source.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}; it is not a galip bundle (re-run galip-export)")
    with open(source, "rb") as handle:    # capped: a huge manifest is refused, not read whole
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    manifest = parse_manifest(raw, source)
    return manifest, source


def load_bundle(root: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check ``root/manifest.json``; return a :class:`Bundle` with typed entries.

    Checks, each failing with a one-line BundleError: folder and manifest exist, JSON
    parses, schema version is known, every field the runtime reads has its type and range,
    every path stays inside the folder, every referenced file (graphs, engines, recorded
    external data) is listed in ``files``, and every listed file exists with its recorded
    size. Opens no graph; sha256 is checked when a file is opened (``verify=False``: never).
    """
    root = Path(root)
    manifest, source = _read_manifest(root)
    validate_manifest(manifest, source)
    sizes = manifest.get("sizes", {})
    listed = {}
    for name in manifest["files"]:
        path = resolve_inside(root, name, f"files[{name!r}]")
        if not path.is_file():
            raise BundleError(
                f"bundle file {name!r} listed in {source} is missing; copy it back or re-export the bundle"
            )
        info = path.stat()
        if name in sizes and info.st_size != sizes[name]:
            raise BundleError(f"bundle file {name!r} has {info.st_size:,} bytes, the manifest says {sizes[name]:,}: "
                              "the file changed after export; restore it or re-export the bundle")
        listed[(info.st_dev, info.st_ino)] = name
    for relative, where in referenced_files(manifest):
        path = resolve_inside(root, relative, where)
        if not path.is_file() or identity(path) not in listed:
            raise BundleError(
                f"{where}: {relative!r} is not listed in the manifest's files, so it cannot be "
                "checksummed; re-export the bundle (write_manifest lists it)"
            )
    return Bundle.parsed(root, manifest, verify)


def write_manifest(root: str | Path, manifest: dict) -> Path:
    """Write ``root/manifest.json`` atomically, with ``files`` and ``sizes`` recomputed and each
    graph's ``external_data`` recorded; return its path.

    Hashes every file the models reference, every ONNX external-data file those graphs
    need, and any name already in ``manifest["files"]``. Fills ``schema_version`` and
    ``galip_version`` when absent. Raises BundleError on a path outside ``root`` or a
    missing file. The input dict is not modified.
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist; create it and write the graphs first")
    manifest = copy.deepcopy(manifest)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    if "galip_version" not in manifest:
        from galip import __version__
        manifest["galip_version"] = __version__
    validate_manifest(manifest, root / MANIFEST_NAME, require_files=False)
    for entry, _ in _graph_entries(manifest):
        entry.pop("external_data", None)          # recomputed below from the graph itself
    names: dict[str, str] = {}
    for relative, where in referenced_files(manifest):
        resolve_inside(root, relative, where)
        names.setdefault(relative, where)
    for name in list(manifest.get("files", {})):
        resolve_inside(root, name, f"files[{name!r}]")
        names.setdefault(name, f"files[{name!r}]")
    for entry, where in _graph_entries(manifest):
        if resolve_inside(root, entry["file"], where).is_file():
            extra = sorted({name for name, _ in external_files(root, entry["file"], where)})
            entry.update({"external_data": extra} if extra else {})
            names.update((name, f"{entry['file']} external data") for name in extra if name not in names)
    for name, where in list(names.items()):     # other listed graphs (by name) may hold external data
        if where.startswith("files[") and name.lower().endswith(".onnx") and resolve_inside(root, name, where).is_file():
            for extra, _ in external_files(root, name, where):
                names.setdefault(extra, f"{name} external data")
    files, sizes = {}, {}
    for name, where in sorted(names.items()):
        if name == MANIFEST_NAME:
            raise BundleError(f"{where}: the manifest cannot list itself; remove {MANIFEST_NAME!r}")
        path = resolve_inside(root, name, where)
        if not path.is_file():
            raise BundleError(f"{where}: {name!r} does not exist in {root}; write it before the manifest")
        files[name], sizes[name] = sha256_file(path), path.stat().st_size
    manifest["files"], manifest["sizes"] = files, sizes
    ordered = {key: manifest[key] for key in _KEY_ORDER if key in manifest}
    ordered.update((key, value) for key, value in manifest.items() if key not in ordered)
    target = root / MANIFEST_NAME
    with atomic_path(target, suffix=".tmp") as tmp:
        tmp.write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")
    return target
