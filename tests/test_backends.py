"""Backends: onnxruntime for real on CPU; CUDA, TensorRT and selection up to the boundary with fakes.

No GPU, TensorRT or cuda-python here: every TensorRT/CUDA test drives fake modules and
checks control flow (copies, addresses, capture/replay), never that an engine ran.
"""
from __future__ import annotations

import ctypes
import enum
import json
import os
import subprocess
import sys
import types

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from galip.runtime import device_info
from galip.runtime.backends.base import Runner, TensorMeta
from galip.runtime.backends.onnxruntime import OnnxrtRunner, SessionFromOnnx, cuda_providers
from galip.runtime.backends.onnxruntime import loader
from galip.runtime.backends.onnxruntime.loader import identity_model_bytes
from galip.runtime.backends.select import engine_mismatch, select_backend
from galip.runtime.backends.tensorrt import EngineFromBytes, TrtRunner
from galip.runtime.bundle import load_bundle, write_manifest
from galip.runtime.errors import BackendError

from test_bundle import base_manifest, tiny_graph

ONE_CARRY = {"x_t": "x_prev"}   # the test step graphs carry x_prev only


def step_graph() -> onnx.ModelProto:
    """x_prev = 0.5 * x_t + noise; all float32[N,1,H,W] (a stand-in diffusion step)."""
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    nodes = [helper.make_node("Mul", ["x_t", "half"], ["m"]), helper.make_node("Add", ["m", "noise"], ["x_prev"])]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1, "H", "W"])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "step", [vi("x_t"), vi("noise")], [vi("x_prev")], [half]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def graph_path(tmp_path):
    path = tmp_path / "generator.onnx"
    onnx.save(tiny_graph(), path)
    return path


@pytest.fixture
def feed():
    rng = np.random.default_rng(0)
    return {"image": rng.random((2, 1, 8, 16), dtype=np.float32), "domain": np.array([1, 3], np.int64)}


def expected(feed):
    return feed["image"] * 2 + feed["domain"].astype(np.float32)[:, None, None, None]


# ----------------------------------------------------------------------------- onnxruntime, real
def test_onnxrt_runner_runs_on_cpu_with_io_binding(graph_path, feed, monkeypatch):
    def no_plain_run(*args, **kwargs):
        raise AssertionError("OnnxrtRunner must use IO binding, not InferenceSession.run")
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", no_plain_run)
    runner = OnnxrtRunner(SessionFromOnnx(graph_path))
    assert runner.session is None and runner.last_inference_time is None     # loader is lazy
    with runner:
        assert runner.is_active and runner.name == "onnxruntime-cpu" and runner.precision == "fp32"
        assert runner.input_names == ["image", "domain"] and runner.output_names == ["translated"]
        assert runner.input_metadata["image"] == TensorMeta("image", np.dtype(np.float32), ("N", 1, "H", "W"))
        assert runner.providers_in_use == ["CPUExecutionProvider"]
        assert runner.session.get_session_options().intra_op_num_threads == loader.default_threads()
        out = runner.infer(feed)
        np.testing.assert_allclose(out["translated"], expected(feed), rtol=1e-6)
        assert runner.last_inference_time > 0
        out = runner.infer({"image": feed["image"][:1, :, :4, :4].astype(np.float64), "domain": np.array([2], np.int32)})
        assert out["translated"].shape == (1, 1, 4, 4) and len(runner.inference_times) == 2
    assert not runner.is_active and runner.session is None
    with pytest.raises(BackendError, match="not active"):
        runner.infer(feed)


def test_default_threads_go_to_idle_cores_and_spin_only_on_an_idle_machine(graph_path, monkeypatch):
    monkeypatch.delenv("GALIP_NUM_THREADS", raising=False)
    monkeypatch.setattr(loader, "_usable_cores", lambda: 2)
    monkeypatch.setattr(loader, "_busy_cores", lambda: 1.2)       # the second core is busy
    assert loader.default_threads() == 1
    monkeypatch.setattr(loader, "_busy_cores", lambda: 3.7)
    assert loader.default_threads() == 1
    monkeypatch.setattr(loader, "_busy_cores", lambda: 0.1)
    assert loader.default_threads() == 2 and loader.default_spinning(2) is None
    monkeypatch.setenv("GALIP_NUM_THREADS", "3")
    assert loader.default_threads() == 3
    monkeypatch.setattr(loader, "_busy_cores", lambda: 1.0)
    assert loader.default_spinning(2) is False and loader.default_spinning(1) is None
    with OnnxrtRunner(SessionFromOnnx(graph_path, threads=2)) as runner:
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with OnnxrtRunner(SessionFromOnnx(graph_path, threads=2, spinning=True,
                                      config={"session.set_denormal_as_zero": "1"})) as runner:
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_runner_feed_errors_are_one_line(graph_path, feed):
    with OnnxrtRunner(SessionFromOnnx(graph_path, threads=1)) as runner:
        assert runner.session.get_session_options().intra_op_num_threads == 1
        with pytest.raises(BackendError, match=r"missing \['domain'\].*expects image: float32\[N,1,H,W\]"):
            runner.infer({"image": feed["image"]})
        with pytest.raises(BackendError, match=r"unknown \['extra'\]"):
            runner.infer({**feed, "extra": feed["domain"]})
        with pytest.raises(BackendError, match="expected rank 4"):
            runner.infer({**feed, "image": feed["image"][0]})
        with pytest.raises(BackendError, match=r"is <U1, expected float32; convert it with \.astype\(np\.float32\)"):
            runner.infer({**feed, "image": np.full((1, 1, 2, 2), "a")})
        with pytest.raises(BackendError, match="already active"):
            runner.activate()


