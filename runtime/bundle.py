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
canonical (no ``..``, ``.``, empty parts, trailing ``/`` or backslashes) and resolve inside
the folder after following symlinks. The manifest is size- and depth-capped before it is
parsed and checked field by field (:mod:`galip.runtime.manifest_schema`). ONNX external
data: every graph the models reference (known by its place, ``graphs`` or ``lmi_graph``,
never by its file name, so ``g.ONNX`` is parsed like ``g.onnx``) is parsed at load time
with ``onnx`` (imported then, not at module import; tensor data is never loaded); every
tensor ``location`` (relative to the graph's folder, as onnxruntime resolves it) must pass
the same path check and be a listed file, hence checksummed. "Listed" compares the files
themselves (device and inode), so no spelling, case or link of a name gets around it;
``write_manifest`` lists such files itself. sha256 checks are skipped with
``verify=False``; the path and external-data checks never are.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .atomic import atomic_path
from .domains import Domain, get_domain
from .errors import BackendError, BundleError, ConfigError
from .manifest_schema import MAX_MANIFEST_BYTES, SCHEMA_VERSION, parse_manifest, validate_manifest

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_KEY_ORDER = ("schema_version", "galip_version", "preprocess", "domains", "models", "files")


# ----------------------------------------------------------------------------- paths, hashes
def sha256_file(path: Path) -> str:
    """sha256 hex digest of ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode): the file itself, whatever name, case or link reaches it."""
    info = path.stat()
    return info.st_dev, info.st_ino


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
    if any(part in ("", ".") for part in relative.split("/")):   # one spelling per file: no name tricks
        raise BundleError(f"{what}: path {relative!r} is not canonical (empty or '.' parts, or a trailing '/'); "
                          f"write it as {PurePosixPath(relative).as_posix()!r}")
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


def _external_files(root: Path, graph: str, where: str) -> list[tuple[str, Path]]:
    """``(bundle-relative name, resolved path)`` of every external-data file ``graph`` needs."""
    path = resolve_inside(root, graph, where)
    try:
        locations = onnx_external_locations(path.read_bytes())
    except ValueError as error:
        raise BundleError(f"{where}: {graph!r} is {error}; re-export the bundle") from None
    found = []
    for location in locations:
        # onnxruntime resolves a location against the graph's folder; so do we.
        joined = (PurePosixPath(graph).parent / location).as_posix() if location else ""
        found.append((joined, resolve_inside(root, joined, f"{graph} external data location {location!r}")))
    return found


def _is_graph(where: str) -> bool:
    """ONNX graphs are known by their place in the manifest, never by their file name."""
    return ".engines[" not in where


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
    with open(source, "rb") as handle:    # capped: a huge manifest is refused, not read whole
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    manifest = parse_manifest(raw, source)
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
    validate_manifest(manifest, source)
    listed = {}
    for name in manifest["files"]:
        path = resolve_inside(root, name, f"files[{name!r}]")
        if not path.is_file():
            raise BundleError(
                f"bundle file {name!r} listed in {source} is missing; copy it back or re-export the bundle"
            )
        listed[_identity(path)] = name
    bundle = Bundle(root=root, manifest=manifest)
    if verify:   # before parsing any graph, so a tampered one is reported as such
        bad = verify_checksums(bundle)
        if bad:
            raise BundleError(
                f"sha256 mismatch for {', '.join(bad)} in bundle {root}: the file changed after export; "
                "restore it or re-export the bundle"
            )

    def require_listed(name: str, path: Path, where: str) -> None:
        if not path.is_file() or _identity(path) not in listed:
            raise BundleError(
                f"{where}: {name!r} is not listed in the manifest's files, so it cannot be "
                "checksummed; re-export the bundle (write_manifest lists it)"
            )

    for relative, where in referenced_files(manifest):
        require_listed(relative, resolve_inside(root, relative, where), where)
        if _is_graph(where):   # parsed only once listed, hence checksummed
            for name, path in _external_files(root, relative, where):
                require_listed(name, path, where)
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
    validate_manifest(manifest, root / MANIFEST_NAME, require_files=False)
    names: dict[str, str] = {}
    for relative, where in referenced_files(manifest):
        resolve_inside(root, relative, where)
        names.setdefault(relative, where)
    for name in list(manifest.get("files", {})):
        resolve_inside(root, name, f"files[{name!r}]")
        names.setdefault(name, f"files[{name!r}]")
    for name, where in list(names.items()):
        if (_is_graph(where) and not where.startswith("files[")) or name.lower().endswith(".onnx"):
            if resolve_inside(root, name, where).is_file():
                for extra, _ in _external_files(root, name, where):
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
