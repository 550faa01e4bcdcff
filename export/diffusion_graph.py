"""One MIDiffusion sampling step as one ONNX graph: LMI + score network + DDIM update.

Graph ``diffusion_<T>_step.onnx`` (the bundle contract, ``models.diffusion.<T>``)::

    x_t, source, lmi_source, noise   float32 [N, 1, H, W]
    timestep, alpha_bar_t, alpha_bar_prev, sigma   float32 [1]
    → x_prev, x0_pred                float32 [N, 1, H, W]

Inside, in this order (paper Eq. 13; Song et al. 2021 Eq. 12):

1. cond = [LMI(source, u(x_t)), lmi_source] through the ONE conditioning function of
   training (``galip.train.midiffusion.conditioning.condition``), so the x_t → [0, 1]
   map and the LMI settings cannot drift from what the network was trained with;
2. ε = net([x_t, cond], timestep);
3. x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, clipped to the data range with ε recomputed from the
   clipped x̂_0 (``clip_x0``, as the PyTorch samplers do by default);
4. x_prev = √ᾱ_prev x̂_0 + √max(0, 1 − ᾱ_prev − σ²) ε + σ · noise.

The runtime computes (timestep, ᾱ_t, ᾱ_prev, σ) per step from the manifest's schedule and
sampler, so one graph serves DDIM with any step count and η, and DDPM (= DDIM, η = 1, all
T steps).

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
from galip.runtime.contract import DEFAULT_STEPS, LMI_GRAPH_INPUTS, LMI_GRAPH_OUTPUTS, SamplerDefaults, io_entry
from galip.runtime.contract import STEP_IMAGE_INPUTS as IMAGE_INPUTS, STEP_INPUTS as INPUTS  # noqa: F401
from galip.runtime.contract import STEP_OUTPUTS as OUTPUTS, STEP_SCALAR_INPUTS as SCALAR_INPUTS
from galip.export.generator_graph import DEFAULT_OPSET, check_graph, torch_to_onnx
from galip.train.midiffusion.conditioning import LMIConfig, LMIDenoiser
from galip.train.midiffusion import schedule as _schedule
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
    """One generalised DDIM step of an LMI-conditioned ε-model (module docstring, steps 1–4).

    Inputs as the graph's (scalars as (1,) tensors); returns (x_prev, x0_pred).
    """

    def __init__(self, denoiser: LMIDenoiser, *, clip_x0: bool = True):
        super().__init__()
        self.denoiser = denoiser.eval()
        self.clip_x0 = clip_x0

    def forward(self, x_t, source, lmi_source, timestep, alpha_bar_t, alpha_bar_prev, sigma, noise):
        # 1–2. ε_θ([x_t, LMI(source, u(x_t)), LMI(source, source)], t) (paper Eq. 13)
        eps = self.denoiser(x_t, timestep, source, lmi_source)
        ab_t = alpha_bar_t.reshape(-1, 1, 1, 1)
        ab_prev = alpha_bar_prev.reshape(-1, 1, 1, 1)
        sigma = sigma.reshape(-1, 1, 1, 1)
        # 3. x̂_0 (Ho et al. Eq. 15), clipped, ε recomputed (the samplers' own function)
        x0, eps = predict_x0(eps, x_t, ab_t, self.clip_x0)
        # 4. Song et al. Eq. 12
        direction = (1.0 - ab_prev - sigma * sigma).clamp(min=0.0).sqrt() * eps
        return ab_prev.sqrt() * x0 + direction + sigma * noise, x0


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


def export_step(denoiser: LMIDenoiser, *, opset: int = DEFAULT_OPSET, clip_x0: bool = True,
                trace_size: int | None = None) -> onnx.ModelProto:
    """The checked fp32 step graph of ``denoiser`` (one ``galip::LMI`` node + its function)."""
    multiple = denoiser.net.config.size_multiple
    size = trace_size or max(multiple, 32 // multiple * multiple)
    n = 2
    image = lambda: torch.rand(n, 1, size, size)     # noqa: E731
    args = (image() * 2 - 1, image(), image(), torch.tensor([500.0]), torch.tensor([0.5]),
            torch.tensor([0.6]), torch.tensor([0.1]), torch.randn(n, 1, size, size))
    spatial = {0: "N", 2: "H", 3: "W"}
    dynamic = {name: spatial for name in (*IMAGE_INPUTS, "noise", *OUTPUTS)}
    model = torch_to_onnx(DiffusionStep(placeholder_denoiser(denoiser), clip_x0=clip_x0), args,
                          [*IMAGE_INPUTS, *SCALAR_INPUTS, "noise"], list(OUTPUTS), dynamic, opset=opset,
                          custom_opsets={lmi_onnx.DOMAIN: 1})
    params = lmi_settings(denoiser.lmi_config)
    found = _rebuild_lmi_nodes(model, params)
    if found != 1:
        raise ValueError(f"expected exactly one galip::LMI node in the step graph, found {found}")
    lmi_onnx.add_lmi_function(model, params)
    lmi_onnx.check_lmi_nodes(model)
    model.doc_string = ("galip MIDiffusion step: generalised DDIM update of an LMI-conditioned "
                        "epsilon-model (inputs x_t, source, lmi_source, timestep, alpha_bar_t, "
                        "alpha_bar_prev, sigma, noise -> x_prev, x0_pred)")
    return check_graph(model, allowed_custom=[(lmi_onnx.DOMAIN, lmi_onnx.OP_TYPE)])


def update_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the step graph's nodes outside the score network (conditioning, LMI, DDIM
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


def sampler_entry(schedule: DDPMSchedule, steps: int = DEFAULT_STEPS) -> dict:
    """The manifest's ``sampler`` defaults: DDIM, ``steps`` (at most T), η = 0, and the
    timestep spacing the PyTorch samplers use (so runtime and eager pick the same steps)."""
    return SamplerDefaults(steps=min(steps, schedule.num_timesteps), spacing=_schedule.DEFAULT_SPACING).to_manifest()


def data_range_entry(info: dict) -> list[float]:
    """Model space of x_0 as stored in the checkpoint (default [−1, 1])."""
    stored = (info.get("config") or {}).get("data_range") or DATA_RANGE
    return [float(v) for v in stored]
