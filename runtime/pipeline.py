"""Volume → model slices → batched inference → volume, for the generator and the diffusion model.

numpy only around the backends (never torch). The chain, per batch of ``batch`` slices::

    flatten (bias_field "n4": source / its coil field, bias.py)   once per volume
    plan_volume (bundle's PreprocessConfig, source kind)      once per volume
    SlicePlan.prepare       raw canonical slices → model space [0, 1]
    generator:  translated = G(image, domain class id)
    diffusion:  lmi_source = LMI(source, source) (lmi.onnx), x_T ~ N(0, I), then the step
                graph once per row of the step table, x_prev fed back as x_t and
                x0_pred as x0_last (schedule.py: one linear update for every sampler);
                x_0 mapped from the model's data range to [0, 1]. Where each LMI
                runs (the lmi engine, the native CPU kernel, the graph) is
                select.py's policy (select_backend, select_lmi)
    clip to [0, 1] → SlicePlan.restore (CT window for CT targets; MRI targets: the model's
    0 → 0, 1 → the source's robust range) → written into the output slice stack;
    slices_to_volume at the end. ``planes=3`` repeats this along all three axes and
    ``tta="flip"`` on the left-right mirrored volume; the passes are averaged. Last,
    voxels outside the source's foreground (runtime/foreground.py, or the user's mask)
    are set to the target's background, after an MRI output got the source's bias field back.

Whole-volume arrays: the input, the raw canonical slice stack from ``plan_volume``, the
output slice stack (filled batch by batch) and the output volume; every model-space array
(padded, resampled, model input and output, diffusion state and noise) is one batch.
Diffusion noise is one stream seeded with ``seed`` that every slice of the volume shares
(schedule.SliceNoise, which the eager PyTorch sampler uses too): neighbouring slices come
out alike (no through-plane stripes), and a slice's translation does not depend on ``batch``.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .backends.base import Runner, RunnerFactory
from .backends.select import Choice, select_backend, select_lmi
from .bias import flatten
from .bundle import Bundle
from .contract import (DEFAULT_ETA, DEFAULT_STEPS, GEN_DOMAIN, GEN_IMAGE, GEN_OUTPUT, LMI_OUT, LMI_X, LMI_Y,
                       DiffusionEntry, ModelEntry)
from .domains import Domain, get_domain
from .errors import BackendError, BundleError, ConfigError, GalipError
from .foreground import head_mask
from .intensity import CT_WINDOW, IntensityMap, fit_intensity
from .limits import affordable_batch
from .geometry import canonical_slices, voxel_axis
from .preprocess import PreprocessConfig, SlicePlan, plan_volume, slices_to_volume
from .sampling import Progress, _no_progress, run_sampler
from .schedule import SPACINGS, SliceNoise, StepTable, step_table
from .settings import MASKS, MODELS, PLANES, TTAS, Model, Settings  # noqa: F401  (re-exported)

#: A voxel below this (HU) makes ``guess_kind`` call a volume CT: air is about −1000 HU.
CT_GUESS_BELOW = -500.0

@dataclass
class Result:
    """A translated volume and how it was made."""

    data: np.ndarray            # (X, Y, Z) float32, the input's shape and voxel order
    plan: SlicePlan
    target_map: IntensityMap    # [0, 1] → output intensities
    choice: Choice              # backend, precision, why
    seconds: float              # inference time (runner activation included)
    table: StepTable | None = None
    foreground: np.ndarray | None = None   # (X, Y, Z) bool; outside it the output is background
    n_slices: int = 0                      # slices translated, over all planes/TTA passes
    bias_field: np.ndarray | None = None   # (X, Y, Z) the source's coil field, divided out and given back (bias.py)


def guess_kind(data: np.ndarray) -> str:
    """``"ct"`` if any voxel lies below −500 (Hounsfield air), else ``"mri"``."""
    return "ct" if float(np.min(data)) < CT_GUESS_BELOW else "mri"


def target_intensity(target: Domain, plan: SlicePlan) -> IntensityMap:
    """[0, 1] → output intensities: the fixed CT window for a CT target; for an MRI target
    the model's black level 0 → 0 (air in a magnitude image) and 1 → the width of the
    source's robust range, so the output keeps the source's scale and a zero background."""
    if target.kind == "ct":
        return IntensityMap(*CT_WINDOW)
    return IntensityMap(0.0, plan.source_map.hi - plan.source_map.lo)


def source_kinds(bundle: Bundle, spec: ModelEntry, model: Model) -> set[str]:
    """Source kinds (``mri``/``ct``) a model was trained on: the manifest's ``source_kinds``,
    else the kinds of the generator's domains. Diffusion never sees its source (zero-shot),
    so it takes any kind."""
    if model == "diffusion":
        return {"mri", "ct"}
    if spec.source_kinds:
        return set(spec.source_kinds)
    names = bundle.domains if spec.domains is None else spec.domains
    return {bundle.domains[name].kind for name in names if name in bundle.domains}


def _list(names) -> str:
    return ", ".join(sorted(names)) or "none"


def resolve_target(bundle: Bundle, to: str, model: Model) -> tuple[Domain, ModelEntry]:
    """The target domain (:func:`~galip.runtime.domains.get_domain` over the bundle's domains)
    and the typed entry of the model that translates to it.

    ConfigError for an unknown ``to`` (listing the bundle's domains), a model the bundle
    lacks, or a target that model cannot produce (listing the targets it can).
    """
    domains = bundle.domains
    try:
        target = get_domain(to, domains)
    except ConfigError:
        raise ConfigError(f"--to {to!r} is not a domain of bundle {bundle_name(bundle)}; "
                          f"it translates to {_list(domains)}") from None
    if model == "generator":
        spec = bundle.generator
        if spec is None:
            raise ConfigError(f"bundle {bundle_name(bundle)} has no generator; use --model diffusion "
                              f"(targets: {_list(bundle.diffusion)})")
        have = list(domains) if spec.domains is None else spec.domains
        if target.name not in have:
            raise ConfigError(f"the generator of bundle {bundle_name(bundle)} does not translate to {target.name}; "
                              f"it translates to {_list(have)}")
        return target, spec
    if not bundle.diffusion:
        raise ConfigError(f"bundle {bundle_name(bundle)} has no diffusion model; use --model generator")
    if target.name not in bundle.diffusion:
        raise ConfigError(f"bundle {bundle_name(bundle)} has no diffusion model for {target.name}; "
                          f"diffusion targets: {_list(bundle.diffusion)} (or use --model generator)")
    return target, bundle.diffusion[target.name]


def bundle_name(bundle: Bundle) -> str:
    """The manifest's ``name``, else the bundle folder's name."""
    return str(bundle.manifest.get("name") or bundle.root.resolve().name)


def _data_range(spec: DiffusionEntry) -> tuple[float, float]:
    if spec.data_range is None:
        raise BundleError("diffusion model: data_range should be [lo, hi] such as [-1, 1], found None; "
                          "re-export the bundle")
    return spec.data_range


def _sampler_table(spec: DiffusionEntry, settings: Settings) -> StepTable:
    """The step table of this run: the settings, else the manifest's ``sampler`` defaults."""
    defaults = spec.sampler
    sampler = settings.sampler or defaults.default
    # the manifest's steps and eta belong to its sampler: another sampler starts from the contract's
    own = sampler == defaults.default
    eta = settings.eta if settings.eta is not None else (defaults.eta if own else DEFAULT_ETA)
    steps = settings.steps if settings.steps is not None else \
        (defaults.steps if own else min(DEFAULT_STEPS, spec.schedule.timesteps))
    if defaults.spacing not in SPACINGS:
        raise BundleError(f"diffusion sampler: spacing should be one of {', '.join(SPACINGS)}, found "
                          f"{defaults.spacing!r}")
    if sampler == "ddpm":
        return step_table(spec.schedule, "ddpm", settings.steps)
    return step_table(spec.schedule, sampler, steps, eta, defaults.spacing)


def _checked_model_call(call: Callable) -> Callable:
    """Make a batch's model call a user-facing result: a crash inside the backend, an output of
    the wrong shape or with NaN/Inf becomes one BackendError naming the graph and the bundle,
    raised before anything is written."""
    @functools.wraps(call)
    def checked(self: "Translator", runners: list[Runner], x: np.ndarray, slices: np.ndarray,
                on_step: Progress) -> np.ndarray:
        try:
            y = np.asarray(call(self, runners, x, slices, on_step))
        except GalipError:
            raise
        except Exception as error:   # onnxruntime/TensorRT raise their own types (Fail, RuntimeError, ...)
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise BackendError(f"{self.choice.name}: {self.graph_label} failed at run time ({first}); "
                               "re-export the bundle or try another --backend/--precision") from None
        if y.shape != x.shape:
            raise BackendError(f"{self.graph_label} returned shape {y.shape} for input {x.shape}, expected the "
                               "input's shape (docs/contracts.md); re-export the bundle")
        bad = int(np.count_nonzero(~np.isfinite(y)))
        if bad:
            raise BackendError(f"{self.graph_label} returned {bad} NaN/Inf values of {y.size} (slices {slices[0]} to "
                               f"{slices[-1]}), nothing written; the model or its conversion is broken: "
                               "try --precision fp32 or re-export the bundle")
        return y
    return checked


@dataclass
class Translator:
    """A prepared run: bundle, target, model entry, backend choice and (diffusion) step table.

    Make it with :func:`prepare`; call :meth:`translate` for each volume.
    """

    bundle: Bundle
    target: Domain
    settings: Settings
    spec: ModelEntry
    factory: RunnerFactory
    choice: Choice
    config: PreprocessConfig
    table: StepTable | None = None
    data_range: tuple[float, float] = (0.0, 1.0)
    lmi_factory: RunnerFactory | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        """``galip <model> <bundle name> -> <domain>``: the output's NIfTI description."""
        return f"galip {self.settings.model} {bundle_name(self.bundle)} -> {self.target.name}"

    def check_source(self, kind: str, what: str = "the input") -> None:
        """ConfigError unless the model was trained on sources of ``kind`` (or ``any_source``)."""
        kinds = source_kinds(self.bundle, self.spec, self.settings.model)
        if kind not in kinds and not self.settings.any_source:
            trained = "/".join(k.upper() for k in sorted(kinds))
            raise ConfigError(f"{what} reads as {kind.upper()}, but the {self.settings.model} of bundle "
                              f"{bundle_name(self.bundle)} was trained on {trained} sources only; pass "
                              f"--source-kind {sorted(kinds)[0]} if it is {trained}, or --any-source to translate it anyway")

    def translate(self, data: np.ndarray, affine: np.ndarray, kind: str = "mri", *,
                  foreground: np.ndarray | None = None,
                  on_slices: Progress = _no_progress, on_step: Progress = _no_progress) -> Result:
        """Translate one volume ``(X, Y, Z)`` (scanner units) of source ``kind`` (``mri``/``ct``).

        ``foreground``: a boolean mask of ``data``'s shape to use instead of
        ``settings.mask``. ``on_slices(done, total)`` is called after each batch (over all
        passes of ``planes``/``tta``); ``on_step(done, total)`` after each diffusion step
        of the current batch. Returns the volume in the input's shape and voxel order
        (same affine).
        """
        self.check_source(kind)
        if foreground is not None and np.shape(foreground) != np.shape(data):
            raise ConfigError(f"foreground mask has shape {np.shape(foreground)}, the volume {np.shape(data)}; "
                              "give a mask on the input's grid")
        axes = [self.config.axis] + ([a for a in range(3) if a != self.config.axis] if self.settings.planes == 3 else [])
        flips = [False, True] if self.settings.tta == "flip" else [False]
        passes = [(axis, flip) for axis in axes for flip in flips]
        mirror = voxel_axis(affine, 0)                         # left-right
        span = self._slab(data, affine)
        started = time.perf_counter()
        if foreground is None and self.settings.mask == "auto":
            foreground = head_mask(data, fit_intensity(np.asarray(data), kind, percentiles=tuple(self.config.percentiles)))
        # the coil's bias field (runtime/bias.py): the model translates without it, then it is given back
        data, field = flatten(data, affine, kind, self.config.bias_field, self.config.percentiles, foreground)
        # per pass, the canonical slices that reach the model: the slab (if any), and of it
        # only slices with foreground (an empty slice is background whatever the model says)
        todo = [canonical_slices(affine, np.shape(data), axis, self._mirrored(span, data, affine, mirror) if flip else span,
                                 None if foreground is None else (np.flip(foreground, mirror) if flip else foreground))
                for axis, flip in passes]
        total, fused, done = sum(len(t) for t in todo), None, 0
        for (axis, flip), indices in zip(passes, todo):
            source = np.flip(data, mirror) if flip else data
            # the mirrored volume keeps the affine: the model sees a mirrored head, undone below
            out, plan, target_map = self._translate_along(
                source, affine, kind, replace(self.config, axis=axis), indices,
                lambda d, t, base=done: on_slices(base + d, total), on_step)
            done += len(indices)
            out = np.flip(out, mirror) if flip else out
            fused = out if fused is None else fused + out.astype(np.float64)
        # one pass (the default) is the volume itself: no float64 copy of it on the hot path
        volume = fused if len(passes) == 1 else (fused / len(passes)).astype(np.float32)
        if field is not None and self.target.kind == "mri":
            volume *= field
        if foreground is not None:
            volume[~foreground] = target_map.lo               # the target's background
        seconds = time.perf_counter() - started
        return Result(volume, plan, target_map, self.choice, seconds, self.table, foreground, done, field)

    def _slab(self, data: np.ndarray, affine: np.ndarray) -> tuple[int, int] | None:
        """``settings.slices`` checked against the input's extent on the slicing axis."""
        if self.settings.slices is None:
            return None
        a, b = self.settings.slices
        axis = voxel_axis(affine, self.config.axis)
        n = np.shape(data)[axis]
        if b > n:
            raise ConfigError(f"--slices {a}:{b} runs past the input's {n} slices along the bundle's "
                              f"slicing axis (voxel axis {axis}); use B <= {n}")
        return a, b

    def preview_centre(self, shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int] | None:
        """Voxel through which a preview shows a slab run (its middle slice), else None."""
        if self.settings.slices is None:
            return None
        centre = [n // 2 for n in shape[:3]]
        a, b = self.settings.slices
        centre[voxel_axis(affine, self.config.axis)] = (a + b - 1) // 2
        return tuple(centre)

    def _mirrored(self, span: tuple[int, int] | None, data: np.ndarray, affine: np.ndarray,
                  mirror: int) -> tuple[int, int] | None:
        """The slab in the left-right mirrored volume (moves only if the slicing axis is left-right)."""
        if span is None or voxel_axis(affine, self.config.axis) != mirror:
            return span
        n = np.shape(data)[mirror]
        return n - span[1], n - span[0]

    def _translate_along(self, data: np.ndarray, affine: np.ndarray, kind: str, config: PreprocessConfig,
                         indices: np.ndarray, on_slices: Progress, on_step: Progress
                         ) -> tuple[np.ndarray, SlicePlan, IntensityMap]:
        """One pass: slices along ``config.axis`` → model → volume in the input's voxel order.
        Only the canonical slices ``indices`` go through the model, the others are the
        target's background (normalisation still comes from the whole volume)."""
        plan, raw = plan_volume(data, affine, kind, config)
        target_map = target_intensity(self.target, plan)
        out = np.full(raw.shape, target_map.lo, dtype=np.float32)
        n, batch = len(indices), affordable_batch(self.settings.batch, plan.model_shape)
        diffusion = self.settings.model == "diffusion"
        call = self._diffuse if diffusion else self._generate
        on_slices(0, n)
        if n == 0:
            return slices_to_volume(out, plan), plan, target_map
        with contextlib.ExitStack() as stack:    # deactivates every runner, also on errors
            runners = [stack.enter_context(make()) for make in
                       ((self.factory, self.lmi_factory) if diffusion else (self.factory,))]
            for start in range(0, n, batch):
                chunk = indices[start:start + batch]
                x = plan.prepare(raw[chunk])[:, None]                       # (b, 1, H', W') in [0, 1]
                y = call(runners, x, chunk, on_step)                         # (b, 1, H', W') in [0, 1]
                out[chunk] = plan.restore(np.clip(y[:, 0], 0.0, 1.0), target_map)
                on_slices(start + len(chunk), n)
        return slices_to_volume(out, plan), plan, target_map

    # -- model calls ---------------------------------------------------------------------
    @property
    def graph_label(self) -> str:
        """``generator.onnx of bundle tiny (/path/tiny)``: which model file ran, for errors."""
        return f"{self.choice.file.name} of bundle {bundle_name(self.bundle)} ({self.bundle.root})"

    @_checked_model_call
    def _generate(self, runners: list[Runner], x: np.ndarray, slices: np.ndarray, on_step: Progress) -> np.ndarray:
        """I2I-Galip generator: one call per batch, the target's class id per slice."""
        (runner,) = runners
        domain = np.full(len(x), self.target.class_id, dtype=np.int64)
        outputs = runner.infer({GEN_IMAGE: x, GEN_DOMAIN: domain})
        return _output(outputs, GEN_OUTPUT).astype(np.float32, copy=False)

    @_checked_model_call
    def _diffuse(self, runners: list[Runner], source: np.ndarray, slices: np.ndarray, on_step: Progress) -> np.ndarray:
        """MIDiffusion sampling of one batch (paper Alg. 1; the step graph runs DDPM, DDIM or
        DPM-Solver++(2M) from the table's coefficients)."""
        step, lmi = runners
        table = self.table
        # 1. LMI(source, source): fixed over the whole loop (paper Eq. 13, second channel).
        lmi_source = _output(lmi.infer({LMI_X: source, LMI_Y: source}), LMI_OUT).astype(np.float32, copy=False)
        # 2. x_T ~ N(0, I) and every step's z, shared by the volume's slices (schedule.SliceNoise).
        noise = SliceNoise(self.settings.seed, len(slices), source.shape[1:])
        # 3. The loop (kept on device by TensorRT).
        x0 = run_sampler(step, source, lmi_source, table, noise, on_step)
        # 4. The last step lands on ᾱ = 1: x_prev = x̂_0 in the model's data range → [0, 1].
        lo, hi = self.data_range
        return (x0 - lo) / (hi - lo)


def _output(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name in outputs:
        return outputs[name]
    raise BundleError(f"the graph has outputs {list(outputs)}, expected {name!r}; re-export the bundle")


def prepare(bundle: Bundle, to: str, settings: Settings = Settings()) -> Translator:
    """Check the settings against the bundle and pick the backend; nothing heavy runs yet.

    Raises ConfigError (bad settings, unknown target, no such model), BundleError
    (malformed model entry) or BackendError (the requested backend cannot run).
    """
    settings.check()
    target, spec = resolve_target(bundle, to, settings.model)
    config = spec.preprocess or PreprocessConfig.from_dict(bundle.preprocess)
    table, data_range = None, (0.0, 1.0)
    if settings.model == "diffusion":
        table = _sampler_table(spec, settings)
        data_range = _data_range(spec)
    factory, choice = select_backend(bundle, settings.model, settings.backend, settings.precision,
                                     domain=target.name if settings.model == "diffusion" else None,
                                     threads=settings.threads, lmi=settings.lmi)
    translator = Translator(bundle, target, settings, spec, factory, choice, config, table, data_range)
    if settings.model == "diffusion":
        translator.lmi_factory = select_lmi(bundle, spec, choice, settings.threads)
    return translator