def test_base_run_loop_feeds_output_back(tmp_path):
    onnx.save(step_graph(), tmp_path / "step.onnx")
    rng = np.random.default_rng(1)
    x = rng.random((1, 1, 4, 4), dtype=np.float32)
    noises = [rng.random((1, 1, 4, 4), dtype=np.float32) for _ in range(3)]
    with OnnxrtRunner(SessionFromOnnx(tmp_path / "step.onnx")) as runner:
        out = runner.run_loop({"x_t": x}, [{"noise": n} for n in noises], carry=ONE_CARRY)
    reference = x
    for n in noises:
        reference = 0.5 * reference + n
    np.testing.assert_allclose(out["x_prev"], reference, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_request_that_falls_back_to_cpu_raises(graph_path):
    """The real onnxruntime here has no CUDA provider: the session silently runs on CPU."""
    runner = OnnxrtRunner(SessionFromOnnx(graph_path, cuda_providers()))
    assert runner.device == "cuda" and runner.name == "onnxruntime-cuda"
    with pytest.raises(BackendError, match=r"CUDAExecutionProvider but the session runs on CPUExecutionProvider"
                                           r".*galip\[gpu\]"):
        runner.activate()
    assert not runner.is_active


def test_probe_model_is_valid_onnx():
    model = onnx.load_from_string(identity_model_bytes())
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Identity"] and model.opset_import[0].version == 13
    assert model.ir_version == 8
    session = onnxruntime.InferenceSession(identity_model_bytes(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.array([1.5], np.float32)})[0].tolist() == [1.5]


def test_onnx_missing_says_how_to_install(monkeypatch):
    from galip.runtime.bundle import onnx_external_locations
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendError, match=r"onnx does not import.*galip\[cpu\]"):
        identity_model_bytes()
    with pytest.raises(BackendError, match=r"needs onnx.*galip\[cpu\]"):
        onnx_external_locations(b"")


def test_loader_errors(tmp_path):
    with pytest.raises(BackendError, match="unknown graph_optimization"):
        SessionFromOnnx("x.onnx", graph_optimization="max")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(BackendError, match=r"onnxruntime could not load .*bad\.onnx"):
        SessionFromOnnx(tmp_path / "bad.onnx")()


# ----------------------------------------------------------------------------- onnxruntime CUDA, fakes
class FakeOrtValue:
    made: list = []

    def __init__(self, array, device):
        self.array, self.device, self.updates = np.array(array), device, 0

    @classmethod
    def ortvalue_from_numpy(cls, array, device_type="cpu", device_id=0):
        value = cls(array, (device_type, device_id))
        cls.made.append(value)
        return value

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape, element_type, device_type="cpu", device_id=0):
        return cls.ortvalue_from_numpy(np.zeros(shape, element_type), device_type, device_id)

    def update_inplace(self, array):
        self.array[...] = array
        self.updates += 1

    def numpy(self):
        return self.array.copy()


class FakeBinding:
    def __init__(self):
        self.inputs, self.outputs, self.allocated = {}, {}, {}

    def clear_binding_inputs(self):
        self.inputs.clear()

    def clear_binding_outputs(self):
        self.outputs.clear()

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value

    def bind_output(self, name, device_type="cpu", device_id=0):
        self.outputs[name] = (device_type, device_id)

    def bind_ortvalue_output(self, name, value):
        self.outputs[name] = value

    def get_outputs(self):
        return [self.allocated[n] for n in self.outputs]


class FakeCudaSession:
    """Doubles its single input ``x`` float32[N,K] into ``y`` "on the device"."""

    def __init__(self, providers=("CUDAExecutionProvider", "CPUExecutionProvider")):
        self.providers, self.binding, self.runs = list(providers), FakeBinding(), 0
        arg = lambda n: types.SimpleNamespace(name=n, type="tensor(float)", shape=["N", "K"])  # noqa: E731
        self.inputs, self.outputs = [arg("x")], [arg("y")]

    def get_providers(self):
        return self.providers

    def get_inputs(self):
        return self.inputs

    def get_outputs(self):
        return self.outputs

    def io_binding(self):
        return self.binding

    def run_with_iobinding(self, binding):
        self.runs += 1
        x = binding.inputs["x"]
        assert x.device == ("cuda", 0)
        target = binding.outputs["y"]
        if isinstance(target, FakeOrtValue):
            target.array[...] = 2 * x.array
        else:
            binding.allocated["y"] = FakeOrtValue(2 * x.array, target)


