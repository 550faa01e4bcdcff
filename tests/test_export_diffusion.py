"""The MIDiffusion step graph and lmi.onnx against PyTorch (onnxruntime, CPU).

The step graph (one ``galip::LMI`` node + tiny score network + DDIM update) must equal the
PyTorch step of ``galip.train.midiffusion.samplers.ddim_step`` with the real PyTorch LMI
(galip.train.lmi.lmi) to 1e-4 for several (t, t_prev, η), and lmi.onnx must equal
galip.train.lmi.lmi to 1e-5.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from helpers_export import diffusion_payload, ort_session, phantom_slices

pytest.importorskip("onnxruntime")

from galip.export import lmi_onnx, parity  # noqa: E402
from galip.export import diffusion_graph as dg
from galip.train.midiffusion.trainer import denoiser_from_payload  # noqa: E402
from galip.export.fp16 import io_types, to_fp16  # noqa: E402
from galip.train.lmi import lmi as torch_lmi  # noqa: E402
from galip.train.midiffusion import samplers  # noqa: E402



@pytest.fixture(scope="module")
def model():
    denoiser, schedule, info = denoiser_from_payload(diffusion_payload(seed=1))
    return denoiser, schedule, info


@pytest.fixture(scope="module")
def step_graph(model):
    return dg.export_step(model[0], opset=18)


@pytest.fixture(scope="module")
def step_session(step_graph):
    return ort_session(step_graph)


@pytest.fixture(scope="module")
def lmi_session(model):
    return ort_session(dg.export_lmi(dg.lmi_settings(model[0].lmi_config), opset=18))


def _feed(x_t, source, lmi_source, t, ab_t, ab_prev, sigma, noise) -> dict:
    scalar = lambda v: np.array([float(v)], np.float32)     # noqa: E731
    return {"x_t": x_t, "source": source, "lmi_source": lmi_source, "timestep": scalar(t),
            "alpha_bar_t": scalar(ab_t), "alpha_bar_prev": scalar(ab_prev), "sigma": scalar(sigma),
            "noise": noise}


def _ddim_table(schedule, t: int, t_prev: int, eta: float):
    """(ᾱ_t, ᾱ_prev, σ) as the runtime computes them (Song et al. Eq. 16)."""
    ab = schedule.alphas_cumprod.double()
    ab_t = float(ab[t])
    ab_prev = float(ab[t_prev]) if t_prev >= 0 else 1.0
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    return ab_t, ab_prev, sigma


@pytest.mark.parametrize("n, h, w, t, t_prev, eta", [
    (1, 32, 32, 19, 14, 0.0),     # early, deterministic DDIM
    (2, 32, 48, 7, 6, 1.0),       # DDPM-like ancestral step
    (2, 16, 32, 0, -1, 0.5),      # last step to x_0
])
def test_step_graph_matches_pytorch_step(model, step_session, n, h, w, t, t_prev, eta):
    denoiser, schedule, _ = model
    rng = np.random.default_rng(t)
    source = phantom_slices(n, h, w, seed=t)
    x_t = rng.standard_normal((n, 1, h, w)).astype(np.float32)
    noise = rng.standard_normal((n, 1, h, w)).astype(np.float32)
    src = torch.from_numpy(source)
    lmi_ss = torch_lmi(src, src, **denoiser.lmi_config.lmi_kwargs())[0]
    with torch.no_grad():
        ref = samplers.ddim_step(denoiser, torch.from_numpy(x_t), torch.tensor([t]), torch.tensor([t_prev]),
                                 torch.from_numpy(noise), src, lmi_ss, schedule.alphas_cumprod, eta=eta)
    x_prev, x0 = step_session.run(["x_prev", "x0_pred"],
                                  _feed(x_t, source, lmi_ss.numpy(), t, *_ddim_table(schedule, t, t_prev, eta), noise))
    report = parity.compare_outputs({"x_prev": x_prev, "x0_pred": x0},
                                    {"x_prev": ref.prev_sample, "x0_pred": ref.pred_original_sample},
                                    max_abs=1e-4)
    assert report, report


def test_step_graph_holds_one_lmi_node_defined_by_the_function(step_graph):
    custom = [n for n in step_graph.graph.node if n.domain != ""]
    assert len(custom) == 1
    (node,) = custom
    assert (node.domain, node.op_type) == ("galip", "LMI")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"galip"
    assert node.input[0] == "source"                   # LMI(source, u(x_t))
    functions = [(f.domain, f.name) for f in step_graph.functions]
    assert functions == [("galip", "LMI")]
    assert any(o.domain == "galip" for o in step_graph.opset_import)
    lmi_onnx.check_lmi_nodes(step_graph)
    onnx.checker.check_model(step_graph, full_check=True)
    inputs = {v.name: v.type.tensor_type for v in step_graph.graph.input}
    assert list(inputs) == ["x_t", "source", "lmi_source", "timestep", "alpha_bar_t", "alpha_bar_prev",
                            "sigma", "noise"]
    assert all(t.elem_type == TensorProto.FLOAT for t in inputs.values())
    assert [d.dim_value for d in inputs["timestep"].shape.dim] == [1]
    assert [d.dim_param or d.dim_value for d in inputs["x_t"].shape.dim] == ["N", 1, "H", "W"]
    assert [v.name for v in step_graph.graph.output] == ["x_prev", "x0_pred"]


def test_lmi_graph_matches_pytorch_lmi(model, lmi_session):
    config = model[0].lmi_config
    x = phantom_slices(2, 24, 40, seed=3)
    y = np.clip(x + 0.1 * np.random.default_rng(0).standard_normal(x.shape), 0, 1).astype(np.float32)
    lmi, y_at = lmi_session.run(["lmi", "y_at"], {"x": x, "y": y})
    ref_lmi, _ = torch_lmi(torch.from_numpy(x), torch.from_numpy(y), **config.lmi_kwargs())
    result = parity.compare(lmi, ref_lmi, max_abs=1e-5, name="lmi")
    assert result, result
    assert y_at.shape == x.shape


def test_fp16_step_graph_psnr_and_float32_io(model, step_graph, step_session):
    denoiser, schedule, _ = model
    half = to_fp16(step_graph, spatial_inputs=[*dg.IMAGE_INPUTS, "noise"],
                   keep_fp32_nodes=dg.update_nodes(step_graph), allowed_custom=[("galip", "LMI")])
    assert set(io_types(half).values()) == {TensorProto.FLOAT}
    (lmi_node,) = [n for n in half.graph.node if n.op_type == "LMI"]
    inferred = {v.name: v.type.tensor_type.elem_type for v in (*half.graph.value_info, *half.graph.input)}
    assert all(inferred[name] == TensorProto.FLOAT for name in lmi_node.input)
    session = ort_session(half)
    source = phantom_slices(2, 32, 32, seed=11)
    lmi_ss = torch_lmi(torch.from_numpy(source), torch.from_numpy(source))[0].numpy()
    rng = np.random.default_rng(5)
    for t, t_prev in [(19, 15), (4, 3)]:
        feed = _feed(rng.standard_normal(source.shape).astype(np.float32), source, lmi_ss, t,
                     *_ddim_table(schedule, t, t_prev, 0.0), np.zeros_like(source))
        x0_half = session.run(["x0_pred"], feed)[0]
        x0_full = step_session.run(["x0_pred"], feed)[0]
        result = parity.compare(x0_half, x0_full, min_psnr=45.0, data_range=2.0, name=f"x0_pred fp16 t={t}")
        assert result, result


def test_placeholder_is_removed_after_export(model):
    from galip.train.midiffusion import conditioning
    before = conditioning.lmi_map
    dg.export_step(model[0], opset=18, trace_size=8)
    assert conditioning.lmi_map is before
