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

Safety (a bundle is data, never code; DESIGN.md "The bundle"): every path must be relative,
without ``..`` or backslashes, and resolve inside the folder after following symlinks.
ONNX external data: each referenced ``.onnx`` is parsed at load time with ``onnx`` (imported
then, not at module import; tensor data is never loaded); every tensor ``location``
(relative to the graph's folder, as onnxruntime resolves it) must pass the same path check
and be listed in ``files``, hence checksummed; ``write_manifest`` lists such files itself.
sha256 checks are skipped with ``verify=False``; the path and external-data checks never are.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .atomic import atomic_path
from .domains import Domain, get_domain
from .errors import BackendError, BundleError, ConfigError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ORDER = ("schema_version", "galip_version", "preprocess", "domains", "models", "files")


# ----------------------------------------------------------------------------- paths, hashes
def sha256_file(path: Path) -> str:
    """sha256 hex digest of ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _norm(relative: str) -> str:
    return PurePosixPath(relative).as_posix()


def resolve_inside(root: Path, relative: Any, what: str) -> Path:
    """Return ``root / relative`` (symlinks resolved) after checking it stays inside ``root``.

    Refuses non-strings, absolute paths (POSIX or Windows), backslashes, ``..`` components
    and anything whose resolved target (a symlink) lies outside the folder. ``what`` names
    the manifest entry for the error message.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise BundleError(f"{what}: expected a relative file name, found {relative!r}; fix the manifest")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).drive:
        raise BundleError(
            f"{what}: path {relative!r} is absolute; bundle paths must be relative to the bundle folder"
        )
    if "\\" in relative:
        raise BundleError(f"{what}: path {relative!r} contains a backslash; use forward slashes")
    if ".." in PurePosixPath(relative).parts:
        raise BundleError(
            f"{what}: path {relative!r} climbs out of the bundle with '..'; keep every file inside the bundle folder"
        )
    root_real = Path(root).resolve()
    target = (root_real / relative).resolve()
    if not target.is_relative_to(root_real):
        raise BundleError(
            f"{what}: {relative!r} resolves to {target}, outside the bundle folder {root_real} "
            "(a symlink?); copy the file into the bundle instead of linking it"
        )
    return target


def referenced_files(manifest: dict) -> list[tuple[str, str]]:
    """Every ``"file"`` value under ``manifest["models"]`` as ``(file, where)`` pairs, in order.

    ``where`` is the manifest key path (``models.generator.graphs.fp16.file``) for messages.
    """
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "file":
                    found.append((value, f"{where}.file"))
                else:
                    walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    walk(manifest.get("models", {}), "models")
    return found


