"""How to run a translation: :class:`Settings`, one typed, checked record shared by
``galip-run``, batch mode, the :class:`~galip.runtime.api.Session` API and Ray workers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import ConfigError
from .limits import check_threads
from .schedule import SAMPLERS

Model = Literal["generator", "diffusion"]
MODELS = ("generator", "diffusion")
MASKS = ("auto", "none")
PLANES = (1, 3)
TTAS = ("none", "flip")
#: Where a diffusion step on onnxruntime-cpu runs its LMI (galip.runtime.backends.select).
LMI_MODES = ("auto", "native", "onnx")

@dataclass(frozen=True)
class Settings:
    """How to run: model, backend, batch size and the diffusion sampler.

    ``steps``, ``sampler`` and ``eta`` default (None) to the bundle's ``sampler`` entry;
    ``precision`` None lets :func:`~galip.runtime.backends.select.select_backend` choose.
    ``mask``: ``auto`` keeps voxels outside the source's head at the target's background,
    ``none`` keeps the model's output everywhere. ``planes``: 1 (the bundle's slicing
    axis) or 3 (all axes, averaged); ``tta``: ``flip`` also translates the left-right
    mirror and averages. ``any_source``: translate a source kind (MRI/CT) the model was
    not trained on instead of refusing it. ``slices``: ``(a, b)`` translates only the input's
    voxel slices a … b−1 along the bundle's slicing axis (a preview slab); the rest of the
    output is the target's background. ``lmi``: where a diffusion step on onnxruntime-cpu
    runs its LMI, ``auto``, ``native`` (the native CPU kernel, or an error) or ``onnx`` (the
    graph's own LMI); galip-run's ``--lmi`` defaults to ``$GALIP_LMI``.
    """

    model: Model = "generator"
    backend: str = "auto"
    precision: str | None = None
    batch: int = 8
    steps: int | None = None
    sampler: str | None = None
    eta: float | None = None
    seed: int = 0
    threads: int | None = None
    mask: str = "auto"
    planes: int = 1
    tta: str = "none"
    any_source: bool = False
    lmi: str = "auto"
    slices: tuple[int, int] | None = None

    def check(self) -> None:
        """ConfigError naming the first unusable value."""
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1 (slices per inference call), got {self.batch}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.eta is not None and not (np.isfinite(self.eta) and 0.0 <= self.eta <= 1.0):
            raise ConfigError(f"--eta must be between 0 and 1, got {self.eta}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        check_threads(self.threads)
        if self.mask not in MASKS:
            raise ConfigError(f"mask must be one of {', '.join(MASKS)} (a mask file: pass its array as foreground=), got {self.mask!r}")
        if self.planes not in PLANES:
            raise ConfigError(f"--planes must be 1 or 3, got {self.planes}")
        if self.tta not in TTAS:
            raise ConfigError(f"--tta must be one of {', '.join(TTAS)}, got {self.tta!r}")
        if self.lmi not in LMI_MODES:
            raise ConfigError(f"--lmi must be one of {', '.join(LMI_MODES)}, got {self.lmi!r}")
        if self.slices is not None:
            check_slices(*self.slices)
            if self.planes != 1:
                raise ConfigError("--slices translates a slab along the bundle's axis; it cannot be combined with --planes 3")


def check_slices(start: int, stop: int, text: str | None = None) -> tuple[int, int]:
    """``(start, stop)``, or ConfigError unless 0 <= start < stop (``text``: what the user typed)."""
    if not 0 <= start < stop:
        raise ConfigError(f"--slices expects A:B with 0 <= A < B (voxel slices along the bundle's axis), "
                          f"got {text if text is not None else f'{start}:{stop}'!r}")
    return start, stop


def parse_slices(text: str | None) -> tuple[int, int] | None:
    """``"40:56"`` -> (40, 56); ConfigError unless it is A:B with 0 <= A < B."""
    if text is None:
        return None
    a, sep, b = text.partition(":")
    try:
        start, stop = int(a), int(b)
    except ValueError:
        start = stop = -1
    return check_slices(start, stop if sep else -1, text)
