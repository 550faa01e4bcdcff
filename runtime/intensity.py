"""Intensity mapping between scanner units and the model's [0, 1] range; numpy only.

An :class:`IntensityMap` is two numbers, ``lo`` and ``hi``: ``normalize`` sends ``lo`` to
0 and ``hi`` to 1, ``denormalize`` is its exact inverse. MRI maps are fitted per volume
from robust percentiles; CT maps are a fixed Hounsfield window. The map of each domain
is stored in the bundle manifest (``to_dict`` / ``from_dict``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np

from .errors import BundleError, ConfigError, InputError


#: Fixed HU window mapped to [0, 1] for CT (air to dense bone).
CT_WINDOW: tuple[float, float] = (-1000.0, 1000.0)


@dataclass(frozen=True)
class IntensityMap:
    """Linear map ``x -> (x - lo) / (hi - lo)``; finite ``lo < hi`` in scanner units."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        lo, hi = float(self.lo), float(self.hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"expected finite lo < hi, got lo={self.lo!r}, hi={self.hi!r}")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def to_dict(self) -> dict[str, float]:
        """``{"lo": float, "hi": float}``, JSON-ready."""
        return {"lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IntensityMap":
        """Read a map written by :meth:`to_dict`; ``BundleError`` if it is malformed."""
        try:
            return cls(float(d["lo"]), float(d["hi"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"expected an intensity map {{'lo': number, 'hi': number}} with lo < hi, found {d!r}; "
                f"re-export the bundle ({' '.join(str(exc).split())})"
            ) from None


def fit_intensity(data: np.ndarray, kind: Literal["mri", "ct"], *, percentiles: tuple[float, float] = (0.5, 99.5),
                  ct_window: tuple[float, float] = CT_WINDOW, mask: np.ndarray | None = None) -> IntensityMap:
    """Fit the intensity map of one volume.

    Parameters
    ----------
    data : array of any shape, real dtype (scanner units; NaN/Inf are ignored)
    kind : ``"mri"``: ``lo, hi`` = the ``percentiles`` of the nonzero voxels (of the
        voxels inside ``mask`` when given, zeros included). ``"ct"``: ``lo, hi`` =
        ``ct_window`` in HU, whatever the data.
    mask : optional boolean array of ``data``'s shape

    Raises ``InputError`` when the data has no signal (MRI: no voxel to fit or
    ``hi <= lo``; CT: no voxel above the window's low end), ``ConfigError`` for bad settings.
    """
    data = np.asarray(data)
    if kind == "ct":
        lo, hi = (float(v) for v in ct_window)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ConfigError(f"expected a CT window (lo, hi) with lo < hi in HU, got {tuple(ct_window)}")
        if not np.any(data > lo):
            finite = data[np.isfinite(data)]
            found = f"max {float(finite.max()):g} HU" if finite.size else "no finite voxels"
            raise InputError(f"expected a CT volume with voxels above {lo:g} HU, found {found}; "
                             f"check that the input is CT in Hounsfield units")
        return IntensityMap(lo, hi)
    if kind != "mri":
        raise ConfigError(f"expected intensity kind 'mri' or 'ct', got {kind!r}")
    p_lo, p_hi = (float(p) for p in percentiles)
    if not 0.0 <= p_lo < p_hi <= 100.0:
        raise ConfigError(f"expected percentiles 0 <= lo < hi <= 100, got {tuple(percentiles)}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise InputError(f"expected a mask of the image's shape {data.shape}, found {mask.shape}; "
                             f"resample the mask onto the image grid")
        values = data[mask]
    else:
        values = data[data != 0]
    values = values[np.isfinite(values)]
    if values.size == 0:
        where = "inside the mask" if mask is not None else "nonzero"
        raise InputError(f"expected an MRI volume with signal, found no {where} voxels; check the input (and mask)")
    lo, hi = (float(v) for v in np.percentile(values, (p_lo, p_hi)))
    if not hi > lo:
        raise InputError(
            f"expected an MRI volume with signal, found constant intensity {lo:g} between the "
            f"{p_lo:g}th and {p_hi:g}th percentiles; check the input"
        )
    return IntensityMap(lo, hi)


def normalize(data: np.ndarray, imap: IntensityMap, *, clip: bool = False) -> np.ndarray:
    """``(data - lo) / (hi - lo)`` as a new float32 array of ``data``'s shape.

    ``clip=True`` clips to [0, 1] (what a model is fed); keep ``clip=False`` where
    :func:`denormalize` must give the input back. Computed in float64.
    """
    out = (np.asarray(data, dtype=np.float64) - imap.lo) / (imap.hi - imap.lo)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32)


def denormalize(data: np.ndarray, imap: IntensityMap) -> np.ndarray:
    """Inverse of :func:`normalize` (unclipped): ``data * (hi - lo) + lo``, new float32 array."""
    return (np.asarray(data, dtype=np.float64) * (imap.hi - imap.lo) + imap.lo).astype(np.float32)
