"""The LMI operator's parameters and its ONNX/TensorRT identity: the one copy of both.

Training (``galip.train.midiffusion.conditioning``), the PyTorch operator, the native CPU
kernel, the ONNX function (``galip.export.lmi_onnx``), the TensorRT plugin and the runtime's
split runner all take their defaults, their validation and the node's domain/op type from
here (docs/design.md, "The LMI operator").
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import BundleError, ConfigError

#: ONNX domain and op type of the LMI node; the TensorRT plugin is ``namespace::op type``.
LMI_DOMAIN = "galip"
LMI_OP_TYPE = "LMI"
LMI_PLUGIN_NAMESPACE = "galip"
LMI_PLUGIN_ID = f"{LMI_PLUGIN_NAMESPACE}::{LMI_OP_TYPE}"
#: The node's outputs in order: float32, float32, int32, each (N, 1, H, W).
LMI_NODE_OUTPUTS = ("lmi", "y_at", "offset_index")
LMI_NODE_OUTPUT_TYPES = ("float32", "float32", "int32")
LMI_PARAM_NAMES = ("patch", "radius", "bins", "sigma", "normalize")


def _integer(value: Any, name: str, lo: int, rule: str) -> int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo
    if not ok:
        raise ConfigError(f"LMI {name} must be {rule}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class LmiParams:
    """patch p (odd), search radius r ((2r+1)² offsets), B soft bins with centres
    linspace(0, 1, B), Gaussian width σ, NMI flag (2·MI / (H_X + H_Y)).

    Construction checks the values (one-line ConfigError); integers must be integers
    (numpy integers count, ``3.0`` does not), σ a finite number > 0.
    """

    patch: int = 3
    radius: int = 1
    bins: int = 27
    sigma: float = 8 / 255
    normalize: bool = True

    def __post_init__(self) -> None:
        patch = _integer(self.patch, "patch", 1, "an odd int >= 1")
        if patch % 2 == 0:
            raise ConfigError(f"LMI patch must be an odd int >= 1, got {self.patch!r}")
        _integer(self.radius, "radius", 0, "an int >= 0")
        _integer(self.bins, "bins", 2, "an int >= 2")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, numbers.Real) \
                or not np.isfinite(self.sigma) or not self.sigma > 0:
            raise ConfigError(f"LMI sigma must be a finite number > 0, got {self.sigma!r}")

    def kwargs(self) -> dict:
        """``patch, radius, bins, sigma, normalize`` as plain Python values (operator keywords)."""
        return {"patch": int(self.patch), "radius": int(self.radius), "bins": int(self.bins),
                "sigma": float(self.sigma), "normalize": bool(self.normalize)}

    def to_manifest(self) -> dict:
        """The manifest's ``lmi`` entry and the ONNX node's attributes: σ rounded to float32,
        the precision the kernels receive it in."""
        return {**self.kwargs(), "sigma": float(np.float32(self.sigma))}

    def exported(self) -> "LmiParams":
        """These parameters as the graphs and kernels hold them (σ in float32)."""
        return LmiParams(**self.to_manifest())

    @classmethod
    def from_manifest(cls, entry: Mapping | None) -> "LmiParams":
        """From a manifest ``lmi`` entry (missing keys take the defaults); BundleError when bad."""
        if entry is None:
            return cls()
        try:
            return cls(**{k: entry[k] for k in LMI_PARAM_NAMES if k in entry})
        except (ConfigError, TypeError) as error:
            raise BundleError(f"diffusion lmi entry {dict(entry)!r}: {error}; re-export the bundle") from None

    def to_dict(self) -> dict:
        return asdict(self)


#: The defaults, for function signatures that spell the parameters out.
DEFAULT_LMI = LmiParams()
