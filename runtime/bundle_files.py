"""Bundle files as paths and bytes: the inside-the-folder check, identity, sha256, and the
ONNX external-data locations a graph names (see :mod:`galip.runtime.bundle`)."""
from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import BackendError, BundleError

_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- paths, hashes
def sha256_file(path: Path) -> str:
    """sha256 hex digest of ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def identity(path: Path) -> tuple[int, int]:
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
        for descriptor, value in message.ListFields():
            if descriptor.message_type is not None:
                for item in [value] if isinstance(value, Message) else value:
                    yield from tensors(item)

    try:
        model = onnx.load_model_from_string(data)
        return [ExternalDataInfo(t).location for t in tensors(model) if uses_external_data(t)]
    except (DecodeError, ValueError) as error:
        raise ValueError(f"not a valid ONNX protobuf ({error})") from None


def external_files(root: Path, graph: str, where: str, data: bytes | None = None) -> list[tuple[str, Path]]:
    """``(bundle-relative name, resolved path)`` of every external-data file ``graph`` (whose
    bytes are ``data`` when given) needs."""
    path = resolve_inside(root, graph, where)
    data = path.read_bytes() if data is None else data
    try:
        locations = onnx_external_locations(data)
    except ValueError as error:
        raise BundleError(f"{where}: {graph!r} is {error}; re-export the bundle") from None
    found = []
    for location in locations:
        # onnxruntime resolves a location against the graph's folder; so do we.
        joined = (PurePosixPath(graph).parent / location).as_posix() if location else ""
        found.append((joined, resolve_inside(root, joined, f"{graph} external data location {location!r}")))
    return found


#: Every ONNX external-data entry holds this key verbatim; a graph without it stores none.
EXTERNAL_KEY = b"location"