def fake_cuda_runner(monkeypatch, cuda_graph):
    session = FakeCudaSession()
    runner = OnnxrtRunner(SessionFromOnnx("unused.onnx", cuda_providers(cuda_graph=cuda_graph)))
    runner.loader = lambda: session                      # the session onnxruntime-gpu would build
    monkeypatch.setattr(OnnxrtRunner, "_ortvalue", lambda self: FakeOrtValue)
    return runner, session


def test_onnxrt_cuda_binds_device_values(monkeypatch):
    runner, session = fake_cuda_runner(monkeypatch, cuda_graph=False)
    assert not runner.cuda_graph
    with runner:
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], 2 * x)
        assert session.binding.outputs == {"y": ("cuda", 0)}


def test_onnxrt_cuda_graph_keeps_fixed_buffers(monkeypatch):
    runner, session = fake_cuda_runner(monkeypatch, cuda_graph=True)
    assert runner.cuda_graph
    with runner:
        x = np.ones((2, 3), np.float32)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], 2 * x)
        first_input = session.binding.inputs["x"]
        output = session.binding.outputs["y"]
        assert isinstance(output, FakeOrtValue) and output.array.shape == (2, 3)     # shape resolved from N, K
        np.testing.assert_array_equal(runner.infer({"x": 3 * x})["y"], 6 * x)
        assert session.binding.inputs["x"] is first_input and first_input.updates == 1   # same device buffer
        with pytest.raises(BackendError, match=r"captured for input shapes \{'x': \(2, 3\)\}"):
            runner.infer({"x": np.ones((4, 3), np.float32)})


class GraphRefusingLoader(SessionFromOnnx):
    """SessionFromOnnx whose onnxruntime refuses CUDA graphs, as ORT does for a graph with
    nodes off the CUDA provider: at session creation (``when="create"``) or at capture."""

    def __init__(self, providers, when="create"):
        super().__init__("step.onnx", providers)
        self.when, self.sessions = when, []

    def without_cuda_graph(self):
        plain = super().without_cuda_graph()
        refusing = GraphRefusingLoader(plain.providers, self.when)
        refusing.sessions = self.sessions
        return refusing

    def __call__(self):
        graph = self.providers[0][1].get("enable_cuda_graph") == "1"
        if graph and self.when == "create":
            raise BackendError("onnxruntime could not load step.onnx: [ONNXRuntimeError] : 1 : FAIL : This session "
                               "cannot use the CUDA Graph feature as requested by the user as all compute graph "
                               "nodes have not been partitioned to the CUDA EP.; check the bundle")
        session = FakeCudaSession()
        if graph:
            def refuse(binding):
                raise RuntimeError("CUDA failure 901: operation not permitted when stream is capturing")
            session.run_with_iobinding = refuse
        self.sessions.append(session)
        return session


@pytest.mark.parametrize("when", ["create", "capture"])
def test_onnxrt_cuda_graph_refused_falls_back_to_io_binding(monkeypatch, when):
    monkeypatch.setattr(OnnxrtRunner, "_ortvalue", lambda self: FakeOrtValue)
    loader = GraphRefusingLoader(cuda_providers(cuda_graph=True), when)
    runner = OnnxrtRunner(loader)
    assert runner.cuda_graph
    x = np.ones((2, 3), np.float32)
    with pytest.warns(RuntimeWarning, match="refused CUDA graphs .*running with plain IO binding"):
        with runner:
            np.testing.assert_array_equal(runner.infer({"x": x})["y"], 2 * x)
            np.testing.assert_array_equal(runner.infer({"x": 3 * x})["y"], 6 * x)
    assert not runner.cuda_graph
    assert ("CUDA Graph feature" if when == "create" else "stream is capturing") in runner.cuda_graph_error
    assert runner.loader.providers[0][1] == {"device_id": "0"}          # enable_cuda_graph dropped
    assert loader.sessions[-1].binding.outputs == {"y": ("cuda", 0)}    # plain binding, outputs by device


def test_onnxrt_cuda_errors_other_than_graphs_still_raise():
    class Broken(SessionFromOnnx):
        def __call__(self):
            raise BackendError("onnxruntime could not load step.onnx: bad graph; check the bundle")
    with pytest.raises(BackendError, match="bad graph"):
        OnnxrtRunner(Broken("step.onnx", cuda_providers(cuda_graph=False))).activate()


