"""The diffusion sampling loop over a step-graph runner (numpy, any backend).

One function for every sampler: the step table (runtime/schedule.py) carries the
coefficients, the runner carries x_prev → x_t and x0_pred → x0_last between steps (on
the device for TensorRT), and :class:`~galip.runtime.schedule.SliceNoise` supplies x_T
and the z of each σ > 0 step, the same draws the eager PyTorch sampler makes.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .backends.base import DIFFUSION_CARRY, Runner
from .contract import STEP_LMI_SOURCE, STEP_NOISE, STEP_SCALAR_INPUTS, STEP_SOURCE, STEP_X0_LAST, STEP_X_PREV, STEP_X_T
from .errors import BundleError
from .schedule import SliceNoise, StepTable

Progress = Callable[[int, int], None]   # (done, total)


def _no_progress(done: int, total: int) -> None:
    pass


def _check_step_inputs(step: Runner) -> None:
    """A step graph of an older galip (no ``x0_last`` / per-step coefficients) gets one line."""
    missing = [name for name in (STEP_X0_LAST, *STEP_SCALAR_INPUTS) if name not in step.input_names]
    if missing:
        raise BundleError(f"{step.name}: the step graph lacks the inputs {missing} of this galip's sampler "
                          "contract (docs/contracts.md); re-export the bundle with this galip-export")


def run_sampler(step: Runner, source: np.ndarray, lmi_source: np.ndarray, table: StepTable,
                noise: SliceNoise, on_step: Progress = _no_progress) -> np.ndarray:
    """The sampling loop of one batch over an active step-graph runner: x_T from ``noise``,
    one step per row of ``table`` (x_prev → x_t, x0_pred → x0_last), z drawn only where
    σ > 0. Returns x̂_0 of the last step in the model's data range."""
    _check_step_inputs(step)
    no_noise = np.zeros_like(source)

    def updates() -> Iterator[dict[str, np.ndarray]]:
        on_step(0, len(table))
        for index, row in enumerate(table.feeds()):
            # σ = 0 (DDIM η = 0, DPM-Solver++, the last step) ignores z: draw nothing.
            row[STEP_NOISE] = noise.draw() if table.draws_noise[index] else no_noise
            yield row
            on_step(index + 1, len(table))   # resumed once the step has run

    init = {STEP_X_T: noise.draw(), STEP_SOURCE: source, STEP_LMI_SOURCE: lmi_source, STEP_X0_LAST: no_noise}
    outputs = step.run_loop(init, updates(), carry=DIFFUSION_CARRY)
    # the last row lands on ᾱ = 1, where x_prev = x̂_0
    return outputs[STEP_X_PREV].astype(np.float32, copy=False)
