"""The DDPM noise schedule as a typed, serialisable config (Ho et al. 2020, §4).

Model space: slices in [0, 1] are mapped to x ∈ [−1, 1] (``img2x``), the range the linear
β schedule was designed for (Ho et al. §3.3); ``x2img`` maps a sample back, clipped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from galip.runtime import schedule as runtime_schedule
from galip.runtime.errors import ConfigError
from galip.runtime.schedule import DEFAULT_SPACING, NoiseSchedule, Spacing  # noqa: F401  (re-exported)

DATA_RANGE = (-1.0, 1.0)   # model space of x_0; images live in [0, 1]


@dataclass(frozen=True)
class DDPMSchedule:
    """Linear β_t from ``beta_start`` to ``beta_end`` over T steps, ε-prediction.

    The training-side config (its field names are the checkpoint's); β and ᾱ come from the
    runtime's :class:`~galip.runtime.schedule.NoiseSchedule`, the one definition of the
    schedule that export writes to the manifest and the runtime samples with.
    """

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: Literal["linear"] = "linear"
    prediction_type: Literal["epsilon"] = "epsilon"

    def __post_init__(self):
        if self.beta_schedule != "linear" or self.prediction_type != "epsilon":
            raise ConfigError(f"only a linear β schedule with ε-prediction is implemented, got "
                              f"{self.beta_schedule!r}/{self.prediction_type!r}")
        self.noise_schedule      # noqa: B018 - NoiseSchedule checks timesteps and βs (ConfigError)

    @property
    def noise_schedule(self) -> NoiseSchedule:
        """The runtime's numpy schedule with the same β_1 … β_T (its manifest form: ``to_manifest()``)."""
        return NoiseSchedule(self.beta_start, self.beta_end, self.num_timesteps)

    @property
    def betas(self) -> torch.Tensor:
        """β_t, t = 0 … T−1, float64 (T,)."""
        return torch.from_numpy(self.noise_schedule.betas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = Π_{s≤t} (1 − β_s) (Ho et al. Eq. 4), float32 (T,): the table every step reads
        (the runtime's float64 ᾱ rounded once)."""
        return torch.from_numpy(self.noise_schedule.alpha_bars).float()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DDPMSchedule":
        return cls(**d)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Ho et al. Eq. 4)."""
    ab = alpha_bar[t].reshape(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def ddim_timesteps(num_timesteps: int, steps: int, spacing: Spacing = DEFAULT_SPACING) -> list[int]:
    """``steps`` strictly descending timesteps from T−1: the runtime's own rule
    (:func:`galip.runtime.schedule.ddim_timesteps`), so eager and bundle sampling agree."""
    return runtime_schedule.ddim_timesteps(num_timesteps, steps, spacing).tolist()


def img2x(img: torch.Tensor) -> torch.Tensor:
    """Image in [0, 1] → model space [−1, 1]."""
    return img * 2.0 - 1.0


def x2img(x: torch.Tensor) -> torch.Tensor:
    """Model space → image, clipped to [0, 1] (also the x_t → LMI-input map, see conditioning)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)