# ----------------------------------------------------------------------------- ONNX external data
def onnx_external_locations(data: bytes) -> list[str]:
    """``location`` of every tensor a serialized ONNX ``ModelProto`` stores as external data.

    Walks every message field (protobuf reflection), so graphs, subgraphs (If/Loop/Scan),
    functions, training graphs and sparse tensors are all seen; onnx's own
    ``_get_all_tensors`` skips the last two. Raises ``ValueError`` on bytes that are not an
    ONNX model, BackendError when the ``onnx`` package is missing.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError, Message
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    except ImportError as error:
        raise BackendError(f"reading ONNX graphs needs onnx ({error}); install it: pip install 'galip[cpu]'") from None

    def tensors(message):
        if isinstance(message, onnx.TensorProto):
            yield message
            return
        for field, value in message.ListFields():
            if field.message_type is not None:
                for item in [value] if isinstance(value, Message) else value:
                    yield from tensors(item)

    try:
        model = onnx.load_model_from_string(data)
        return [ExternalDataInfo(t).location for t in tensors(model) if uses_external_data(t)]
    except (DecodeError, ValueError) as error:
        raise ValueError(f"not a valid ONNX protobuf ({error})") from None


def _external_files(root: Path, graph: str, where: str) -> list[str]:
    """Normalised bundle-relative names of the external-data files ``graph`` needs."""
    path = resolve_inside(root, graph, where)
    try:
        locations = onnx_external_locations(path.read_bytes())
    except ValueError as error:
        raise BundleError(f"{where}: {graph!r} is {error}; re-export the bundle") from None
    names = []
    for location in locations:
        joined = (PurePosixPath(graph).parent / location).as_posix() if location else ""
        resolve_inside(root, joined, f"{graph} external data location {location!r}")
        names.append(_norm(joined))
    return names


# ----------------------------------------------------------------------------- structure
def _require(condition: bool, where: str, expected: str, found: Any, source: Path) -> None:
    if not condition:
        raise BundleError(f"{source}: {where} should be {expected}, found {found!r}; re-export the bundle")


def _check_structure(manifest: Any, source: Path, *, require_files: bool = True) -> None:
    """Shape checks with messages that name the key; raises BundleError."""
    _require(isinstance(manifest, dict), "the manifest", "a JSON object", type(manifest).__name__, source)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{source}: unknown schema_version {version!r}; this galip reads schema {SCHEMA_VERSION}: "
            "upgrade galip (pip install -U galip) or re-export the bundle with this version"
        )
    pre = manifest.get("preprocess")
    _require(isinstance(pre, dict), "preprocess", "an object", pre, source)
    for key in ("axis", "spacing", "size_multiple", "percentiles"):
        _require(key in pre, f"preprocess.{key}", "present", None, source)
    domains = manifest.get("domains")
    _require(isinstance(domains, dict) and bool(domains), "domains", "a non-empty object", domains, source)
    for name, entry in domains.items():
        _require(isinstance(entry, dict) and {"caption", "class_id", "kind", "suffix"} <= set(entry),
                 f"domains.{name}", "an object with caption, class_id, kind, suffix", entry, source)
    models = manifest.get("models")
    _require(isinstance(models, dict) and bool(models), "models", "a non-empty object", models, source)
    specs = [("generator", models["generator"])] if "generator" in models else []
    if "diffusion" in models:
        _require(isinstance(models["diffusion"], dict), "models.diffusion", "an object per domain",
                 models["diffusion"], source)
        specs += [(f"diffusion.{d}", spec) for d, spec in models["diffusion"].items()]
    for where, spec in specs:
        _require(isinstance(spec, dict) and isinstance(spec.get("graphs"), dict) and bool(spec["graphs"]),
                 f"models.{where}.graphs", "a non-empty object {precision: {file}}", spec, source)
        engines = spec.get("engines", [])
        _require(isinstance(engines, list), f"models.{where}.engines", "a list", engines, source)
        for i, engine in enumerate(engines):
            _require(isinstance(engine, dict) and {"file", "precision", "tensorrt_version",
                                                   "compute_capability"} <= set(engine),
                     f"models.{where}.engines[{i}]",
                     "an object with file, precision, tensorrt_version, compute_capability", engine, source)
    targets = list(models.get("generator", {}).get("domains", [])) + list(models.get("diffusion", {}))
    unknown = [d for d in targets if d not in domains]
    _require(not unknown, "every model domain", f"one of domains ({', '.join(domains)})", unknown, source)
    files = manifest.get("files", {} if not require_files else None)
    _require(isinstance(files, dict), "files", "an object {name: sha256}", files, source)
    for name, digest in files.items():
        _require(isinstance(digest, str) and bool(_SHA256.match(digest)), f"files[{name!r}]",
                 "a 64-digit lowercase sha256 hex string", digest, source)


# ----------------------------------------------------------------------------- the bundle
@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its folder and its parsed manifest (a plain JSON dict)."""

    root: Path
    manifest: dict

    @property
    def schema_version(self) -> int:
        return self.manifest["schema_version"]

    @property
    def galip_version(self) -> str | None:
        return self.manifest.get("galip_version")

    @property
    def preprocess(self) -> dict:
        """``axis`` (int), ``spacing`` (mm), ``size_multiple`` (int), ``percentiles`` ([lo, hi])."""
        return self.manifest["preprocess"]

    @property
    def domains(self) -> dict[str, Domain]:
        """The bundle's domains by name (pass as ``known=`` to :func:`domains.get_domain`)."""
        return {name: Domain(name, e["caption"], e["class_id"], e["kind"], e["suffix"])
                for name, e in self.manifest["domains"].items()}

    @property
    def model_names(self) -> list[str]:
        return list(self.manifest["models"])

    def model(self, name: str, domain: str | None = None) -> dict:
        """The manifest entry of model ``name``; ``diffusion`` needs a ``domain`` (one model each).

        ``domain`` is matched case-insensitively (``t2``, ``T2w``); for the generator it is
        checked against the domains it translates to. Raises ConfigError / BundleError.
        """
        models = self.manifest["models"]
        if name not in models:
            raise BundleError(f"bundle {self.root} has no {name!r} model; it has {', '.join(models)}")
        spec = models[name]
        if name == "diffusion":
            if domain is None:
                raise ConfigError(f"the diffusion model needs a target domain; bundle has {', '.join(spec)}")
            known = {d: v for d, v in self.domains.items() if d in spec}
            return spec[get_domain(domain, known).name]
        if domain is not None and "domains" in spec:
            known = {d: v for d, v in self.domains.items() if d in spec["domains"]}
            get_domain(domain, known)
        return spec

    def path(self, relative: str) -> Path:
        """Absolute path of a bundle file, checked to lie inside the bundle folder."""
        return resolve_inside(self.root, relative, f"bundle file {relative!r}")

    def graph_path(self, name: str, precision: str = "fp32", domain: str | None = None) -> Path:
        """Path of model ``name``'s ONNX graph at ``precision`` (``fp32``, ``fp16``)."""
        graphs = self.model(name, domain)["graphs"]
        if precision not in graphs:
            raise ConfigError(
                f"model {name!r} has no {precision} graph; the bundle has {', '.join(graphs)}"
            )
        return self.path(graphs[precision]["file"])


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
    try:
        manifest = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BundleError(
            f"{source} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            "re-export the bundle"
        ) from None
    except UnicodeDecodeError:
        raise BundleError(f"{source} is not UTF-8 text; re-export the bundle") from None
    return manifest, source


