"""Generator graph, fp16 conversion, parity comparators and the TensorRT builder (to the API).

Tiny random-weight generators keep the ONNX export at seconds; the fp32 graph must match
eager PyTorch (EMA weights, eval) to 1e-4 at several sizes and batches, the fp16 graph the
fp32 graph to >= 45 dB PSNR on phantom-like slices. TensorRT is not installable here: the
builder is driven against a fake ``tensorrt`` module that records every call.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from helpers_export import generator_payload, ort_session, phantom_slices

ort = pytest.importorskip("onnxruntime")

from galip.export import parity  # noqa: E402
from galip.export.fp16 import KEEP_FP32_OPS, io_types, to_fp16  # noqa: E402
from galip.export.generator_graph import (check_graph, export_generator,  # noqa: E402
                                          generator_from_payload)
from galip.runtime.errors import BackendError  # noqa: E402


@pytest.fixture(scope="module")
def payload():
    return generator_payload(seed=0)


@pytest.fixture(scope="module")
def eager(payload):
    _, unet, context, domains = generator_from_payload(payload)
    class_ids = torch.tensor([d["class_id"] for d in domains])

    def run(image: np.ndarray, domain: np.ndarray) -> np.ndarray:
        index = torch.as_tensor([int(torch.nonzero(class_ids == c)) for c in domain])
        with torch.no_grad():
            return unet(torch.from_numpy(image), context[index], torch.as_tensor(domain)).numpy()
    return run


@pytest.fixture(scope="module")
def graph(payload):
    return export_generator(payload, opset=18)


@pytest.fixture(scope="module")
def session(graph):
    return ort_session(graph)


@pytest.fixture(scope="module")
def graph_fp16(graph):
    before = graph.SerializeToString()
    half = to_fp16(graph, spatial_inputs=["image"])
    assert graph.SerializeToString() == before         # the fp32 model is left alone
    return half


def _run(session, image, domain):
    return session.run(["translated"], {"image": image, "domain": np.asarray(domain, np.int64)})[0]


# ----------------------------------------------------------------------------- fp32 graph
@pytest.mark.parametrize("n, h, w", [(1, 32, 32), (3, 64, 96)])
def test_fp32_graph_matches_eager_random_inputs(session, eager, n, h, w):
    rng = np.random.default_rng(n * h + w)
    image = rng.random((n, 1, h, w), dtype=np.float32)
    domain = np.array([0, 1, 2][:n] if n <= 3 else rng.integers(0, 3, n), np.int64)
    result = parity.compare(_run(session, image, domain), eager(image, domain), max_abs=1e-4,
                            name="translated")
    assert result, result


@pytest.mark.parametrize("n, h, w", [(1, 64, 64), (3, 32, 64)])
def test_fp32_graph_matches_eager_on_phantom_slices(session, eager, n, h, w):
    image = phantom_slices(n, h, w, seed=n)
    domain = np.array([2, 0, 1][:n], np.int64)
    reference = eager(image, domain)
    assert reference.std() > 0.05                     # random weights: a non-trivial output
    result = parity.compare(_run(session, image, domain), reference, max_abs=1e-4)
    assert result, result


def test_graph_with_an_intensity_curve_matches_eager():
    from helpers_export import TINY_UNET
    payload = generator_payload(seed=3, unet={**TINY_UNET, "curve_knots": 8})
    _, unet, context, _ = generator_from_payload(payload)
    assert unet.curve.to_values.weight.abs().sum() > 0              # randomised, not the zero start
    image = np.random.default_rng(3).random((2, 1, 64, 32), dtype=np.float32)
    domain = np.array([0, 2], np.int64)
    with torch.no_grad():
        expected = unet(torch.from_numpy(image), context[torch.as_tensor(domain)], torch.as_tensor(domain)).numpy()
    result = parity.compare(_run(ort_session(export_generator(payload, opset=18)), image, domain), expected,
                            max_abs=1e-4, name="translated")
    assert result, result


def test_domain_table_is_used(session):
    image = np.repeat(phantom_slices(1, 32, 32), 3, axis=0)
    out = _run(session, image, [0, 1, 2])
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(out[a] - out[b]).max() > 1e-3, (a, b)


def test_graph_contract(graph):
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert {n.domain for n in graph.graph.node} <= {""}
    inputs = {v.name: v.type.tensor_type for v in graph.graph.input}
    assert list(inputs) == ["image", "domain"]
    assert inputs["image"].elem_type == TensorProto.FLOAT and inputs["domain"].elem_type == TensorProto.INT64
    dims = [d.dim_param or d.dim_value for d in inputs["image"].shape.dim]
    assert dims == ["N", 1, "H", "W"]
    assert [d.dim_param for d in inputs["domain"].shape.dim] == ["N"]
    (output,) = graph.graph.output
    assert output.name == "translated"
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["N", 1, "H", "W"]
    # the domain only selects rows of constant tables: every reader of it is a Gather
    readers = [n.op_type for n in graph.graph.node if "domain" in n.input]
    assert readers and set(readers) == {"Gather"}
    onnx.checker.check_model(graph, full_check=True)


def test_check_graph_rejects_fallback_nodes(graph):
    broken = onnx.ModelProto()
    broken.CopyFrom(graph)
    broken.graph.node[0].domain = "org.pytorch.aten"
    with pytest.raises(ValueError, match="non-standard"):
        check_graph(broken)


def test_wrong_checkpoint_kind_is_a_one_line_error(payload):
    from galip.runtime.errors import ConfigError
    with pytest.raises(ConfigError, match="galip-i2i-generator"):
        generator_from_payload({**payload, "format": "galip-midiffusion"})


# ----------------------------------------------------------------------------- fp16 graph
def test_fp16_graph_keeps_float32_io_and_fp32_islands(graph_fp16):
    assert io_types(graph_fp16) == {"image": TensorProto.FLOAT, "domain": TensorProto.INT64,
                                    "translated": TensorProto.FLOAT}
    types_of = {v.name: v.type.tensor_type.elem_type
                for v in (*graph_fp16.graph.value_info, *graph_fp16.graph.input, *graph_fp16.graph.output)}
    types_of.update({t.name: t.data_type for t in graph_fp16.graph.initializer})
    kept = [n for n in graph_fp16.graph.node if n.op_type in KEEP_FP32_OPS]
    assert {n.op_type for n in kept} >= {"Softmax", "LayerNormalization", "InstanceNormalization"}
    for node in kept:
        assert types_of[node.input[0]] == TensorProto.FLOAT, node.name
    conv_weights = [types_of[n.input[1]] for n in graph_fp16.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(t == TensorProto.FLOAT16 for t in conv_weights)


def test_fp16_graph_psnr_on_phantom_slices(session, graph_fp16):
    half = ort_session(graph_fp16)
    image = phantom_slices(3, 64, 64, seed=7)
    domain = np.array([0, 1, 2], np.int64)
    result = parity.compare(_run(half, image, domain), _run(session, image, domain),
                            min_psnr=45.0, data_range=1.0, name="translated fp16")
    assert result, result


# ----------------------------------------------------------------------------- parity objects
def test_parity_comparison_objects():
    ref = np.linspace(0, 1, 100, dtype=np.float32).reshape(1, 1, 10, 10)
    good = parity.compare(ref + 1e-6, ref, max_abs=1e-5, mean_abs=1e-5, min_psnr=60, name="x")
    assert good and good.passed
    assert str(good).startswith("x: PASS max-abs 1.01e-06 <= 1e-05, mean-abs")
    bad = parity.compare(ref + 0.1, ref, max_abs=1e-3, name="x")
    assert not bad and "FAIL" in str(bad) and "max-abs 0.1 > 0.001" in str(bad)
    assert abs(bad.psnr - 20.0) < 1e-3                       # range 1, rmse 0.1
    assert parity.compare(ref, ref).psnr == float("inf")
    shape = parity.compare(ref[..., :5], ref, max_abs=1.0)
    assert not shape and "shape" in str(shape)
    nan = ref.copy()
    nan[0, 0, 0, 0] = np.nan
    assert not parity.compare(nan, ref, max_abs=1.0)
    report = parity.compare_outputs({"a": ref, "b": ref + 1}, {"a": ref, "b": ref, "c": ref}, max_abs=1e-3)
    assert not report and report["a"] and not report["b"] and not report["c"]
    assert len(str(report).splitlines()) == 3
    assert parity.compare(torch.from_numpy(ref), ref, max_abs=0.0)     # tensors accepted


# ----------------------------------------------------------------------------- TensorRT builder
class FakeTRT:
    """A stand-in ``tensorrt`` module recording the calls made on it, in order.

    As strict as the real API on what galip relies on: ``version="11.4.0.106"`` has no
    ``BuilderFlag.FP16`` (removed in TensorRT 11); ``set_timing_cache`` returns whether it
    took the cache (a b"STALE" one is refused); the parser reads the graph and, as TensorRT
    does, makes one PLUGIN_V3 layer per ``galip::LMI`` node only when the plugin was
    registered (``plugin_registered``), else it inlines the function body (plain layers).
    """

    def __init__(self, strongly_typed: bool = True, parse_ok: bool = True, plan: bytes | None = b"PLAN",
                 version: str = "10.13.0.35", plugin_registered: bool = True):
        self.calls: list[tuple] = []
        calls = self.calls
        self.module = mod = types.ModuleType("tensorrt")
        mod.__version__ = version
        self.plugin_registered = plugin_registered
        fake = self

        class Logger:
            WARNING, INFO, VERBOSE = "W", "I", "V"

            def __init__(self, level):
                calls.append(("Logger", level))

        flags = {"STRONGLY_TYPED": 3} if strongly_typed else {}
        mod.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        builder_flags = {"VERSION_COMPATIBLE": "VERSION_COMPATIBLE"}
        if int(version.split(".")[0]) < 11:
            builder_flags["FP16"] = "FP16"
        mod.BuilderFlag = types.SimpleNamespace(**builder_flags)
        mod.LayerType = types.SimpleNamespace(PLUGIN_V3="PLUGIN_V3", ELEMENTWISE="ELEMENTWISE")
        mod.Logger = Logger

        class Cache:
            def serialize(self):
                calls.append(("cache.serialize",))
                return b"CACHE"

        class Config:
            def set_flag(self, flag):
                calls.append(("set_flag", flag))

            def add_optimization_profile(self, profile):
                calls.append(("add_optimization_profile", profile.shapes))

            def create_timing_cache(self, data):
                calls.append(("create_timing_cache", bytes(data)))
                cache = Cache()
                cache.data = bytes(data)
                return cache

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("set_timing_cache", ignore_mismatch))
                return cache.data != b"STALE"

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (list(low), list(opt), list(high))

        class Network:
            def __init__(self):
                self.layers = []

            @property
            def num_layers(self):
                return len(self.layers)

            def get_layer(self, index):
                return types.SimpleNamespace(type=self.layers[index])

        class Builder:
            def __init__(self, logger):
                calls.append(("Builder",))

            def create_network(self, flags):
                calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                calls.append(("create_builder_config",))
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build_serialized_network", network))
                return plan

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                calls.append(("OnnxParser", network))
                self.network = network

            def parse_from_file(self, path):
                calls.append(("parse_from_file", path))
                model = onnx.load(path, load_external_data=False)
                for node in model.graph.node:
                    lmi = (node.domain, node.op_type) == ("galip", "LMI")
                    if lmi and fake.plugin_registered:
                        self.network.layers.append("PLUGIN_V3")
                    else:        # TensorRT inlines an unregistered op's local function
                        self.network.layers.append("ELEMENTWISE")
                return parse_ok

            def get_error(self, i):
                return "node LMI: plugin not found"

        mod.Builder, mod.OnnxParser = Builder, OnnxParser


def lmi_graph(path) -> str:
    """A graph with one galip::LMI node (the real lmi.onnx), saved at ``path``."""
    from galip.export.lmi_onnx import lmi_model
    onnx.save(lmi_model(), path)
    return path


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # import tensorrt → ImportError


def _fake(monkeypatch, **kwargs) -> FakeTRT:
    fake = FakeTRT(**kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    from galip.runtime import device_info
    monkeypatch.setattr(device_info, "gpu_compute_capability", lambda device=0: "9.0")
    return fake


PROFILES = {"image": ([1, 1, 32, 32], [8, 1, 256, 256], [32, 1, 512, 512]), "domain": ([1], [8], [32])}


def test_builder_imports_and_explains_without_tensorrt(no_tensorrt, tmp_path):
    from galip.export.tensorrt import builder
    assert "TensorRT not installed: pip install 'galip[gpu]'" in builder.unavailable_reason()
    with pytest.raises(builder.TensorRTUnavailable, match="not installed"):
        builder.build_engine(tmp_path / "g.onnx", tmp_path / "g.engine", fp16=True, profiles=PROFILES)


def test_builder_drives_the_api_in_order(monkeypatch, tmp_path):
    from galip.export.tensorrt import builder
    fake = _fake(monkeypatch)
    registered = []
    cache = tmp_path / "cache" / "timing.cache"
    step = lmi_graph(tmp_path / "step_fp16.onnx")
    entry = builder.build_engine(step, tmp_path / "step_fp16.engine", fp16=True,
                                 profiles=PROFILES, timing_cache=cache,
                                 register_plugins=lambda: registered.append(len(fake.calls)))
    assert registered == [0]                                   # the plugin before anything else
    names = [c[0] for c in fake.calls]
    assert names == ["Logger", "Builder", "create_network", "OnnxParser", "parse_from_file",
                     "create_builder_config", "add_optimization_profile", "create_timing_cache",
                     "set_timing_cache", "build_serialized_network", "cache.serialize"]
    assert ("create_network", 1 << 3) in fake.calls           # strongly typed
    assert ("set_flag", "FP16") not in fake.calls             # precision comes from the fp16 graph
    assert ("create_timing_cache", b"") in fake.calls         # no cache yet: an empty one
    assert (tmp_path / "step_fp16.engine").read_bytes() == b"PLAN"
    keyed = tmp_path / "cache" / "timing.trt10.13.0.sm_90.cache"   # per TensorRT version and GPU
    assert keyed.read_bytes() == b"CACHE" and not cache.exists()
    assert entry == {"file": "step_fp16.engine", "precision": "fp16", "tensorrt_version": "10.13.0.35",
                     "compute_capability": "9.0", "strongly_typed": True, "version_compatible": False,
                     "profiles": {"image": {"min": [1, 1, 32, 32], "opt": [8, 1, 256, 256], "max": [32, 1, 512, 512]},
                                  "domain": {"min": [1], "opt": [8], "max": [32]}}}
    profile = next(c[1] for c in fake.calls if c[0] == "add_optimization_profile")
    assert profile["image"] == tuple(map(list, PROFILES["image"]))
    # a second build reads the saved cache; another GPU gets its own file
    builder.build_engine(step, tmp_path / "g.engine", fp16=False, profiles=PROFILES,
                         timing_cache=cache, plugins=False)
    assert ("create_timing_cache", b"CACHE") in fake.calls
    assert builder.timing_cache_path(cache, "11.4.0.106", "8.9").name == "timing.trt11.4.0.sm_89.cache"


def test_builder_replaces_a_refused_timing_cache(monkeypatch, tmp_path):
    from galip.export.tensorrt import builder
    fake = _fake(monkeypatch)
    cache = tmp_path / "timing.cache"
    builder.timing_cache_path(cache, "10.13.0.35", "9.0").write_bytes(b"STALE")
    builder.build_engine(lmi_graph(tmp_path / "g.onnx"), tmp_path / "g.engine", fp16=False,
                         profiles=PROFILES, timing_cache=cache, plugins=False)
    made = [c[1] for c in fake.calls if c[0] == "create_timing_cache"]
    assert made == [b"STALE", b""]                             # refused, then an empty one
    assert builder.timing_cache_path(cache, "10.13.0.35", "9.0").read_bytes() == b"CACHE"


def test_builder_weakly_typed_fallback_sets_fp16(monkeypatch, tmp_path):
    from galip.export.tensorrt import builder
    fake = _fake(monkeypatch, strongly_typed=False)
    graph = lmi_graph(tmp_path / "g.onnx")
    entry = builder.build_engine(graph, tmp_path / "g.engine", fp16=True,
                                 profiles=PROFILES, plugins=False)
    assert ("create_network", 0) in fake.calls and ("set_flag", "FP16") in fake.calls
    assert entry["precision"] == "fp16" and entry["strongly_typed"] is False
    assert not any(c[0] == "create_timing_cache" for c in fake.calls)


def test_builder_on_tensorrt_11_never_asks_for_fp16(monkeypatch, tmp_path):
    """TensorRT 11 has no BuilderFlag.FP16: its networks are strongly typed, flag or not."""
    from galip.export.tensorrt import builder
    graph = lmi_graph(tmp_path / "g.onnx")
    for strongly_typed in (True, False):
        fake = _fake(monkeypatch, version="11.4.0.106", strongly_typed=strongly_typed)
        entry = builder.build_engine(graph, tmp_path / "g.engine", fp16=True, profiles=PROFILES,
                                     plugins=False, version_compatible=True)
        assert entry["strongly_typed"] is True and entry["version_compatible"] is True
        assert [c for c in fake.calls if c[0] == "set_flag"] == [("set_flag", "VERSION_COMPATIBLE")]
    _fake(monkeypatch, version="10.13.0.35", strongly_typed=False)
    monkeypatch.delattr(sys.modules["tensorrt"].BuilderFlag, "FP16")
    with pytest.raises(BackendError, match=r"has no BuilderFlag\.FP16, needed for a weakly typed fp16 build"):
        builder.build_engine(graph, tmp_path / "g.engine", fp16=True, profiles=PROFILES, plugins=False)


def test_builder_refuses_an_lmi_node_the_plugin_did_not_take(monkeypatch, tmp_path):
    from galip.export.tensorrt import builder
    _fake(monkeypatch, plugin_registered=False)
    with pytest.raises(BackendError, match=r"made 0 PLUGIN_V3 layer\(s\) for the 1 galip::LMI node\(s\) of "
                                           r"lmi\.onnx: the LMI plugin was not used") as info:
        builder.build_engine(lmi_graph(tmp_path / "lmi.onnx"), tmp_path / "lmi.engine", fp16=False,
                             profiles=PROFILES, register_plugins=lambda: None)
    assert "\n" not in str(info.value) and not (tmp_path / "lmi.engine").exists()


def test_builder_records_the_ptx_and_checks_the_driver(monkeypatch, tmp_path):
    from galip.export.tensorrt import builder, lmi_plugin
    from galip.runtime import device_info
    _fake(monkeypatch)
    ptx = tmp_path / "lmi.ptx"
    ptx.write_text("//\n.version 9.0\n.target sm_80\n.address_size 64\n")
    monkeypatch.setattr(lmi_plugin, "_registered", ptx)
    graph = lmi_graph(tmp_path / "lmi.onnx")
    monkeypatch.setattr(device_info, "driver_version", lambda: 13000)
    entry = builder.build_engine(graph, tmp_path / "lmi.engine", fp16=False, profiles=PROFILES,
                                 register_plugins=lambda: None)
    assert (entry["ptx_isa"], entry["min_driver_cuda"]) == ("9.0", 13000)
    monkeypatch.setattr(device_info, "driver_version", lambda: 12080)
    with pytest.raises(BackendError, match=r"driver too old: the LMI kernel is PTX ISA 9\.0, which needs a "
                                           r"CUDA 13\.0 \(r580\+\) driver; this driver supports CUDA 12\.8: "
                                           r"update the driver, or compile the PTX with an nvcc of CUDA 12\.8"):
        builder.build_engine(graph, tmp_path / "lmi2.engine", fp16=False, profiles=PROFILES,
                             register_plugins=lambda: None)


def test_builder_errors_are_one_line(monkeypatch, tmp_path):
    from galip.export.tensorrt import builder
    graph = lmi_graph(tmp_path / "g.onnx")
    _fake(monkeypatch, parse_ok=False)
    with pytest.raises(BackendError, match="parser rejected g.onnx: node LMI: plugin not found"):
        builder.build_engine(graph, tmp_path / "g.engine", fp16=True, profiles=PROFILES,
                             plugins=False)
    _fake(monkeypatch, plan=None)
    with pytest.raises(BackendError, match="could not build"):
        builder.build_engine(graph, tmp_path / "g.engine", fp16=True, profiles=PROFILES,
                             plugins=False)
    assert not (tmp_path / "g.engine").exists()
    with pytest.raises(BackendError, match="min <= opt <= max"):
        builder.build_engine(graph, tmp_path / "g.engine", fp16=True, plugins=False,
                             profiles={"image": ([1, 1, 64, 64], [1, 1, 32, 32], [1, 1, 64, 64])})


def test_runtime_only_tensorrt_counts_as_unavailable(monkeypatch):
    from galip.export.tensorrt import builder
    lean = types.ModuleType("tensorrt")
    lean.__version__ = "10.13.0.35"
    monkeypatch.setitem(sys.modules, "tensorrt", lean)
    assert "no Builder / OnnxParser" in builder.unavailable_reason()


def test_domain_input_is_the_class_id_not_the_training_index():
    # trained on PD (class 2) and T2 (class 1), in that order: index 0 ≠ class id 2
    payload = generator_payload(seed=4, domains="PD,T2")
    _, unet, context, _ = generator_from_payload(payload)
    session = ort_session(export_generator(payload))
    image = phantom_slices(2, 32, 32, seed=4)
    out = _run(session, image, [2, 1])
    with torch.no_grad():
        ref = unet(torch.from_numpy(image), context[[0, 1]], torch.tensor([2, 1])).numpy()
    result = parity.compare(out, ref, max_abs=1e-4)
    assert result, result
