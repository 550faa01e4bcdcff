"""Input and output names of the bundle's graphs: the one copy that export writes and the
runtime feeds (docs/contracts.md lists them; a test checks that it agrees)."""
from __future__ import annotations

from ..schedule import STEP_SCALARS     # the step table's columns are the step graph's scalar inputs

IMAGE = "float32[N,1,H,W]"
SCALAR = "float32[1]"

# Generator graph ``generator.onnx``: image [0, 1] and the target's class id → translated.
GEN_IMAGE, GEN_DOMAIN, GEN_OUTPUT = "image", "domain", "translated"
GENERATOR_INPUTS = {GEN_IMAGE: IMAGE, GEN_DOMAIN: "int64[N]"}
GENERATOR_OUTPUTS = {GEN_OUTPUT: IMAGE}

# LMI graph ``lmi.onnx``: LMI(x, y) → lmi, y_at (used once per batch for LMI(source, source)).
LMI_X, LMI_Y, LMI_OUT, LMI_Y_AT = "x", "y", "lmi", "y_at"
LMI_GRAPH_INPUTS = {LMI_X: IMAGE, LMI_Y: IMAGE}
LMI_GRAPH_OUTPUTS = {LMI_OUT: IMAGE, LMI_Y_AT: IMAGE}

# Diffusion step graph ``diffusion_<T>_step.onnx``: one sampler update (runtime/schedule.py).
STEP_X_T, STEP_SOURCE, STEP_LMI_SOURCE = "x_t", "source", "lmi_source"
STEP_NOISE, STEP_X0_LAST = "noise", "x0_last"
STEP_IMAGE_INPUTS = (STEP_X_T, STEP_SOURCE, STEP_LMI_SOURCE)
STEP_SCALAR_INPUTS = STEP_SCALARS
STEP_STATE_INPUTS = (STEP_NOISE, STEP_X0_LAST)
STEP_X_PREV, STEP_X0 = "x_prev", "x0_pred"
STEP_INPUTS = {**{n: IMAGE for n in STEP_IMAGE_INPUTS}, **{n: SCALAR for n in STEP_SCALAR_INPUTS},
               **{n: IMAGE for n in STEP_STATE_INPUTS}}
STEP_OUTPUTS = {STEP_X_PREV: IMAGE, STEP_X0: IMAGE}
#: The loop feeds each step's outputs back as the next step's inputs: {input: output}.
STEP_CARRY = {STEP_X_T: STEP_X_PREV, STEP_X0_LAST: STEP_X0}


def io_entry(inputs: dict, outputs: dict) -> dict:
    """The manifest's informative ``io`` entry: ``{"inputs": {...}, "outputs": {...}}``."""
    return {"inputs": dict(inputs), "outputs": dict(outputs)}
