"""One object that holds a checked bundle with its runners activated and translates arrays
or files, so notebooks, other tools and batches pay the start-up once, not per volume::

    from galip.runtime.api import Session
    with Session("T2", bundle="bundle/") as session:        # bundle checked, runners activated
        result = session.translate(data, affine)            # pipeline.Result, the input's grid
        session.translate_file("sub-01_T1w.nii.gz", "out/sub-01_T1w_T2.nii.gz")

How to run is the pipeline's :class:`~galip.runtime.pipeline.Settings`: pass one, or its
fields as keywords (``Session("T2", model="diffusion", steps=20)``); fields the pipeline
gains later flow through unchanged, and so do extra keyword arguments of
:meth:`Session.translate` (passed to ``Translator.translate``). ``galip-run`` (one volume
or a batch), ``galip-bids`` and the Ray actors are thin layers over this object.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import check_name
from .bundle import MANIFEST_NAME, Bundle, load_bundle, sha256_file
from .errors import BundleError, ConfigError, OutputError
from .pipeline import CT_GUESS_BELOW, Result, Settings, Translator, guess_kind, prepare
from .provenance import provenance_record, sidecar_path, write_json
from .volume import Volume, load_volume, save_volume

SHIPPED_BUNDLE = Path(__file__).resolve().parent / "bundles" / "demo"
KINDS = ("auto", "mri", "ct")


def shipped_bundle() -> Bundle:
    """The bundle installed with the package (``galip/runtime/bundles/demo``), checked."""
    if not (SHIPPED_BUNDLE / MANIFEST_NAME).is_file():
        raise BundleError(f"no bundle is shipped with this galip yet (none at {SHIPPED_BUNDLE}); "
                          "export one with galip-export and pass its folder with --bundle DIR")
    return load_bundle(SHIPPED_BUNDLE)


def default_output(source: Path, domain: str) -> Path:
    """``<input stem>_<domain>.nii.gz`` next to the input (``a/x_T1w.nii.gz`` → ``a/x_T1w_T2.nii.gz``)."""
    name = source.name
    for suffix in (".nii.gz", ".nii", ".img", ".hdr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return source.with_name(f"{name}_{domain}.nii.gz")


@dataclass
class Source:
    """A volume read for translation: the data, its source kind and where it came from."""

    path: Path | None
    volume: Volume
    kind: str                     # "mri" or "ct" (guessed when asked for "auto")
    sha256: str | None = None     # of the file as read (None for arrays)
    notes: list[str] = field(default_factory=list)   # one-line warnings for the user
    seconds: float = 0.0          # reading time


class _Held:
    """A runner that is already active: entering returns it, leaving keeps it active (the
    Session deactivates it once, on close), so every volume reuses the same sessions."""

    def __init__(self, runner):
        self.runner = runner

    def __enter__(self):
        return self.runner

    def __exit__(self, *exc) -> None:
        return None


class Session:
    """A bundle, a target and settings, with the runners activated once for many volumes.

    ``bundle``: a folder, a loaded :class:`Bundle`, or None for the shipped bundle.
    ``settings`` and keyword ``fields`` (overriding it) are pipeline Settings. Raises the
    pipeline's ConfigError / BundleError / BackendError before anything heavy runs; the
    runners are activated on :meth:`activate` (or entering ``with``), else on first use.
    """

    def __init__(self, to: str, bundle: str | Path | Bundle | None = None,
                 settings: Settings | None = None, **fields: Any):
        settings = settings if settings is not None else Settings()
        if fields:
            unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Settings)})
            if unknown:
                raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; expected fields of "
                                  f"Settings: {', '.join(f.name for f in dataclasses.fields(Settings))}")
            settings = dataclasses.replace(settings, **fields)
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle) if bundle is not None else shipped_bundle()
        self.bundle = bundle
        self.translator: Translator = prepare(bundle, to, settings)
        self.manifest_sha256 = sha256_file(bundle.root / MANIFEST_NAME)
        self._active: Translator | None = None
        self._stack: contextlib.ExitStack | None = None

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        return self.translator.settings

    @property
    def is_active(self) -> bool:
        return self._active is not None

    def activate(self) -> "Session":
        """Activate every runner of the model once (sessions, engines, buffers)."""
        if self._active is not None:
            return self
        stack = contextlib.ExitStack()
        try:
            held = {}
            for name in ("factory", "lmi_factory"):
                make = getattr(self.translator, name)
                if make is not None:
                    runner = stack.enter_context(make())
                    held[name] = (lambda r=runner: _Held(r))
            self._active = dataclasses.replace(self.translator, **held)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def close(self) -> None:
        """Deactivate the runners; safe to call twice. The session can be activated again."""
        stack, self._stack, self._active = self._stack, None, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> "Session":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- arrays ------------------------------------------------------------------------
    def translate(self, data: np.ndarray, affine: np.ndarray | None = None, kind: str = "auto",
                  **options: Any) -> Result:
        """Translate one volume ``(X, Y, Z)`` in scanner units; returns a pipeline Result whose
        ``data`` has the input's shape and voxel order. ``affine`` defaults to 1 mm identity;
        ``kind`` is ``mri``, ``ct`` or ``auto`` (:func:`~galip.runtime.pipeline.guess_kind`);
        ``options`` (``on_slices``, ``on_step``, ...) go to ``Translator.translate``."""
        data = np.asarray(data, dtype=np.float32)
        if data.ndim != 3:
            raise ConfigError(f"expected a 3-D volume (X, Y, Z), got an array of shape {data.shape}")
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        kind = guess_kind(data) if kind == "auto" else kind
        self.activate()
        return self._active.translate(data, affine, kind, **options)

    # -- files: read → translate → write, the stages a batch runs on separate threads ---
    def read(self, path: str | Path, kind: str = "auto") -> Source:
        """Load ``path`` (never modified), hash it and settle its source kind."""
        started = time.perf_counter()
        path = Path(path)
        volume = load_volume(path)
        notes = []
        if volume.n_nonfinite:
            notes.append(f"warning: {path}: {volume.n_nonfinite} NaN/Inf voxels set to 0")
        if kind == "auto":
            kind = guess_kind(volume.data)
            if kind == "ct":
                notes.append(f"note: reading {path} as CT (voxels below {CT_GUESS_BELOW:g} HU); "
                             "pass --source-kind mri if it is MRI")
        digest = sha256_file(path)
        return Source(path, volume, kind, digest, notes, time.perf_counter() - started)

    def run(self, source: Source, **options: Any) -> Result:
        """Translate a :class:`Source` from :meth:`read`."""
        return self.translate(source.volume.data, source.volume.affine_mm, source.kind, **options)

    def write(self, source: Source, result: Result, out: str | Path, *, overwrite: bool = False,
              extra: dict | None = None, seconds: dict[str, float] | None = None) -> Path:
        """Write the translation to ``out`` and its provenance JSON beside it (both atomic).

        ``extra`` is merged into the JSON (a BIDS sidecar's ``Sources``); ``seconds`` are
        the stage times (read, translate, write) recorded in it.
        """
        started = time.perf_counter()
        out = Path(out)
        translator = self.translator
        save_volume(out, result.data, source.volume.affine, source.volume.header,
                    description=translator.description, overwrite=overwrite)
        seconds = dict(seconds or {"read": source.seconds, "translate": result.seconds})
        seconds["write"] = time.perf_counter() - started
        record = provenance_record(self, source, result, out, seconds)
        write_json(sidecar_path(out), {**(extra or {}), **record})
        return out

    def translate_file(self, source: str | Path, out: str | Path | None = None, *, kind: str = "auto",
                       overwrite: bool = False, extra: dict | None = None) -> Path:
        """Read, translate and write one file (default ``<stem>_<domain>.nii.gz`` beside it).

        The output name is checked before any inference, so a bad ``out`` costs nothing."""
        out = Path(out) if out is not None else default_output(Path(source), self.translator.target.name)
        check_name(out, (".nii.gz", ".nii"), "output")
        if out.exists() and not overwrite:
            raise OutputError(f"{out}: expected a new output file, found an existing one; pass overwrite=True "
                              "or choose another path")
        loaded = self.read(source, kind)
        result = self.run(loaded)
        return self.write(loaded, result, out, overwrite=overwrite, extra=extra)