# ----------------------------------------------------------------------------- TensorRT, fakes
class FakeCudart(types.ModuleType):
    """Host memory standing in for device memory; graphs record closures and replay them."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeGlobal = 0
        cudaStreamCaptureModeThreadLocal = 1

    class cudaDeviceAttr(enum.IntEnum):
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.memory, self.capturing, self.graphs, self.launches, self.copies = {}, None, {}, 0, []
        self.streams = set()
        ok = self.cudaError_t.cudaSuccess
        self.cudaGetDeviceCount = lambda: (ok, 1)
        self.cudaDeviceGetAttribute = lambda attr, dev: (ok, 9 if attr == 75 else 0)
        self.cudaGetErrorName = lambda err: (ok, f"error {int(err)}".encode())

    def cudaMalloc(self, nbytes):
        buffer = ctypes.create_string_buffer(nbytes)
        self.memory[ctypes.addressof(buffer)] = buffer
        return self.cudaError_t.cudaSuccess, ctypes.addressof(buffer)

    def cudaFree(self, ptr):
        del self.memory[ptr]
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert stream in self.streams and self.capturing is None
        self.copies.append(kind.name)
        ctypes.memmove(dst, src, nbytes)
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self):
        self.streams.add(77)
        return self.cudaError_t.cudaSuccess, 77

    def cudaStreamSynchronize(self, stream):
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        self.streams.remove(stream)
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        self.graphs[id(graph)] = graph
        return self.cudaError_t.cudaSuccess, id(graph)

    def cudaGraphInstantiate(self, graph, flags):
        return self.cudaError_t.cudaSuccess, ("exec", graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for op in self.graphs[graph_exec[1]]:
            op()
        return (self.cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        return (self.cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec):
        self.graphs.pop(graph_exec[1], None)
        return (self.cudaError_t.cudaSuccess,)


def view(address, shape):
    count = int(np.prod(shape))
    return np.frombuffer((ctypes.c_float * count).from_address(address), np.float32).reshape(shape)


class FakeDriverCudart(FakeCudart):
    """A CUDA 13 runtime on a CUDA 12.8 driver: the runtime refuses the driver, as
    cuda-bindings 13 does on drivers older than r580."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35
        cudaErrorNoDevice = 100

    def __init__(self, driver=12080, runtime=13000, devices=1):
        super().__init__()
        ok, refused = self.cudaError_t.cudaSuccess, self.cudaError_t.cudaErrorInsufficientDriver
        self.cudaDriverGetVersion = lambda: (ok, driver)
        self.cudaRuntimeGetVersion = lambda: (ok, runtime)
        if driver // 1000 < runtime // 1000:
            self.cudaGetDeviceCount = lambda: (refused, 0)
        elif devices == 0:
            self.cudaGetDeviceCount = lambda: (self.cudaError_t.cudaErrorNoDevice, 0)


class FakeContext:
    """Execution context of the step engine: x_prev = 0.5 * x_t + noise, at bound addresses."""

    def __init__(self, cudart):
        self.cudart, self.shapes, self.addresses, self.executions = cudart, {}, {}, 0

    def set_input_shape(self, name, shape):
        if not (1 <= shape[0] <= 4 and shape[2] <= 32 and shape[3] <= 32):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes.get(name, self.shapes.get("x_t"))

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        assert stream == 77
        shape, a = self.shapes["x_t"], dict(self.addresses)     # a real graph bakes the addresses in

        def op():
            self.executions += 1
            x_t = view(a["x_t"], shape).copy()
            if "x0_last" in a:      # the two-carry engine: x_prev also reads x0_last, x0_pred = x_t
                view(a["x_prev"], shape)[...] = 0.5 * x_t + 0.25 * view(a["x0_last"], shape) + view(a["noise"], shape)
                view(a["x0_pred"], shape)[...] = x_t
            else:
                view(a["x_prev"], shape)[...] = 0.5 * x_t + view(a["noise"], shape)
        if self.cudart.capturing is not None:
            self.cudart.capturing.append(op)
        else:
            op()
        return True


def fake_tensorrt(cudart, name="tensorrt", carries=1):
    """``tensorrt`` whose Runtime deserialises b"ENGINE" (a plain plan) and b"VC-ENGINE" (a
    version-compatible plan, only with ``engine_host_code_allowed``, as the real runtime);
    ``name="tensorrt_lean"``: the lean runtime, which refuses every plan but a
    version-compatible one."""
    trt = types.ModuleType(name)
    trt.__version__ = "10.13.0.35"
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.nptype = lambda dtype: dtype
    trt.Logger = type("Logger", (), {"WARNING": 2, "INFO": 3, "__init__": lambda self, level: None})
    tensors = {"x_t": trt.TensorIOMode.INPUT, "noise": trt.TensorIOMode.INPUT, "x_prev": trt.TensorIOMode.OUTPUT}
    if carries == 2:        # the diffusion step's carry: x_t <- x_prev and x0_last <- x0_pred
        tensors = {**tensors, "x0_last": trt.TensorIOMode.INPUT, "x0_pred": trt.TensorIOMode.OUTPUT}
    engine = types.SimpleNamespace(
        num_io_tensors=len(tensors), get_tensor_name=lambda i: list(tensors)[i], get_tensor_mode=tensors.__getitem__,
        get_tensor_dtype=lambda name: np.float32, get_tensor_shape=lambda name: (-1, 1, -1, -1),
        get_tensor_profile_shape=lambda name, profile: ((1, 1, 1, 1), (2, 1, 16, 16), (4, 1, 32, 32)),
    )
    engine.contexts = []
    engine.create_execution_context = lambda: engine.contexts.append(FakeContext(cudart)) or engine.contexts[-1]

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            if data == b"VC-ENGINE":
                return engine if self.engine_host_code_allowed else None
            return engine if data == b"ENGINE" and name == "tensorrt" else None
    trt.Runtime = Runtime
    return trt, engine