def load_bundle(root: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check ``root/manifest.json``; return a :class:`Bundle`.

    Checks, each failing with a one-line BundleError: folder and manifest exist, JSON
    parses, schema version is known, structure is sane, every path stays inside the
    folder, every referenced file (and ONNX external-data file) is listed in ``files`` and
    exists, and (``verify=True``) every listed file matches its sha256.
    """
    root = Path(root)
    manifest, source = _read_manifest(root)
    _check_structure(manifest, source)
    listed = {_norm(name): name for name in manifest["files"]}
    for name in manifest["files"]:
        path = resolve_inside(root, name, f"files[{name!r}]")
        if not path.is_file():
            raise BundleError(
                f"bundle file {name!r} listed in {source} is missing; copy it back or re-export the bundle"
            )
    bundle = Bundle(root=root, manifest=manifest)
    if verify:   # before parsing any graph, so a tampered one is reported as such
        bad = verify_checksums(bundle)
        if bad:
            raise BundleError(
                f"sha256 mismatch for {', '.join(bad)} in bundle {root}: the file changed after export; "
                "restore it or re-export the bundle"
            )
    for relative, where in referenced_files(manifest):
        resolve_inside(root, relative, where)
        needed = [_norm(relative)]
        if relative.endswith(".onnx") and _norm(relative) in listed:
            needed += _external_files(root, relative, where)
        for name in needed:
            if name not in listed:
                raise BundleError(
                    f"{where}: {name!r} is not listed in the manifest's files, so it cannot be "
                    "checksummed; re-export the bundle (write_manifest lists it)"
                )
    return bundle


def write_manifest(root: str | Path, manifest: dict) -> Path:
    """Write ``root/manifest.json`` atomically, with ``files`` recomputed; return its path.

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
    _check_structure(manifest, root / MANIFEST_NAME, require_files=False)
    names: dict[str, str] = {}
    for relative, where in referenced_files(manifest):
        resolve_inside(root, relative, where)
        names.setdefault(_norm(relative), where)
    for name in list(manifest.get("files", {})):
        names.setdefault(_norm(name), f"files[{name!r}]")
    for name, where in list(names.items()):
        if name.endswith(".onnx") and (root / name).is_file():
            for extra in _external_files(root, name, where):
                names.setdefault(extra, f"{name} external data")
    files = {}
    for name, where in sorted(names.items()):
        if name == MANIFEST_NAME:
            raise BundleError(f"{where}: the manifest cannot list itself; remove {MANIFEST_NAME!r}")
        path = resolve_inside(root, name, where)
        if not path.is_file():
            raise BundleError(f"{where}: {name!r} does not exist in {root}; write it before the manifest")
        files[name] = sha256_file(path)
    manifest["files"] = files
    ordered = {key: manifest[key] for key in _KEY_ORDER if key in manifest}
    ordered.update((key, value) for key, value in manifest.items() if key not in ordered)
    target = root / MANIFEST_NAME
    with atomic_path(target, suffix=".tmp") as tmp:
        tmp.write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")
    return target
