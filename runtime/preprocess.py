"""The one preprocessing chain between a NIfTI volume and a model's input slices.

Training (galip.train.slices) and the runtime (galip.runtime.pipeline) both call this
module, so what a model saw in training is by construction what ``galip-run`` feeds it::

    volume (any orientation) --to_canonical--> RAS+ --volume2slices(axis)--> raw slices
    raw slices (b, H, W) --resample to spacing--> --normalise, clip [0,1]--> --pad to 32k-->
    model slices (b, H', W'), background 0

and back again for the model's output. A :class:`SlicePlan` holds everything the inverse
needs; :meth:`SlicePlan.prepare` / :meth:`SlicePlan.restore` work on any batch of slices,
so memory stays bounded by the batch, not the volume.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import InputError
from .geometry import (PadRecord, ResampleRecord, crop_to_record, from_canonical, inplane_spacing,
                       pad_to_multiple, resample_slices, resampled_shape, restore_slices, slices2volume,
                       to_canonical, volume2slices)
from .intensity import IntensityMap, denormalize, fit_intensity, normalize
from .limits import BYTES_PER_MODEL_PIXEL, over_budget


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing a model was trained with; stored in checkpoints and bundle manifests.

    ``spacing`` is the in-plane spacing (mm) slices are resampled to (None: keep the
    input's); ``size_multiple`` is what the network's down-sampling needs;
    ``bias_field`` ("none" or "n4") whether an MRI source's coil bias field is divided out
    before and multiplied back after the model (runtime/bias.py).
    """

    axis: int = 2
    spacing: float | None = None
    size_multiple: int = 32
    percentiles: tuple[float, float] = (0.5, 99.5)
    bias_field: str = "none"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["percentiles"] = list(self.percentiles)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        return cls(axis=int(data.get("axis", 2)), spacing=data.get("spacing"),
                   size_multiple=int(data.get("size_multiple", 32)),
                   percentiles=tuple(data.get("percentiles", (0.5, 99.5))),
                   bias_field=str(data.get("bias_field", "none")))


@dataclass
class SlicePlan:
    """Geometry and intensity of one volume in model space, and the way back."""

    config: PreprocessConfig
    ornt: np.ndarray                 # orientation of the input's axes (for from_canonical)
    canonical_shape: tuple[int, int, int]
    spacing: tuple[float, float]     # in-plane spacing of the canonical slices (mm)
    source_map: IntensityMap         # how the input's intensities were normalised
    slice_shape: tuple[int, int] = field(init=False)   # raw slice (H, W)
    model_shape: tuple[int, int] = field(init=False)   # model slice (H', W')
    _resample: ResampleRecord = field(init=False, repr=False)
    _pad: PadRecord = field(init=False, repr=False)

    def __post_init__(self) -> None:
        shape = list(self.canonical_shape)
        del shape[self.config.axis]
        self.slice_shape = (shape[0], shape[1])
        self._check_fits()   # before the probe below allocates a model-space slice
        # The records depend on the slice shape only, not on the batch: make them once.
        probe, self._resample, self._pad = self._forward(np.zeros((1, *self.slice_shape), np.float32))
        self.model_shape = probe.shape[1:]

    @property
    def n_slices(self) -> int:
        return self.canonical_shape[self.config.axis]

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Raw canonical slices ``(b, H, W)`` → model input ``(b, H', W')`` float32 in [0, 1]."""
        return self._forward(raw)[0]

    def restore(self, model_out: np.ndarray, target_map: IntensityMap | None = None) -> np.ndarray:
        """Model output ``(b, H', W')`` in [0, 1] → slices ``(b, H, W)`` in output intensities.

        ``target_map`` maps [0, 1] back to intensities (a CT window for CT targets); by
        default the source's own map, so an MRI output spans the input's range.
        """
        batch = crop_to_record(np.asarray(model_out, dtype=np.float32), self._pad)
        batch = denormalize(batch, target_map or self.source_map)
        return restore_slices(batch, self._resample)

    def _check_fits(self) -> None:
        """InputError when one model-space slice would not fit the memory budget."""
        target = (self.config.spacing,) * 2 if self.config.spacing else self.spacing
        height, width = resampled_shape(self.slice_shape, self.spacing, target)
        m = self.config.size_multiple
        pixels = -(-height // m) * m * -(-width // m) * m
        why = over_budget(f"one slice resampled from {self.spacing[0]:.4g} x {self.spacing[1]:.4g} mm to "
                          f"{target[0]:.4g} x {target[1]:.4g} mm ({height} x {width} pixels)",
                          pixels * BYTES_PER_MODEL_PIXEL)
        if why is not None:
            raise InputError(f"expected slices that fit in memory in the model's space, found {why}; "
                             "check the input's voxel sizes")

    def _forward(self, raw: np.ndarray) -> tuple[np.ndarray, ResampleRecord, PadRecord]:
        target = self.config.spacing
        target_spacing = (target, target) if target else self.spacing
        stack, resample_record = resample_slices(np.asarray(raw, np.float32), self.spacing, target_spacing)
        stack = normalize(stack, self.source_map, clip=True)
        stack, pad_record = pad_to_multiple(stack, self.config.size_multiple, value=0.0)
        return stack, resample_record, pad_record


def plan_volume(data: np.ndarray, affine: np.ndarray, kind: str, config: PreprocessConfig,
                *, mask: np.ndarray | None = None) -> tuple[SlicePlan, np.ndarray]:
    """Plan the chain for one volume; returns the plan and the raw canonical slices.

    The intensity map is fitted once on the whole volume (robust percentiles for MRI, the
    fixed HU window for CT), so every batch of slices is normalised the same way.
    """
    data_c, affine_c, ornt = to_canonical(data, affine)
    source_map = fit_intensity(data_c, kind, percentiles=tuple(config.percentiles),
                               mask=None if mask is None else to_canonical(mask, affine)[0] > 0)
    plan = SlicePlan(config=config, ornt=ornt, canonical_shape=tuple(data_c.shape[:3]),
                     spacing=inplane_spacing(affine_c, config.axis), source_map=source_map)
    return plan, volume2slices(data_c, config.axis)


def slices_to_volume(slices: np.ndarray, plan: SlicePlan) -> np.ndarray:
    """Restored slices ``(n, H, W)`` → volume in the input's own voxel order and shape."""
    return from_canonical(slices2volume(slices, plan.config.axis), plan.ornt)
