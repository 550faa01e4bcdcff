"""The diffusion sampler's per-step table in numpy: DDPM linear β → ᾱ, DDIM and DDPM steps.

The diffusion step graph (bundle contract) does one generalised DDIM step (Song et al.
2021, Eq. 12)::

    x̂_0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
    x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε + σ z

(x̂_0 clipped to the data range, ε recomputed from it, when the manifest's
``conditioning.clip_x0``; docs/contracts.md) and is fed one row ``(timestep, ᾱ_t, ᾱ_prev, σ)``
of the table made here, once per run, from the manifest's ``schedule`` and the sampler
settings:

* ``ddim`` with any number of steps and ``eta``: σ(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)
  (Eq. 16); η = 0 is deterministic.
* ``ddpm``: every timestep T−1 … 0 with η = 1, which is ancestral sampling (Ho et al. 2020,
  Alg. 2): σ² = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t.

The last row always steps to the clean end, ᾱ_prev = 1 (so σ = 0 and x_prev = x̂_0).
Computed in float64; the runtime casts each row to float32 when it feeds the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Mapping

import numpy as np

from .errors import BundleError, ConfigError

Sampler = Literal["ddim", "ddpm"]
Spacing = Literal["linspace", "trailing"]
SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("linspace", "trailing")
#: The one default shared by training (galip.train.midiffusion) and the runtime, so eager
#: PyTorch and a bundle pick the same timesteps for the same step count.
DEFAULT_SPACING = "trailing"
SCHEDULE_KIND = "ddpm_linear"   # the manifest's schedule ``kind`` (the only one there is)


@dataclass(frozen=True)
class NoiseSchedule:
    """DDPM linear β_t from ``beta_start`` to ``beta_end`` over ``timesteps`` (Ho et al. §4).

    The one definition of β and ᾱ: training (``galip.train.midiffusion.schedule.DDPMSchedule``)
    reads its tables from here, export writes :meth:`to_manifest`, the runtime reads
    :meth:`from_manifest`.
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    timesteps: int = 1000

    def __post_init__(self) -> None:
        if int(self.timesteps) != self.timesteps or self.timesteps < 1:
            raise ConfigError(f"schedule timesteps must be an integer >= 1, got {self.timesteps!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(f"schedule needs 0 < beta_start <= beta_end < 1, got "
                              f"{self.beta_start!r}, {self.beta_end!r}")

    @property
    def betas(self) -> np.ndarray:
        """β_t, t = 0 … T−1, float64 (T,)."""
        return np.linspace(self.beta_start, self.beta_end, int(self.timesteps), dtype=np.float64)

    @property
    def alpha_bars(self) -> np.ndarray:
        """ᾱ_t = Π_{s≤t} (1 − β_s) (Ho et al. Eq. 4), float64 (T,)."""
        return np.cumprod(1.0 - self.betas)

    def to_manifest(self) -> dict:
        """The manifest ``schedule`` entry ``{kind: "ddpm_linear", beta_start, beta_end, timesteps}``."""
        return {"kind": SCHEDULE_KIND, "beta_start": float(self.beta_start), "beta_end": float(self.beta_end),
                "timesteps": int(self.timesteps)}

    @classmethod
    def from_manifest(cls, schedule: Mapping) -> "NoiseSchedule":
        """From a manifest ``schedule`` entry (:meth:`to_manifest`)."""
        if not isinstance(schedule, Mapping) or schedule.get("kind", SCHEDULE_KIND) != SCHEDULE_KIND:
            found = schedule.get("kind") if isinstance(schedule, Mapping) else schedule
            raise BundleError(f"diffusion schedule: expected kind {SCHEDULE_KIND!r}, found {found!r}; "
                              "upgrade galip or re-export the bundle")
        try:
            return cls(float(schedule["beta_start"]), float(schedule["beta_end"]), int(schedule["timesteps"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"diffusion schedule: expected beta_start, beta_end, timesteps, found "
                              f"{dict(schedule)!r} ({exc}); re-export the bundle") from None


def ddim_timesteps(timesteps: int, steps: int, spacing: Spacing = DEFAULT_SPACING) -> np.ndarray:
    """Strictly decreasing subsequence of ``steps`` timesteps of 0 … T−1, int64 (steps,).

    ``trailing`` (default; Lin et al. 2024, §3.3): ``round(T − i·T/steps) − 1``, starts at
    T−1 (pure noise) and ends at T/steps − 1, so every step spans T/steps timesteps.
    ``linspace``: round-half-up of ``linspace(T−1, 0, steps)``, starts at T−1 and ends at 0.
    Either way the last step goes to x̂₀ (ᾱ_prev = 1); ``steps = 1`` gives [T−1].
    ``steps = T`` gives T−1 … 0 with either spacing.
    """
    if int(steps) != steps or not 1 <= steps <= timesteps:
        raise ConfigError(f"--steps must be between 1 and {timesteps} (the schedule's timesteps), got {steps}")
    if spacing == "linspace":
        # floor(x + 0.5) is monotone with floor(x + 1.5) = floor(x + 0.5) + 1, so samples
        # at least 1 apart (steps <= T) stay distinct; np.round (half to even) is not.
        return np.floor(np.linspace(timesteps - 1, 0, int(steps)) + 0.5).astype(np.int64)
    if spacing == "trailing":
        stride = timesteps / steps
        return np.array([int(round(timesteps - i * stride)) - 1 for i in range(int(steps))], dtype=np.int64)
    raise ConfigError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")


@dataclass(frozen=True)
class StepTable:
    """Per-step inputs of the step graph, float64 arrays of length ``len(table)``.

    timestep : (S,) int64, strictly decreasing
    alpha_bar_t, alpha_bar_prev : (S,) ᾱ at the step and at the next (1 after the last)
    sigma : (S,) noise scale σ of the step (0 at the last step)
    """

    timestep: np.ndarray
    alpha_bar_t: np.ndarray
    alpha_bar_prev: np.ndarray
    sigma: np.ndarray
    sampler: str
    eta: float

    def __len__(self) -> int:
        return len(self.timestep)

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """One step-graph feed per row: ``timestep``, ``alpha_bar_t``, ``alpha_bar_prev``, ``sigma`` as float32 [1]."""
        for t, ab_t, ab_prev, sigma in zip(self.timestep, self.alpha_bar_t, self.alpha_bar_prev, self.sigma):
            yield {"timestep": np.array([t], np.float32), "alpha_bar_t": np.array([ab_t], np.float32),
                   "alpha_bar_prev": np.array([ab_prev], np.float32), "sigma": np.array([sigma], np.float32)}


def step_table(schedule: NoiseSchedule, sampler: Sampler = "ddim", steps: int | None = None,
               eta: float = 0.0, spacing: Spacing = DEFAULT_SPACING) -> StepTable:
    """The (timestep, ᾱ_t, ᾱ_prev, σ) table of one sampling run.

    ``ddim``: ``steps`` timesteps from :func:`ddim_timesteps`, σ(``eta``) (Song et al. Eq. 16).
    ``ddpm``: all T timesteps with η = 1 (``steps`` must be None or T; ``eta`` is ignored).
    Raises ConfigError naming the bad setting.
    """
    T = schedule.timesteps
    if sampler == "ddpm":
        if steps is not None and steps != T:
            raise ConfigError(f"--sampler ddpm always runs all {T} timesteps, got --steps {steps}; "
                              "drop --steps or use --sampler ddim")
        timesteps, eta = np.arange(T - 1, -1, -1, dtype=np.int64), 1.0
    elif sampler == "ddim":
        if steps is None:
            raise ConfigError("--sampler ddim needs a number of steps (--steps N)")
        if not (np.isfinite(eta) and 0.0 <= eta <= 1.0):
            raise ConfigError(f"DDIM eta must be between 0 and 1, got {eta!r}")
        timesteps = ddim_timesteps(T, steps, spacing)
    else:
        raise ConfigError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    alpha_bars = schedule.alpha_bars
    # 1. ᾱ_t at each step and ᾱ at the next one; ᾱ_{-1} = 1 is the clean end.
    ab_t = alpha_bars[timesteps]
    ab_prev = np.append(alpha_bars[timesteps[1:]], 1.0)
    # 2. σ(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev) (Song et al. Eq. 16); η = 1 over
    #    consecutive timesteps is the DDPM posterior variance β̃_t (Ho et al. Eq. 7).
    variance = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    sigma = float(eta) * np.sqrt(np.clip(variance, 0.0, None))
    return StepTable(timesteps, ab_t, ab_prev, sigma, sampler, float(eta))
