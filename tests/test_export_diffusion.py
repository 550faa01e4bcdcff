"""The MIDiffusion step graph and lmi.onnx against PyTorch (onnxruntime, CPU).

The step graph (one ``galip::LMI`` node + tiny score network + the update), looped by the
runtime's own sampler (galip.runtime.sampling.run_sampler on onnxruntime), must give the
sample of the eager PyTorch sampler (galip.train.midiffusion.samplers.sample with the real
PyTorch LMI, galip.train.lmi.lmi) for the same seed to 1e-4, for DDPM, DDIM (η > 0) and
DPM-Solver++(2M); lmi.onnx must equal galip.train.lmi.lmi to 1e-5.
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
from galip.runtime.schedule import step_table  # noqa: E402



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


def _feed(x_t, source, lmi_source, table_row: dict, x0_last=None) -> dict:
    scalar = lambda v: np.array([float(v)], np.float32)     # noqa: E731
    return {"x_t": x_t, "source": source, "lmi_source": lmi_source,
            **{name: scalar(v) for name, v in table_row.items()},
            "noise": np.zeros_like(x_t), "x0_last": np.zeros_like(x_t) if x0_last is None else x0_last}


@pytest.mark.parametrize("n, h, w, sampler, steps, eta", [
    (1, 32, 32, "dpmpp2m", 5, 0.0),   # the multistep solver: x0_last carried between steps
    (2, 32, 48, "ddim", 4, 0.7),      # stochastic DDIM: noise drawn by both from SliceNoise
    (2, 16, 32, "ddpm", None, 1.0),   # ancestral, all T steps
])
def test_step_graph_sampling_equals_eager_pytorch(model, step_graph, tmp_path, n, h, w, sampler, steps, eta):
    from galip.runtime.backends.onnxruntime.loader import SessionFromOnnx
    from galip.runtime.backends.onnxruntime.runner import OnnxrtRunner
    from galip.runtime.sampling import run_sampler
    from galip.runtime.schedule import SliceNoise, step_table
    denoiser, schedule, _ = model
    table = step_table(schedule.noise_schedule, sampler, steps, eta)
    source = phantom_slices(n, h, w, seed=n + h)
    src = torch.from_numpy(source)
    eager = samplers.sample(denoiser, src, table, SliceNoise(7, n, (1, h, w))).numpy()
    onnx.save(step_graph, tmp_path / "step.onnx")
    lmi_ss = torch_lmi(src, src, **denoiser.lmi_config.lmi_kwargs())[0].numpy()
    with OnnxrtRunner(SessionFromOnnx(tmp_path / "step.onnx")) as runner:
        x0 = run_sampler(runner, source, lmi_ss, table, SliceNoise(7, n, (1, h, w)))
    bundle = np.clip((x0 + 1) / 2, 0, 1)
    report = parity.compare(bundle, eager, max_abs=1e-4, name=f"{sampler} sample")
    assert report, report
    assert np.abs(eager - eager.mean()).max() > 1e-3       # a sample, not a constant


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
    assert list(inputs) == ["x_t", "source", "lmi_source", "timestep", "alpha_bar_t", "coef_xt", "coef_x0",
                            "coef_x0_last", "sigma", "noise", "x0_last"]
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
    half = to_fp16(step_graph, spatial_inputs=[*dg.IMAGE_INPUTS, *dg.STATE_INPUTS],
                   keep_fp32_nodes=dg.update_nodes(step_graph), allowed_custom=[("galip", "LMI")])
    assert set(io_types(half).values()) == {TensorProto.FLOAT}
    (lmi_node,) = [n for n in half.graph.node if n.op_type == "LMI"]
    inferred = {v.name: v.type.tensor_type.elem_type for v in (*half.graph.value_info, *half.graph.input)}
    assert all(inferred[name] == TensorProto.FLOAT for name in lmi_node.input)
    session = ort_session(half)
    source = phantom_slices(2, 32, 32, seed=11)
    lmi_ss = torch_lmi(torch.from_numpy(source), torch.from_numpy(source))[0].numpy()
    rng = np.random.default_rng(5)
    table = step_table(schedule.noise_schedule, "dpmpp2m", 5)
    for row in list(table.rows())[1::3]:
        feed = _feed(rng.standard_normal(source.shape).astype(np.float32), source, lmi_ss, row,
                     rng.uniform(-1, 1, source.shape).astype(np.float32))
        t = row["timestep"]
        x0_half = session.run(["x0_pred"], feed)[0]
        x0_full = step_session.run(["x0_pred"], feed)[0]
        result = parity.compare(x0_half, x0_full, min_psnr=45.0, data_range=2.0, name=f"x0_pred fp16 t={t}")
        assert result, result


def test_placeholder_is_removed_after_export(model):
    from galip.train.midiffusion import conditioning
    before = conditioning.lmi_map
    dg.export_step(model[0], opset=18, trace_size=8)
    assert conditioning.lmi_map is before


def test_step_graph_clips_x0_to_the_data_range_it_is_given(model):
    """The clip range is the checkpoint's data range (what the manifest records), not a constant."""
    denoiser, schedule, _ = model
    session = ort_session(dg.export_step(denoiser, opset=18, clip=(-0.25, 0.5), trace_size=16))
    source = phantom_slices(1, 16, 16, seed=2)
    lmi_ss = torch_lmi(torch.from_numpy(source), torch.from_numpy(source))[0].numpy()
    row = next(step_table(schedule.noise_schedule, "ddim", 3).rows())      # t = T−1: x̂0 far outside
    feed = _feed(np.random.default_rng(0).standard_normal(source.shape).astype(np.float32) * 3, source, lmi_ss, row)
    x0 = session.run(["x0_pred"], feed)[0]
    assert x0.min() >= -0.25 - 1e-6 and x0.max() <= 0.5 + 1e-6
    assert np.isclose(x0.min(), -0.25) and np.isclose(x0.max(), 0.5)      # the bounds are reached
