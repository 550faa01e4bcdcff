"""One MIDiffusion sampling step as one ONNX graph: LMI + score network + the update.

Graph ``diffusion_<T>_step.onnx`` (the bundle contract, ``models.diffusion.<T>``)::

    x_t, source, lmi_source, noise, x0_last                        float32 [N, 1, H, W]
    timestep, alpha_bar_t, coef_xt, coef_x0, coef_x0_last, sigma   float32 [1]
    → x_prev, x0_pred                                              float32 [N, 1, H, W]

Inside, in this order (paper Eq. 13; galip.runtime.schedule):

1. cond = [LMI(source, u(x_t)), lmi_source] through the ONE conditioning function of
   training (``galip.train.midiffusion.conditioning.condition``), so the x_t → [0, 1]
   map and the LMI settings cannot drift from what the network was trained with;
2. ε = net([x_t, cond], timestep);
3. x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, clipped to the model's data range (the manifest's
   ``data_range``, from the checkpoint);
4. x_prev = coef_xt·x_t + coef_x0·x̂_0 + coef_x0_last·x0_last + sigma·noise
   (:func:`galip.runtime.schedule.combine`), and x0_pred = x̂_0.

The runtime computes the per-step scalars from the manifest's schedule and sampler and
carries x_prev → x_t and x0_pred → x0_last, so one graph serves DDPM, DDIM with any step
count and η, and the second-order multistep DPM-Solver++(2M).

The LMI is ONE node ``galip::LMI`` (plugin_namespace "galip") defined by the model-local
function of :mod:`galip.export.lmi_onnx`: onnxruntime inlines the function body, TensorRT
maps the node to the CUDA plugin. It is exported through :class:`_LMIPlaceholder`, an
autograd Function whose ``symbolic`` emits the node, given to the traced denoiser as its
``lmi_fn`` (:func:`placeholder_denoiser`; the conditioning takes it as an argument, nothing
global is swapped); the node is then rebuilt with :func:`~galip.export.lmi_onnx.lmi_node` so
its attributes are exactly the function's.
"""
from __future__ import annotations

import onnx
import torch
from torch import nn

from galip.export import lmi_onnx
from galip.runtime.contract import (DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, LMI_GRAPH_INPUTS, LMI_GRAPH_OUTPUTS,
                                    SamplerDefaults, io_entry)
from galip.runtime.contract import STEP_IMAGE_INPUTS as IMAGE_INPUTS, STEP_INPUTS as INPUTS
from galip.runtime.contract import STEP_OUTPUTS as OUTPUTS, STEP_SCALAR_INPUTS as SCALAR_INPUTS  # noqa: F401 (re-exported)
from galip.runtime.contract import STEP_STATE_INPUTS as STATE_INPUTS
from galip.export.generator_graph import DEFAULT_OPSET, check_graph, torch_to_onnx
from galip.train.midiffusion.conditioning import LMIConfig, LMIDenoiser
from galip.runtime.schedule import DEFAULT_SPACING, combine, step_table
from galip.train.midiffusion.samplers import predict_x0
from galip.train.midiffusion.schedule import DATA_RANGE, DDPMSchedule

NET_SCOPE = "/denoiser/net/"     # TorchScript-exporter scope of the score network's nodes
LMI_IO = io_entry(LMI_GRAPH_INPUTS, LMI_GRAPH_OUTPUTS)


# ----------------------------------------------------------------------------- LMI placeholder
class _LMIPlaceholder(torch.autograd.Function):
    """Stand-in for LMI while tracing: shapes only in PyTorch, one ``galip::LMI`` node in ONNX."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor):       # noqa: D102 - values unused
        return torch.zeros_like(x), torch.zeros_like(y)

    @staticmethod
    def symbolic(g, x, y):                                    # noqa: D102
        lmi, y_at = g.op(f"{lmi_onnx.DOMAIN}::{lmi_onnx.OP_TYPE}", x, y, outputs=2)
        lmi.setType(x.type())
        y_at.setType(y.type())
        return lmi, y_at


def _placeholder_lmi(x: torch.Tensor, y: torch.Tensor, config: LMIConfig) -> torch.Tensor:
    return _LMIPlaceholder.apply(x, y)[0]


def placeholder_denoiser(denoiser: LMIDenoiser) -> LMIDenoiser:
    """The same network and LMI settings with the LMI traced as one ``galip::LMI`` node."""
    return LMIDenoiser(denoiser.net, denoiser.lmi_config, lmi_fn=_placeholder_lmi)


# ----------------------------------------------------------------------------- the step module
class DiffusionStep(nn.Module):
    """One step of an LMI-conditioned ε-model (module docstring, steps 1–4).

    Inputs as the graph's, in the order of ``INPUTS`` (scalars as (1,) tensors); returns
    (x_prev, x0_pred).
    """

    def __init__(self, denoiser: LMIDenoiser, *, clip: tuple[float, float] | None = DATA_RANGE):
        super().__init__()
        self.denoiser = denoiser.eval()
        self.clip = clip

    def forward(self, x_t, source, lmi_source, timestep, alpha_bar_t, coef_xt, coef_x0, coef_x0_last,
                sigma, noise, x0_last):
        # 1–2. ε_θ([x_t, LMI(source, u(x_t)), LMI(source, source)], t) (paper Eq. 13)
        eps = self.denoiser(x_t, timestep, source, lmi_source)
        # 3. x̂_0 (Ho et al. Eq. 15), clipped (the eager sampler's own function)
        x0 = predict_x0(eps, x_t, alpha_bar_t.reshape(-1, 1, 1, 1), self.clip)
        # 4. the one update of every sampler
        scalars = [v.reshape(-1, 1, 1, 1) for v in (coef_xt, coef_x0, coef_x0_last, sigma)]
        return combine(x_t, x0, x0_last, noise, *scalars), x0


def lmi_settings(config: LMIConfig) -> dict:
    """The manifest's ``lmi`` entry (checked by lmi_onnx.lmi_params)."""
    return lmi_onnx.lmi_params(**config.lmi_kwargs())


