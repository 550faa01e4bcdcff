"""The diffusion sampler's per-step table in numpy: DDPM linear β → ᾱ, and the one update.

Every sampler galip has is one linear update per step, over values the runtime computes
once per run (the step graph, the eager PyTorch sampler and the tests all call
:func:`combine`)::

    x̂_0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t            (clipped to the data range)
    x_prev = c_x · x_t + c_0 · x̂_0 + c_1 · x̂_0^last + σ · z

where x̂_0^last is the previous step's x̂_0 (zeros at the first step). One row of
:class:`StepTable` (timestep, ᾱ_t, c_x, c_0, c_1, σ) per step:

* ``ddim`` (Song et al. 2021, Eq. 12 and 16) with any number of steps and η: with
  ε = (x_t − √ᾱ_t x̂_0)/√(1−ᾱ_t) (the model's ε, or recomputed from the clipped x̂_0),
  x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev−σ²) ε + σ z is c_x = √(1−ᾱ_prev−σ²)/√(1−ᾱ_t),
  c_0 = √ᾱ_prev − c_x √ᾱ_t, c_1 = 0, σ(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev).
* ``ddpm``: every timestep T−1 … 0 with η = 1, which is ancestral sampling (Ho et al.
  2020, Alg. 2): σ² = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t.
* ``dpmpp2m``: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), the multistep
  second-order solver in data prediction: with α = √ᾱ, s = √(1−ᾱ), λ = log(α/s),
  h_i = λ_prev − λ_t and r_i = h_{i−1}/h_i,
  x_prev = (s_prev/s_t) x_t + α_prev (1 − e^{−h_i}) [(1 + 1/(2r_i)) x̂_0 − 1/(2r_i) x̂_0^last].
  The first step and the last (to ᾱ = 1, where h is infinite) are first order, which
  is DDIM with η = 0. Deterministic (σ = 0).

The last row always steps to the clean end, ᾱ_prev = 1 (so σ = 0 and x_prev = x̂_0).
Computed in float64; the runtime casts each row to float32 when it feeds the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Mapping

import numpy as np

from .errors import BundleError, ConfigError

Sampler = Literal["ddim", "ddpm", "dpmpp2m"]
Spacing = Literal["linspace", "trailing"]
SAMPLERS = ("ddim", "ddpm", "dpmpp2m")
#: Per-step scalar inputs of the step graph, in the order of :class:`StepTable`'s columns.
STEP_SCALARS = ("timestep", "alpha_bar_t", "coef_xt", "coef_x0", "coef_x0_last", "sigma")
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


def parse_sampler(text: str) -> tuple[str, int | None, float]:
    """``ddpm``, ``ddim:STEPS[:ETA]`` or ``dpmpp2m:STEPS`` → (sampler, steps, eta); ConfigError otherwise."""
    name, *rest = text.strip().split(":")
    try:
        steps = int(rest[0]) if rest else None
        eta = float(rest[1]) if len(rest) > 1 else (1.0 if name == "ddpm" else 0.0)
    except ValueError:
        steps, eta = -1, 0.0
    if name not in SAMPLERS or len(rest) > 2 or (name != "ddpm" and (steps is None or steps < 1)) \
            or (name == "ddpm" and rest) or (name == "dpmpp2m" and len(rest) > 1) or not 0.0 <= eta <= 1.0:
        raise ConfigError(f"expected a sampler ddpm, ddim:STEPS[:ETA] or dpmpp2m:STEPS, got {text!r}")
    return name, steps, eta


@dataclass(frozen=True)
class StepTable:
    """Per-step inputs of the step graph, float64 arrays of length ``len(table)``.

    timestep : (S,) int64, strictly decreasing
    alpha_bar_t : (S,) ᾱ at the step (the graph's x̂_0 needs it)
    coef_xt, coef_x0, coef_x0_last, sigma : (S,) the coefficients of :func:`combine`
    """

    timestep: np.ndarray
    alpha_bar_t: np.ndarray
    coef_xt: np.ndarray
    coef_x0: np.ndarray
    coef_x0_last: np.ndarray
    sigma: np.ndarray
    sampler: str
    eta: float

    def __len__(self) -> int:
        return len(self.timestep)

    @property
    def draws_noise(self) -> np.ndarray:
        """(S,) bool: the steps that draw z, σ ≠ 0 as fed (float32); every sampler loop asks here,
        so the eager and the runtime noise streams cannot drift apart."""
        return self.sigma.astype(np.float32) != 0.0

    def rows(self) -> Iterator[dict[str, float]]:
        """One ``{name: value}`` per step, names as :data:`STEP_SCALARS`."""
        for values in zip(*(getattr(self, name) for name in STEP_SCALARS)):
            yield {name: float(v) for name, v in zip(STEP_SCALARS, values)}

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """One step-graph feed per row: each of :data:`STEP_SCALARS` as float32 [1]."""
        for row in self.rows():
            yield {name: np.array([value], np.float32) for name, value in row.items()}


def combine(x_t, x0, x0_last, noise, coef_xt, coef_x0, coef_x0_last, sigma):
    """x_prev = c_x · x_t + c_0 · x̂_0 + c_1 · x̂_0^last + σ · z, the one update of every
    sampler (module docstring). Plain arithmetic, so numpy arrays, torch tensors and a
    traced graph all run this same line; coefficients are scalars or broadcastable."""
    return coef_xt * x_t + coef_x0 * x0 + coef_x0_last * x0_last + sigma * noise


def _ddim_coefficients(ab_t: np.ndarray, ab_prev: np.ndarray, eta: float):
    # σ(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev) (Song et al. Eq. 16); η = 1 over
    # consecutive timesteps is the DDPM posterior variance β̃_t (Ho et al. Eq. 7).
    variance = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    sigma = float(eta) * np.sqrt(np.clip(variance, 0.0, None))
    # Eq. 12 with ε written through x_t and x̂_0: ε = (x_t − √ᾱ_t x̂_0)/√(1−ᾱ_t)
    coef_xt = np.sqrt(np.clip(1.0 - ab_prev - sigma ** 2, 0.0, None)) / np.sqrt(1.0 - ab_t)
    coef_x0 = np.sqrt(ab_prev) - coef_xt * np.sqrt(ab_t)
    return coef_xt, coef_x0, np.zeros_like(ab_t), sigma


def _dpmpp2m_coefficients(ab_t: np.ndarray, ab_prev: np.ndarray):
    alpha_t, alpha_prev = np.sqrt(ab_t), np.sqrt(ab_prev)
    s_t, s_prev = np.sqrt(1.0 - ab_t), np.sqrt(1.0 - ab_prev)
    # e^{−h} = (s_prev/α_prev)/(s_t/α_t) without a logarithm, exact 0 at the clean end
    exp_neg_h = (s_prev * alpha_t) / (alpha_prev * s_t)
    phi = alpha_prev * (1.0 - exp_neg_h)
    coef_xt, coef_x0, coef_x0_last = s_prev / s_t, phi.copy(), np.zeros_like(phi)
    with np.errstate(divide="ignore"):
        lam_t, lam_prev = np.log(alpha_t / s_t), np.log(alpha_prev / s_prev)
    h = lam_prev - lam_t
    # second order where a previous step exists and h is finite (not the step to ᾱ = 1)
    for i in range(1, len(ab_t)):
        if np.isfinite(h[i]):
            r = h[i - 1] / h[i]
            coef_x0[i] = phi[i] * (1.0 + 1.0 / (2.0 * r))
            coef_x0_last[i] = -phi[i] / (2.0 * r)
    return coef_xt, coef_x0, coef_x0_last, np.zeros_like(phi)


def step_table(schedule: NoiseSchedule, sampler: Sampler = "ddim", steps: int | None = None,
               eta: float = 0.0, spacing: Spacing = DEFAULT_SPACING) -> StepTable:
    """The per-step table of one sampling run (module docstring).

    ``ddim``/``dpmpp2m``: ``steps`` timesteps from :func:`ddim_timesteps`; ``eta`` is DDIM's
    (dpmpp2m is deterministic and takes none). ``ddpm``: all T timesteps with η = 1
    (``steps`` must be None or T; ``eta`` is ignored). Raises ConfigError naming the bad setting.
    """
    T = schedule.timesteps
    if sampler == "ddpm":
        if steps is not None and steps != T:
            raise ConfigError(f"--sampler ddpm always runs all {T} timesteps, got --steps {steps}; "
                              "drop --steps or use --sampler ddim")
        timesteps, eta = np.arange(T - 1, -1, -1, dtype=np.int64), 1.0
    elif sampler in ("ddim", "dpmpp2m"):
        if steps is None:
            raise ConfigError(f"--sampler {sampler} needs a number of steps (--steps N)")
        if not (np.isfinite(eta) and 0.0 <= eta <= 1.0):
            raise ConfigError(f"DDIM eta must be between 0 and 1, got {eta!r}")
        if sampler == "dpmpp2m" and eta != 0.0:
            raise ConfigError(f"--sampler dpmpp2m is deterministic and takes no --eta (got {eta:g}); "
                              "use --sampler ddim for eta > 0")
        timesteps = ddim_timesteps(T, steps, spacing)
    else:
        raise ConfigError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    alpha_bars = schedule.alpha_bars
    # ᾱ_t at each step and ᾱ at the next one; ᾱ_{-1} = 1 is the clean end.
    ab_t = alpha_bars[timesteps]
    ab_prev = np.append(alpha_bars[timesteps[1:]], 1.0)
    if sampler == "dpmpp2m":
        coefficients = _dpmpp2m_coefficients(ab_t, ab_prev)
    else:
        coefficients = _ddim_coefficients(ab_t, ab_prev, eta)
    return StepTable(timesteps, ab_t, *coefficients, sampler, float(eta))


class SliceNoise:
    """The sampling noise of a batch of ``n`` slices of one volume: every slice draws the
    same stream, seeded with ``seed`` (x_T and every z are shared). Neighbouring slices,
    whose sources are alike, then follow alike paths to alike samples; independent noise
    per slice made each slice a new sample, which showed as stripes in sagittal and
    coronal views. A slice's sample depends on neither the batch nor the backend (the
    runtime and the eager PyTorch sampler both draw from here).

    ``draw()`` returns the next standard normal ``(n, *shape)`` float32: first x_T, then
    one z per step that draws noise (:attr:`StepTable.draws_noise`).
    """

    def __init__(self, seed: int, n: int, shape: tuple[int, ...]):
        self._rng = np.random.default_rng([seed])
        self.n, self.shape = int(n), tuple(shape)

    def draw(self) -> np.ndarray:
        one = self._rng.standard_normal(self.shape, dtype=np.float32)
        return np.ascontiguousarray(np.broadcast_to(one, (self.n, *self.shape)))
