"""Training slices from ``galip-data`` output, preprocessed exactly as the runtime does.

The chain is the runtime's own (:mod:`galip.runtime.preprocess`): load → canonical →
slices along ``axis`` → resample in-plane to ``spacing`` → normalise (clipped to [0, 1])
→ pad to a multiple of 32; training then centre-crops/pads to ``size`` × ``size`` for
fixed-size batches. What a model saw in training is therefore what ``galip-run`` feeds it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from galip.runtime.bias import flatten
from galip.runtime.domains import Domain
from galip.runtime.errors import ConfigError
from galip.runtime.preprocess import PreprocessConfig, plan_volume
from galip.runtime.volume import load_volume


def preprocess_config(size: int, *, axis: int = 2, spacing: float | None = None,
                      percentiles: tuple[float, float] = (0.5, 99.5),
                      min_foreground: float = 0.05, bias_field: str = "none") -> dict:
    """The preprocessing settings stored in checkpoints and, later, the bundle manifest:
    the runtime's :class:`PreprocessConfig` plus the training crop size and slice filter."""
    config = PreprocessConfig(axis=axis, spacing=spacing, percentiles=tuple(percentiles), bias_field=bias_field)
    return {**config.to_dict(), "size": int(size), "min_foreground": float(min_foreground)}


def read_index(data_dir: str | Path) -> dict:
    """Read ``index.json`` of a ``galip-data`` folder (one-line error if it is not one)."""
    index_path = Path(data_dir) / "index.json"
    if not index_path.is_file():
        raise ConfigError(f"{data_dir} has no index.json; expected a folder written by galip-data")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{index_path} is not valid JSON ({error.msg}); rewrite it with galip-data") from None
    if not index.get("subjects"):
        raise ConfigError(f"{index_path} lists no subjects; run galip-data with --subjects 1 or more")
    return index


def subject_file(data_dir: str | Path, subject: dict, domain: Domain) -> Path:
    """Path of ``domain``'s volume for one ``index.json`` subject entry."""
    files = subject.get("files", {})
    name = files.get(domain.suffix) or files.get(domain.name)
    if name is None:
        raise ConfigError(f"subject {subject.get('id')} has no {domain.suffix} volume; "
                          f"available: {', '.join(sorted(files)) or 'none'}")
    return Path(data_dir) / name


def split_unpaired(subjects: Sequence[dict], domains: Sequence[Domain]) -> dict[str, list[dict]]:
    """Give each domain different subjects (round robin), so training is truly unpaired.

    With fewer subjects than domains every domain gets every subject (a warning-worthy
    but usable set-up for smoke tests).
    """
    if len(subjects) < len(domains):
        return {d.name: list(subjects) for d in domains}
    return {d.name: list(subjects[i::len(domains)]) for i, d in enumerate(domains)}


def volume_slices(path: str | Path, domain: Domain, config: dict,
                  axes: Sequence[int] | None = None) -> np.ndarray:
    """Slices of one volume with enough foreground: (n, size, size) float32 in [0, 1].

    ``axes``: the slicing axes to take slices along (default: the config's one axis);
    each is prepared exactly as the runtime prepares a volume sliced along it.
    ``config["min_foreground"]`` 0 keeps every slice, the empty ones above the head
    included, at the rate a volume has them (so a model learns that empty stays empty).
    ``config["bias_field"]`` "n4": the volume's coil field is divided out first, as the
    runtime does (galip.runtime.bias).
    """
    volume = load_volume(path)
    data, _ = flatten(volume.data, volume.affine_mm, domain.kind, config.get("bias_field", "none"),
                      config["percentiles"])
    stack = prepared_slices(data, volume.affine_mm, domain.kind, config, axes)
    return np.ascontiguousarray(stack[kept_slices(stack, config)], dtype=np.float32)


def prepared_slices(data: np.ndarray, affine_mm: np.ndarray, kind: str, config: dict,
                    axes: Sequence[int] | None = None) -> np.ndarray:
    """Every slice of one volume along each of ``axes`` (default: the config's axis), as
    the runtime prepares it and centre-fitted to ``config["size"]``: (n, size, size).
    ``data`` is already bias-free where the config asks for that (:func:`volume_slices`)."""
    stacks = []
    for axis in axes if axes is not None else [config["axis"]]:
        plan, raw = plan_volume(data, affine_mm, kind, PreprocessConfig.from_dict({**config, "axis": axis}))
        stacks.append(centre_fit(plan.prepare(raw), config["size"]))
    return np.concatenate(stacks)


def kept_slices(stack: np.ndarray, config: dict) -> np.ndarray:
    """Boolean row filter: slices whose foreground share (> 0.05) reaches ``min_foreground``."""
    return (stack > 0.05).mean(axis=(1, 2)) >= config["min_foreground"]