@pytest.fixture
def fake_gpu(monkeypatch):
    cudart = FakeCudart()
    trt, engine = fake_tensorrt(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(device_info, "import_cudart", lambda: cudart)
    return cudart, engine


def loop_inputs(seed=0, steps=4):
    rng = np.random.default_rng(seed)
    x = rng.random((2, 1, 8, 8), dtype=np.float32)
    noises = [rng.random((2, 1, 8, 8), dtype=np.float32) for _ in range(steps)]
    reference = x
    for n in noises:
        reference = 0.5 * reference + n
    return x, noises, reference


def test_trt_runner_infer_with_fakes(fake_gpu, tmp_path):
    cudart, engine = fake_gpu
    (tmp_path / "e.engine").write_bytes(b"ENGINE")
    runner = TrtRunner(EngineFromBytes(tmp_path / "e.engine"))
    with runner:
        assert runner.input_names == ["x_t", "noise"] and runner.output_names == ["x_prev"]
        x, noises, _ = loop_inputs(steps=1)
        out = runner.infer({"x_t": x, "noise": noises[0]})
        np.testing.assert_allclose(out["x_prev"], 0.5 * x + noises[0], rtol=1e-6)
        assert runner.last_inference_time > 0 and len(cudart.memory) == 3
        with pytest.raises(BackendError, match=r"outside the engine's profile \(1, 1, 1, 1\)\.\.\(4, 1, 32, 32\)"):
            runner.infer({"x_t": np.zeros((8, 1, 8, 8), np.float32), "noise": np.zeros((8, 1, 8, 8), np.float32)})
    assert cudart.memory == {} and cudart.streams == set()                     # deactivate freed everything
    assert runner.context is None and runner.engine is None
    with pytest.raises(BackendError, match="could not deserialize"):
        EngineFromBytes(b"garbage")()


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trt_run_loop_keeps_carry_on_device(fake_gpu, cuda_graph):
    cudart, engine = fake_gpu
    x, noises, reference = loop_inputs(steps=5)
    with TrtRunner(EngineFromBytes(b"ENGINE"), cuda_graph=cuda_graph) as runner:
        out = runner.run_loop({"x_t": x}, [{"noise": n} for n in noises], carry=ONE_CARRY)
        np.testing.assert_allclose(out["x_prev"], reference, rtol=1e-5)
        # x_t uploaded once, noise once per step, x_prev downloaded once: the carry never left the device
        assert cudart.copies.count("cudaMemcpyHostToDevice") == 1 + 5
        assert cudart.copies.count("cudaMemcpyDeviceToHost") == 1
        assert runner.cuda_graph_error is None
        assert (len(cudart.graphs), cudart.launches) == ((2, 5) if cuda_graph else (0, 0))   # ping + pong
        with pytest.raises(BackendError, match=r"feeds \['x_t'\], which the loop carries"):
            runner.run_loop({"x_t": x}, [{"noise": noises[0]}, {"x_t": x}], carry=ONE_CARRY)
        with pytest.raises(BackendError, match="changes shapes"):
            runner.run_loop({"x_t": x}, [{"noise": noises[0]}, {"noise": noises[0][:1]}], carry=ONE_CARRY)
        out = runner.infer({"x_t": x, "noise": noises[0]})                # plain infer after a loop
        np.testing.assert_allclose(out["x_prev"], 0.5 * x + noises[0], rtol=1e-6)


def test_trt_capture_failure_falls_back(fake_gpu, monkeypatch):
    cudart, engine = fake_gpu
    monkeypatch.setattr(cudart, "cudaStreamBeginCapture",
                        lambda stream, mode: (cudart.cudaError_t.cudaErrorMemoryAllocation,), raising=False)
    x, noises, reference = loop_inputs(steps=3)
    with TrtRunner(EngineFromBytes(b"ENGINE"), cuda_graph=True) as runner:
        out = runner.run_loop({"x_t": x}, [{"noise": n} for n in noises], carry=ONE_CARRY)
        assert not runner.cuda_graph and "cudaStreamBeginCapture failed with error 2" in runner.cuda_graph_error
    np.testing.assert_allclose(out["x_prev"], reference, rtol=1e-5)


def test_device_info_with_fake_cudart(fake_gpu):
    device_info.gpu_compute_capability.cache_clear()
    try:
        assert device_info.gpu_compute_capability() == "9.0"
        assert device_info.tensorrt_version() == "10.13.0.35"
        assert device_info.describe() == "GPU sm_90, TensorRT 10.13.0.35"
    finally:
        device_info.gpu_compute_capability.cache_clear()


def test_driver_too_old_is_said(monkeypatch):
    """cuda-bindings 13 on a CUDA 12.8 driver: 'driver too old', not 'no CUDA GPU found'."""
    cudart = FakeDriverCudart(driver=12080, runtime=13000)
    monkeypatch.setattr(device_info, "import_cudart", lambda: cudart)
    monkeypatch.setattr(device_info, "cudart_problem", lambda: None)
    device_info.gpu_compute_capability.cache_clear()
    try:
        assert device_info.gpu_compute_capability() is None
        assert device_info.driver_version() == 12080 and device_info.runtime_version() == 13000
        problem = device_info.gpu_problem()
        assert problem.startswith("driver too old: cuda-python is built for CUDA 13.0, this driver "
                                  "supports CUDA 12.8") and "galip[gpu-cu12]" in problem
        cudart = FakeDriverCudart(driver=13000, runtime=13000, devices=0)
        monkeypatch.setattr(device_info, "import_cudart", lambda: cudart)
        device_info.gpu_compute_capability.cache_clear()
        assert device_info.gpu_problem() == "no CUDA GPU found"
    finally:
        device_info.gpu_compute_capability.cache_clear()


def test_tensorrt_whose_libraries_do_not_load(monkeypatch, tmp_path):
    """An installed tensorrt whose shared libraries are missing is not 'not installed'."""
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('libnvinfer.so.10: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("tensorrt", "tensorrt_lean"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert device_info.import_tensorrt() is None
    assert device_info.tensorrt_problem() == (
        "TensorRT libraries do not load: ImportError: libnvinfer.so.10: cannot open shared object file: "
        "No such file or directory")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    assert device_info.tensorrt_problem() == "not installed"


def test_modules_import_without_tensorrt_or_cuda_python():
    code = (
        "import sys\n"
        "for name in ('tensorrt', 'tensorrt_lean', 'cuda', 'cuda.bindings', 'cuda.bindings.runtime', 'cuda.cudart'):\n"
        "    sys.modules[name] = None\n"
        "import galip.runtime.backends.tensorrt.runner as r, galip.runtime.backends.tensorrt.loader\n"
        "import galip.runtime.backends.select\n"
        "from galip.runtime import device_info\n"
        "from galip.runtime.errors import BackendError\n"
        "assert device_info.gpu_compute_capability() is None and device_info.tensorrt_version() is None\n"
        "lazy = [m for m in ('onnx', 'onnxruntime', 'torch') if m in sys.modules]\n"
        "assert not lazy, f'imported at module load: {lazy}'\n"
        "try:\n"
        "    r.TrtRunner(r.EngineFromBytes(b'x')).activate()\n"
        "except BackendError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "TensorRT is not installed" in done.stdout and "galip[gpu]" in done.stdout


def test_runtime_never_imports_torch():
    code = (
        "import importlib, json, pkgutil, sys, galip.runtime as rt\n"
        "failed = {}\n"
        "for info in pkgutil.walk_packages(rt.__path__, 'galip.runtime.'):\n"
        "    try:\n"
        "        importlib.import_module(info.name)\n"
        "    except Exception as error:\n"
        "        failed[info.name] = repr(error)\n"
        "print(json.dumps({'torch': sorted(m for m in sys.modules if m.split('.')[0] == 'torch'), 'failed': failed}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] == [], "galip.runtime imported torch"
    assert report["failed"] == {}, f"galip.runtime modules failed to import: {report['failed']}"


# ----------------------------------------------------------------------------- selection
@pytest.fixture
def bundle(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    onnx.save(tiny_graph(), root / "generator.onnx")
    onnx.save(tiny_graph(), root / "generator_fp16.onnx")      # same graph; only the file choice matters here
    (root / "generator_fp16.engine").write_bytes(b"ENGINE")
    engine = {"file": "generator_fp16.engine", "precision": "fp16", "tensorrt_version": "10.13.0.35",
              "compute_capability": "9.0"}
    graphs = {"fp32": {"file": "generator.onnx"}, "fp16": {"file": "generator_fp16.onnx"}}
    write_manifest(root, base_manifest(graphs=graphs, engines=[engine]))
    return load_bundle(root)


def edit_engine(bundle, **changes):
    """The bundle re-written with its generator engine entry changed (and re-checksummed)."""
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["models"]["generator"]["engines"][0].update(changes)
    del manifest["files"]
    write_manifest(bundle.root, manifest)
    return load_bundle(bundle.root)


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setattr(device_info, "import_tensorrt", lambda: None)


def gpu(monkeypatch, capability="8.0", version="10.13.0.35"):
    monkeypatch.setattr(device_info, "tensorrt_version", lambda: version)
    monkeypatch.setattr(device_info, "import_cudart", lambda: object())
    monkeypatch.setattr(device_info, "gpu_compute_capability", lambda device=0: capability)


def fake_onnxruntime(monkeypatch, cuda_loads: bool):
    ort = types.ModuleType("onnxruntime")
    ort.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    ort.SessionOptions = types.SimpleNamespace

    class InferenceSession:
        def __init__(self, model, sess_options=None, providers=()):
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_loads else ["CPUExecutionProvider"]

        def get_providers(self):
            return self.providers
    ort.InferenceSession = InferenceSession
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)


def test_auto_without_tensorrt_picks_cpu_and_says_why(bundle, no_tensorrt, graph_path):
    factory, choice = select_backend(bundle)
    assert (choice.name, choice.precision) == ("onnxruntime-cpu", "fp32")
    assert choice.reason == "picked onnxruntime-cpu fp32: no TensorRT (not installed), no CUDA provider"
    assert choice.file.name == "generator.onnx"
    runner = factory()
    assert isinstance(runner, OnnxrtRunner) and not runner.is_active
    with runner:
        assert runner.output_names == ["translated"]
    _, choice = select_backend(bundle, requested="onnxruntime-cpu", precision="fp16")
    assert choice.file.name == "generator_fp16.onnx" and "asked for with --backend onnxruntime-cpu" in choice.reason


def test_engine_for_another_gpu_falls_back(bundle, monkeypatch):
    gpu(monkeypatch, capability="8.0")
    _, choice = select_backend(bundle)
    assert choice.name == "onnxruntime-cpu"
    assert "engine built for sm_90 / TRT 10.13.0, this GPU is sm_80 / TRT 10.13.0" in choice.reason
    with pytest.raises(BackendError, match=r"--backend tensorrt cannot run the generator: engine built for sm_90"):
        select_backend(bundle, requested="tensorrt")
    gpu(monkeypatch, capability="9.0", version="10.12.0.36")
    assert "this GPU is sm_90 / TRT 10.12.0" in select_backend(bundle)[1].reason


def test_matching_engine_picks_tensorrt(bundle, monkeypatch):
    gpu(monkeypatch, capability="9.0")
    factory, choice = select_backend(bundle)
    assert (choice.name, choice.precision, choice.file.name) == ("tensorrt", "fp16", "generator_fp16.engine")
    assert choice.reason == "picked tensorrt fp16: engine generator_fp16.engine matches sm_90 / TRT 10.13.0"
    assert isinstance(factory(), TrtRunner)
    _, choice = select_backend(bundle, precision="fp32")
    assert choice.name == "onnxruntime-cpu" and "no fp32 TensorRT engine in the bundle" in choice.reason


def test_cuda_provider_listed_but_falling_back_is_not_picked(bundle, no_tensorrt, monkeypatch):
    fake_onnxruntime(monkeypatch, cuda_loads=False)
    _, choice = select_backend(bundle)
    assert choice.name == "onnxruntime-cpu"
    assert "CUDA provider listed but a probe session ran on CPUExecutionProvider" in choice.reason
    with pytest.raises(BackendError, match="--backend onnxruntime-cuda cannot run.*CUDA and cuDNN"):
        select_backend(bundle, requested="onnxruntime-cuda")


def test_cuda_provider_that_loads_is_picked_with_fp16(bundle, no_tensorrt, monkeypatch):
    fake_onnxruntime(monkeypatch, cuda_loads=True)
    factory, choice = select_backend(bundle, cuda_graph=True)
    assert (choice.name, choice.precision, choice.file.name) == ("onnxruntime-cuda", "fp16", "generator_fp16.onnx")
    assert choice.reason == "picked onnxruntime-cuda fp16: no TensorRT (not installed)"
    runner = factory()
    assert runner.device == "cuda" and runner.cuda_graph and runner.precision == "fp16"


def test_explicit_requests_that_cannot_run(bundle, no_tensorrt):
    with pytest.raises(BackendError, match=r"--backend tensorrt cannot run the generator: no TensorRT \(not installed\)"
                                           r"; install TensorRT: pip install 'galip\[gpu\]'"):
        select_backend(bundle, requested="tensorrt")
    with pytest.raises(BackendError, match="no int8 graph in the bundle"):
        select_backend(bundle, requested="onnxruntime-cpu", precision="int8")
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        select_backend(bundle, requested="cuda")


def test_no_onnxruntime_at_all(bundle, no_tensorrt, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendError, match=r"no backend can run the generator: .*pip install 'galip\[cpu\]'"):
        select_backend(bundle)


def test_engine_compatibility_rules():
    engine = {"file": "g.engine", "precision": "fp16", "compute_capability": "9.0", "tensorrt_version": "10.13.0.35"}
    assert engine_mismatch(engine, "9.0", "10.13.0.35") is None
    assert engine_mismatch(engine, "9.0", "10.13.0.99") is None          # build number does not matter
    assert engine_mismatch(engine, "9.0", "10.14.0.1") is not None
    assert engine_mismatch(engine, None, "10.13.0.35") == (
        "engine built for sm_90 / TRT 10.13.0, this machine has no GPU / TRT 10.13.0")
    portable = {**engine, "version_compatible": True, "hardware_compatibility": "ampere+"}
    assert engine_mismatch(portable, "8.6", "10.14.1") is None
    assert engine_mismatch(portable, "7.5", "10.14.1") is not None
    assert engine_mismatch(portable, "9.0", "10.12.0") is not None and engine_mismatch(portable, "9.0", "11.0") is not None


def test_runner_base_is_abstract():
    with pytest.raises(NotImplementedError):
        Runner("x").activate()


def test_engine_whose_ptx_the_driver_cannot_jit_is_refused(bundle, monkeypatch):
    gpu(monkeypatch, capability="9.0")
    monkeypatch.setattr(device_info, "driver_version", lambda: 12080)
    bundle = edit_engine(bundle, ptx_isa="9.0", min_driver_cuda=13000)
    _, choice = select_backend(bundle)
    assert choice.name == "onnxruntime-cpu"
    assert ("driver too old: the LMI kernel is PTX ISA 9.0, which needs a CUDA 13.0 (r580+) driver; "
            "this driver supports CUDA 12.8") in choice.reason
    monkeypatch.setattr(device_info, "driver_version", lambda: 13000)
    assert select_backend(bundle)[1].name == "tensorrt"


def test_select_says_why_tensorrt_does_not_load(bundle, monkeypatch):
    monkeypatch.setattr(device_info, "tensorrt_version", lambda: None)
    monkeypatch.setattr(device_info, "tensorrt_problem",
                        lambda: "TensorRT libraries do not load: ImportError: libnvinfer.so.10: cannot open")
    _, choice = select_backend(bundle)
    assert "TensorRT libraries do not load: ImportError: libnvinfer.so.10" in choice.reason
    assert "not installed" not in choice.reason.split(",")[0]


@pytest.fixture
def lean_gpu(monkeypatch):
    """Only the lean runtime: ``tensorrt`` absent, ``tensorrt_lean`` present, one GPU."""
    cudart = FakeCudart()
    lean, engine = fake_tensorrt(cudart, name="tensorrt_lean")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", lean)
    monkeypatch.setattr(device_info, "import_cudart", lambda: cudart)
    monkeypatch.setattr(device_info, "gpu_compute_capability", lambda device=0: "9.0")
    return cudart


def test_lean_runtime_runs_only_version_compatible_engines(bundle, lean_gpu):
    assert device_info.tensorrt_is_lean() and device_info.tensorrt_version() == "10.13.0.35"
    _, choice = select_backend(bundle)
    assert choice.name == "onnxruntime-cpu"
    assert "tensorrt_lean runs only version-compatible engines; re-export with galip-export --version-compatible" \
        in choice.reason
    with pytest.raises(BackendError, match="version-compatible engines only"):
        EngineFromBytes(b"ENGINE")()
    # a version-compatible plan: picked, and it deserialises because host code is allowed
    (bundle.root / "generator_fp16.engine").write_bytes(b"VC-ENGINE")
    bundle = edit_engine(bundle, version_compatible=True)
    factory, choice = select_backend(bundle, lmi=None)
    assert choice.name == "tensorrt"
    loader = factory().engine_source
    assert loader() is not None and loader.runtime.engine_host_code_allowed is True


def test_version_compatible_plan_needs_host_code_on_full_tensorrt(fake_gpu):
    assert EngineFromBytes(b"VC-ENGINE", version_compatible=True)() is not None
    with pytest.raises(BackendError, match="could not deserialize"):
        EngineFromBytes(b"VC-ENGINE")()        # the fake refuses it like TensorRT without host code


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trt_run_loop_keeps_both_diffusion_carries_on_device(monkeypatch, cuda_graph):
    """The step graph's two carried pairs (x_prev → x_t, x0_pred → x0_last) ping-pong on the
    device together, as the host-side reference loop feeds them back."""
    from galip.runtime.backends.base import DIFFUSION_CARRY
    cudart = FakeCudart()
    trt, _ = fake_tensorrt(cudart, carries=2)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(device_info, "import_cudart", lambda: cudart)
    x, noises, _ = loop_inputs(steps=5)
    x_t, x0_last = x, np.zeros_like(x)
    for n in noises:
        x_t, x0_last = 0.5 * x_t + 0.25 * x0_last + n, x_t
    with TrtRunner(EngineFromBytes(b"ENGINE"), cuda_graph=cuda_graph) as runner:
        out = runner.run_loop({"x_t": x, "x0_last": np.zeros_like(x)}, [{"noise": n} for n in noises],
                              carry=DIFFUSION_CARRY)
        np.testing.assert_allclose(out["x_prev"], x_t, rtol=1e-5)
        np.testing.assert_allclose(out["x0_pred"], x0_last, rtol=1e-5)
        # x_t and x0_last uploaded once, noise once per step, the two outputs downloaded once
        assert cudart.copies.count("cudaMemcpyHostToDevice") == 2 + 5
        assert cudart.copies.count("cudaMemcpyDeviceToHost") == 2
        with pytest.raises(BackendError, match=r"feeds \['x0_last'\], which the loop carries"):
            runner.run_loop({"x_t": x, "x0_last": x}, [{"noise": noises[0]}, {"x0_last": x}], carry=DIFFUSION_CARRY)
