"""``--run-option key=value``: pass any runtime option through to the Python pipeline.

The keys are read from the runtime itself, so options it gains later (``mask``, ``planes``,
``tta``) can be compared without changing the harness: a key is a field of
:class:`galip.runtime.pipeline.Settings`, a keyword of :func:`~galip.runtime.pipeline.prepare`
or a keyword of :meth:`Translator.translate <galip.runtime.pipeline.Translator.translate>`.
Values are converted to the annotated type (``int``, ``float``, ``bool``, ``str``, ``Path``,
a ``Literal`` choice; ``none`` for an optional one).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from galip.runtime import pipeline
from galip.runtime.errors import ConfigError

_NOT_OPTIONS = {"bundle", "to", "settings", "self", "data", "affine", "kind", "on_slices", "on_step"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass
class RunOptions:
    """Options split by where they go: Settings fields, prepare() and translate() keywords."""

    settings: dict = field(default_factory=dict)
    prepare: dict = field(default_factory=dict)
    translate: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: {n: str(v) if isinstance(v, Path) else v for n, v in d.items()}
                for k, d in dataclasses.asdict(self).items() if d}


def _targets() -> dict[str, dict[str, object]]:
    """Where options may go -> {name: annotated type}."""
    settings = typing.get_type_hints(pipeline.Settings)
    found = {"settings": {f.name: settings[f.name] for f in dataclasses.fields(pipeline.Settings)}}
    for where, function in (("prepare", pipeline.prepare), ("translate", pipeline.Translator.translate)):
        hints = typing.get_type_hints(function)
        found[where] = {name: hints.get(name, str) for name in inspect.signature(function).parameters
                        if name not in _NOT_OPTIONS}
    return found


def _convert(key: str, text: str, kind) -> object:
    """``text`` as a value of the annotated type ``kind`` (ConfigError naming ``key``)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(key, text, arg)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[-1] if errors else f"--run-option {key}: cannot read {text!r}")
    if origin is typing.Literal:
        if text not in args:
            raise ConfigError(f"--run-option {key} must be one of {', '.join(map(str, args))}, got {text!r}")
        return text
    if kind is bool:
        if text.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"--run-option {key} must be true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"--run-option {key} must be {'an integer' if kind is int else 'a number'}, "
                              f"got {text!r}") from None
    if kind is Path:
        return Path(text)
    return text


def parse_run_options(pairs: list[str] | tuple[str, ...]) -> RunOptions:
    """``["threads=1", "mask=auto"]`` -> :class:`RunOptions`; ConfigError for a malformed pair
    or an option the runtime does not have (listing those it has)."""
    targets = _targets()
    options = RunOptions()
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--run-option expects key=value (e.g. threads=1), got {pair!r}")
        where = next((w for w, names in targets.items() if key in names), None)
        if where is None:
            known = sorted({n for names in targets.values() for n in names})
            raise ConfigError(f"--run-option {key!r} is not an option of this runtime; it has {', '.join(known)}")
        getattr(options, where)[key] = _convert(key, text.strip(), targets[where][key])
    pipeline.Settings(**options.settings).check()     # the runtime's own range checks, now
    return options