def load_training_slices(data_dir: str | Path, domains: Sequence[Domain], size: int, *,
                         axis: int = 2, spacing: float | None = None,
                         split: str = "unpaired", min_foreground: float = 0.05,
                         axes: Sequence[int] | None = None, bias_field: str = "none") -> dict[str, np.ndarray]:
    """Slices per domain name, ``(n, size, size)`` float32 in [0, 1].

    ``split="unpaired"`` gives each domain different subjects; ``"all"`` uses every
    subject for every domain (diffusion trains on one domain, so it wants all of them).
    ``min_foreground``: drop slices with less foreground than this (0 keeps all);
    ``axes``: slice along each of these axes (default: ``axis`` only); ``bias_field``:
    "n4" trains on bias-free slices (galip.runtime.bias).
    """
    index = read_index(data_dir)
    config = preprocess_config(size, axis=axis, spacing=spacing, min_foreground=min_foreground,
                               bias_field=bias_field)
    if split == "unpaired":
        assignment = split_unpaired(index["subjects"], domains)
    elif split == "all":
        assignment = {d.name: list(index["subjects"]) for d in domains}
    else:
        raise ValueError(f"split must be 'unpaired' or 'all', got {split!r}")
    slices = {}
    for domain in domains:
        stacks = [volume_slices(subject_file(data_dir, s, domain), domain, config, axes)
                  for s in assignment[domain.name]]
        stack = np.concatenate(stacks) if stacks else np.zeros((0, size, size), np.float32)
        if len(stack) == 0:
            raise ConfigError(f"no usable {domain.name} slices in {data_dir}; "
                              "check the volumes hold brain signal")
        slices[domain.name] = stack
    return slices


class SliceSampler:
    """Random batches per domain, reproducible from ``seed`` and resumable.

    Each domain has its own numpy Generator, so drawing for one domain does not shift
    another's sequence; ``state_dict`` stores the generators' states as plain data.
    ``crop`` > 0 cuts a random ``crop`` x ``crop`` window from each drawn slice (a
    fully convolutional generator trains on windows at a fraction of a slice's cost);
    ``on_foreground`` centres it on a random foreground pixel (> 0.05) of the slice when
    it has one, so windows of a slice with anatomy show anatomy (a discriminator learns
    nothing from air against air) while empty slices still come at their natural rate.
    A stack may also be ``(n, channels, H, W)``: every channel is cut at the same window
    (diffusion keeps a cached condition map beside each slice) and channel 0 is the image
    whose foreground steers the window.
    """

    def __init__(self, slices_by_domain: dict[str, np.ndarray], batch: int, seed: int, crop: int = 0,
                 on_foreground: bool = False):
        if batch < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch}")
        size = min(s.shape[-1] for s in slices_by_domain.values())
        if crop < 0 or crop > size:
            raise ConfigError(f"crop must be between 0 (whole slices) and the slice size {size}, got {crop}")
        self.slices = slices_by_domain
        self.batch, self.crop, self.on_foreground = batch, crop, on_foreground
        seeds = np.random.SeedSequence(seed).spawn(len(slices_by_domain))
        self._rngs = {name: np.random.default_rng(s) for name, s in zip(sorted(slices_by_domain), seeds)}

    def sample(self, domain: str) -> np.ndarray:
        """A batch ``(batch, channels, size, size)`` (or ``crop``-sized) float32 drawn with
        replacement; ``channels`` is 1 for an ``(n, H, W)`` stack."""
        stack, rng = self.slices[domain], self._rngs[domain]
        if stack.ndim == 3:
            stack = stack[:, None]
        rows = rng.integers(0, len(stack), size=self.batch)
        if not self.crop:
            return stack[rows]
        h, w = stack.shape[-2:]
        ys = rng.integers(0, h - self.crop + 1, size=self.batch)
        xs = rng.integers(0, w - self.crop + 1, size=self.batch)
        if self.on_foreground:
            for i, r in enumerate(rows):
                inside = np.argwhere(stack[r, 0] > 0.05)
                if len(inside):
                    cy, cx = inside[rng.integers(len(inside))]
                    ys[i] = np.clip(cy - self.crop // 2, 0, h - self.crop)
                    xs[i] = np.clip(cx - self.crop // 2, 0, w - self.crop)
        return np.stack([stack[r, :, y:y + self.crop, x:x + self.crop] for r, y, x in zip(rows, ys, xs)])

    def state_dict(self) -> dict:
        return {name: json.dumps(rng.bit_generator.state) for name, rng in self._rngs.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, encoded in state.items():
            self._rngs[name].bit_generator.state = json.loads(encoded)


def centre_fit(stack: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or zero-pad the last two axes of ``stack`` to ``size`` × ``size``."""
    out = np.zeros((stack.shape[0], size, size), dtype=stack.dtype)
    src, dst = [], []
    for n in stack.shape[1:]:
        if n >= size:
            start = (n - size) // 2
            src.append(slice(start, start + size)); dst.append(slice(0, size))
        else:
            start = (size - n) // 2
            src.append(slice(0, n)); dst.append(slice(start, start + n))
    out[:, dst[0], dst[1]] = stack[:, src[0], src[1]]
    return out