def _rebuild_lmi_nodes(model: onnx.ModelProto, params: dict) -> int:
    """Give every traced ``galip::LMI`` node the exact attributes of ``lmi_node``; count them."""
    count = 0
    for i, node in enumerate(model.graph.node):
        if (node.domain, node.op_type) == (lmi_onnx.DOMAIN, lmi_onnx.OP_TYPE):
            rebuilt = lmi_onnx.lmi_node(node.input[0], node.input[1], tuple(node.output),
                                        name=node.name or f"lmi_{count}", **params)
            model.graph.node[i].CopyFrom(rebuilt)
            count += 1
    return count


def export_step(denoiser: LMIDenoiser, *, opset: int = DEFAULT_OPSET,
                clip: tuple[float, float] | None = DATA_RANGE,
                trace_size: int | None = None) -> onnx.ModelProto:
    """The checked fp32 step graph of ``denoiser`` (one ``galip::LMI`` node + its function)."""
    multiple = denoiser.net.config.size_multiple
    size = trace_size or max(multiple, 32 // multiple * multiple)
    n = 2
    image = lambda: torch.rand(n, 1, size, size)     # noqa: E731
    scalars = (500.0, 0.5, 0.9, 0.3, -0.1, 0.1)     # timestep, ᾱ_t, c_x, c_0, c_1, σ
    args = (image() * 2 - 1, image(), image(), *(torch.tensor([v]) for v in scalars),
            torch.randn(n, 1, size, size), image() * 2 - 1)
    spatial = {0: "N", 2: "H", 3: "W"}
    dynamic = {name: spatial for name in (*IMAGE_INPUTS, *STATE_INPUTS, *OUTPUTS)}
    model = torch_to_onnx(DiffusionStep(placeholder_denoiser(denoiser), clip=clip), args,
                          list(INPUTS), list(OUTPUTS), dynamic, opset=opset,
                          custom_opsets={lmi_onnx.DOMAIN: 1})
    params = lmi_settings(denoiser.lmi_config)
    found = _rebuild_lmi_nodes(model, params)
    if found != 1:
        raise ValueError(f"expected exactly one galip::LMI node in the step graph, found {found}")
    lmi_onnx.add_lmi_function(model, params)
    lmi_onnx.check_lmi_nodes(model)
    model.doc_string = ("galip MIDiffusion step of an LMI-conditioned epsilon-model: x_prev = "
                        "coef_xt*x_t + coef_x0*x0 + coef_x0_last*x0_last + sigma*noise (inputs "
                        f"{', '.join(INPUTS)} -> x_prev, x0_pred)")
    return check_graph(model, allowed_custom=[(lmi_onnx.DOMAIN, lmi_onnx.OP_TYPE)])


def update_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the step graph's nodes outside the score network (conditioning, LMI, the
    update): the fp16 graph keeps them fp32 (x̂_0 divides by √ᾱ_t, about 0.006 at t = T)."""
    names = [n.name for n in model.graph.node]
    if not any(name.startswith(NET_SCOPE) for name in names):
        raise ValueError(f"no node of the step graph is in the score network's scope {NET_SCOPE!r}; "
                         "the exporter's node naming changed: update NET_SCOPE")
    return [name for name in names if not name.startswith(NET_SCOPE)]


def export_lmi(params: dict, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The checked standalone ``lmi.onnx`` (x, y → lmi, y_at) for LMI(source, source)."""
    model = lmi_onnx.lmi_model(**params, opset=opset)
    return check_graph(model, allowed_custom=[(lmi_onnx.DOMAIN, lmi_onnx.OP_TYPE)])


def sampler_entry(schedule: DDPMSchedule, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                  eta: float = DEFAULT_ETA) -> dict:
    """The manifest's ``sampler`` defaults: ``sampler`` with ``steps`` (at most T) and ``eta``,
    and the timestep spacing the PyTorch samplers use (so runtime and eager pick the same
    steps). The table is built here once, so a bundle never carries a sampler it refuses."""
    T = schedule.num_timesteps
    steps = T if sampler == "ddpm" or steps is None else min(steps, T)
    eta = float(eta) if sampler == "ddim" else 0.0       # ddpm's η = 1 is implied, dpmpp2m has none
    step_table(schedule.noise_schedule, sampler, None if sampler == "ddpm" else steps, eta, DEFAULT_SPACING)
    return SamplerDefaults(sampler, steps, eta, DEFAULT_SPACING).to_manifest()


def data_range_entry(info: dict) -> list[float]:
    """Model space of x_0 as stored in the checkpoint (default [−1, 1])."""
    stored = (info.get("config") or {}).get("data_range") or DATA_RANGE
    return [float(v) for v in stored]
