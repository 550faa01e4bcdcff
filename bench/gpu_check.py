"""``make gpu-check``: one prepared check of galip's GPU path, one PASS / FAIL / SKIP line per item.

Runs with what is installed (no network, no downloads): items whose dependency is absent
print SKIP with the reason, so on a machine without a GPU every item SKIPs and the exit code
is 0; any FAIL makes it 1. Runs from a checkout without installing galip (the layer folders
are mapped onto the ``galip`` namespace here). Items:

1. ``ptx-driver``: the PTX TensorRT would embed (nvcc's, or ``$GALIP_LMI_PTX``), its ISA
   against this driver (:mod:`galip.runtime.backends.tensorrt.compat`).
2. ``lmi-ptx-kernel``: that very PTX (compute_80, FTZ off: not CuPy's NVRTC build) loaded by
   the driver through CuPy's ``RawModule``, launched as the TensorRT plugin launches it, and
   compared with the CPU kernel at 128² and 256² (<= 1e-5), timed against it.
3. ``trt-runner``: the real ``TrtRunner`` (``infer`` and ``run_loop``, with and without CUDA
   graphs) on cuda-bindings device memory and streams; its engine is a real TensorRT engine
   where TensorRT imports, else a stand-in engine whose step runs as a CuPy kernel on the
   runner's stream (so capture and replay are real CUDA graphs).
4. ``trt-lmi-engine``: where full TensorRT imports, lmi.onnx built with the LMI plugin and run
   against the CPU kernel.
5. ``onnxruntime-cuda``: where the CUDA provider really loads, the LMI graph on it (with
   CUDA graphs asked for: the runner falls back when ORT refuses) against the CPU kernel.
6. ``torch-generator`` / ``torch-scorenet``: eager PyTorch CUDA fp32 and fp16 (autocast) of
   both models (random weights, the paper's sizes) against eager CPU fp32: time and error.

Usage: ``python bench/gpu_check.py`` (``make gpu-check``). Finishes in a few minutes on one GPU.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from galip.runtime.contract import DEFAULT_LMI, LMI_OUT, LMI_X, LMI_Y, LMI_Y_AT, STEP_NOISE, STEP_X_PREV, STEP_X_T

TOL = 1e-5


def _galip_namespace() -> None:
    """Import ``galip.<layer>`` from this checkout, installed or not (an installed galip may
    be another version): the checkout's root joins the namespace's search path."""
    root = Path(__file__).resolve().parents[1]
    if "galip" not in sys.modules:
        sys.path.insert(0, str(root))
    import galip
    if str(root) not in galip.__path__:
        galip.__path__.append(str(root))      # galip.runtime → <root>/runtime, ...


class Skip(Exception):
    """The item cannot run here; the message says why."""


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _pair(rng, n, h, w):
    import numpy as np
    x = rng.random((n, 1, h, w), dtype=np.float32)
    y = np.clip(0.7 * np.roll(x, 1, axis=3) + 0.3 * rng.random((n, 1, h, w)), 0, 1)
    return x, y.astype(np.float32)


def _cupy():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise Skip("no CUDA GPU visible to CuPy")
    except Skip:
        raise
    except Exception as error:      # noqa: BLE001 - ImportError, no driver
        raise Skip(f"CuPy does not run here ({_first(error)})") from None
    return cupy


def _ptx_path(work: Path) -> Path:
    from galip.bench.gpu_lmi import ptx_file
    path = ptx_file(work)
    if path is None:
        raise Skip("no nvcc and no GALIP_LMI_PTX (a PTX from galip.export.kernels.compile_lmi_ptx)")
    return path


def _cpu_lmi(x, y, **params):
    from galip.runtime import lmi_native
    why = lmi_native.native_unavailable_reason()
    if why:
        raise Skip(f"the CPU kernel does not build here: {why}")
    start = time.perf_counter()
    out = lmi_native.lmi_numpy(x, y, **params)
    return out, time.perf_counter() - start


def _agree(lmi, y_at, ref, what: str) -> str:
    """AssertionError unless the LMI map is within TOL of the CPU kernel's ``ref`` and y_at
    agrees (ties may pick another offset) at > 99.9 % of the pixels."""
    import numpy as np
    err = float(np.abs(lmi - ref[0]).max())
    same = float(np.isclose(y_at, ref[1], atol=TOL, rtol=0).mean())
    if not (err <= TOL and same > 0.999):
        raise AssertionError(f"{what}: max |dLMI| {err:.2e} (tolerance {TOL:g}), y_at agreement {same:.4f}")
    return f"max |dLMI| {err:.1e}"


# ---------------------------------------------------------------------------------- items
def check_ptx_driver(work: Path) -> str:
    from galip.runtime import device_info
    from galip.runtime.backends.tensorrt import compat
    path = _ptx_path(work)
    isa = compat.ptx_isa(path.read_text())
    needed, driver = compat.min_driver_cuda(isa), device_info.driver_version()
    if driver is None:
        raise Skip(f"PTX ISA {isa} needs a {compat.driver_text(needed)} driver; no CUDA driver here")
    why = compat.driver_problem(isa, needed, driver)
    if why:
        raise AssertionError(why)
    return f"PTX ISA {isa} needs {compat.driver_text(needed)}, driver supports CUDA {compat.cuda_text(driver)}"


def check_lmi_ptx_kernel(work: Path) -> str:
    import numpy as np

    from galip.export import kernels
    from galip.export.tensorrt import lmi_plugin
    from galip.bench.gpu_lmi import load_kernel
    cupy = _cupy()
    path = _ptx_path(work)
    fn, _ = load_kernel(work, nvrtc_fallback=False)
    notes = []
    for side in (128, 256):
        x, y = _pair(np.random.default_rng(side), 2, side, side)
        for normalize in (True, False):
            params = lmi_plugin.check_device_params(**{**DEFAULT_LMI.kwargs(), "normalize": normalize})
            grid = lmi_plugin.launch_grid(2, side, side)
            scalars = [np.int32(v) for v in lmi_plugin.kernel_scalar_args(2, side, side, params)]
            dx, dy = cupy.asarray(x), cupy.asarray(y)
            outs = [cupy.empty(x.shape, t) for t in (cupy.float32, cupy.float32, cupy.int32)]

            def launch():
                fn((grid["grid_x"], grid["grid_y"]), (grid["block_x"],), (dx, dy, *scalars, *outs))
            launch()
            cupy.cuda.Device().synchronize()
            ref, cpu_s = _cpu_lmi(x, y, normalize=normalize)
            _agree(outs[0].get(), outs[1].get(), ref, f"{side}² normalize={normalize}")
            if normalize:
                start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                for _ in range(10):
                    launch()
                stop.record()
                stop.synchronize()
                ms = cupy.cuda.get_elapsed_time(start, stop) / 10
                notes.append(f"2×{side}²: {ms:.2f} ms (CPU kernel {cpu_s * 1e3:.0f} ms)")
    return f"{path.name} agrees to {TOL:g}; " + ", ".join(notes)


def _stand_in_tensorrt(cupy):
    """A ``tensorrt`` stand-in: an engine x_prev = 0.5 * x_t + noise run by CuPy on the stream."""
    import enum
    import types

    import numpy as np
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "stand-in"
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.nptype = lambda dtype: dtype
    modes = {STEP_X_T: trt.TensorIOMode.INPUT, STEP_NOISE: trt.TensorIOMode.INPUT, STEP_X_PREV: trt.TensorIOMode.OUTPUT}
    step = cupy.ElementwiseKernel("float32 x, float32 n", "float32 y", "y = 0.5f * x + n", "galip_step")

    def view(address, shape):
        size = int(np.prod(shape)) * 4
        memory = cupy.cuda.UnownedMemory(address, size, None)
        return cupy.ndarray(shape, cupy.float32, cupy.cuda.MemoryPointer(memory, 0))

    class Context:
        def __init__(self):
            self.shapes, self.addresses = {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes[STEP_X_T]

        def set_tensor_address(self, name, address):
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream):
            shape, a = self.shapes[STEP_X_T], self.addresses
            with cupy.cuda.ExternalStream(stream):
                step(view(a[STEP_X_T], shape), view(a[STEP_NOISE], shape), view(a[STEP_X_PREV], shape))
            return True

    engine = types.SimpleNamespace(
        num_io_tensors=3, get_tensor_name=lambda i: list(modes)[i], get_tensor_mode=modes.__getitem__,
        get_tensor_dtype=lambda name: np.float32, get_tensor_shape=lambda name: (-1, 1, -1, -1),
        get_tensor_profile_shape=lambda name, p: ((1, 1, 1, 1), (1, 1, 64, 64), (8, 1, 512, 512)),
        create_execution_context=Context)
    return trt, engine


def _step_engine(work: Path, cupy):
    """(engine or loader, what it is): a real TensorRT engine of the stand-in step graph, else
    the CuPy stand-in (with a ``tensorrt`` stand-in module put in place)."""
    from galip.runtime import device_info
    problem = device_info.tensorrt_problem()
    if problem is None and not device_info.tensorrt_is_lean():
        import onnx
        from onnx import TensorProto, helper

        from galip.export.tensorrt import builder
        from galip.runtime.backends.tensorrt import EngineFromBytes
        half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
        nodes = [helper.make_node("Mul", [STEP_X_T, "half"], ["m"]), helper.make_node("Add", ["m", STEP_NOISE], [STEP_X_PREV])]
        vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1, "H", "W"])  # noqa: E731
        graph = helper.make_graph(nodes, "step", [vi(STEP_X_T), vi(STEP_NOISE)], [vi(STEP_X_PREV)], [half])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(model, work / "step.onnx")
        shapes = ([1, 1, 32, 32], [2, 1, 64, 64], [4, 1, 256, 256])
        builder.build_engine(work / "step.onnx", work / "step.engine", fp16=False, plugins=False,
                             profiles={STEP_X_T: shapes, STEP_NOISE: shapes})
        return EngineFromBytes(work / "step.engine"), f"TensorRT {device_info.tensorrt_version()} engine"
    trt, engine = _stand_in_tensorrt(cupy)
    sys.modules["tensorrt"] = trt
    return engine, f"stand-in engine (CuPy kernel; TensorRT: {problem or 'lean runtime only'})"


def check_trt_runner(work: Path) -> str:
    import numpy as np

    from galip.runtime import device_info
    from galip.runtime.backends.tensorrt import TrtRunner
    if device_info.import_cudart() is None:
        raise Skip(device_info.cudart_problem() or "no cuda-python")
    if device_info.gpu_compute_capability() is None:
        raise Skip(device_info.gpu_problem())
    cupy = _cupy()
    saved = sys.modules.get("tensorrt")
    try:
        engine, what = _step_engine(work, cupy)
        rng = np.random.default_rng(0)
        x = rng.random((2, 1, 64, 64), dtype=np.float32)
        noises = [rng.random(x.shape, dtype=np.float32) for _ in range(50)]
        ref = x
        for n in noises:
            ref = 0.5 * ref + n
        notes = []
        for graph in (False, True):
            with TrtRunner(engine, cuda_graph=graph) as runner:
                once = runner.infer({STEP_X_T: x, STEP_NOISE: noises[0]})[STEP_X_PREV]
                np.testing.assert_allclose(once, 0.5 * x + noises[0], rtol=1e-6)
                out = runner.run_loop({STEP_X_T: x}, [{STEP_NOISE: n} for n in noises],
                                      carry={STEP_X_T: STEP_X_PREV})[STEP_X_PREV]
                np.testing.assert_allclose(out, ref, rtol=1e-5)
                if graph and runner.cuda_graph_error:
                    raise AssertionError(f"CUDA graph capture failed: {runner.cuda_graph_error}")
                notes.append(f"{'graph' if graph else 'plain'} {runner.last_inference_time / 50 * 1e3:.3f} ms/step")
    finally:
        if saved is None:
            sys.modules.pop("tensorrt", None)
        else:
            sys.modules["tensorrt"] = saved
    return f"{what}: infer and run_loop (50 steps) match numpy; " + ", ".join(notes)


def _lmi_graph(work: Path) -> Path:
    import onnx

    from galip.export.lmi_onnx import lmi_model
    path = work / "lmi.onnx"
    onnx.save(lmi_model(), path)
    return path


def check_trt_lmi_engine(work: Path) -> str:
    import numpy as np

    from galip.runtime import device_info
    from galip.runtime.backends.tensorrt import EngineFromBytes, TrtRunner
    problem = device_info.tensorrt_problem()
    if problem is not None or device_info.tensorrt_is_lean():
        raise Skip(f"needs full TensorRT ({problem or 'only the lean runtime here'})")
    if device_info.gpu_compute_capability() is None:
        raise Skip(device_info.gpu_problem())
    from galip.export.tensorrt import builder
    shapes = ([1, 1, 32, 32], [1, 1, 128, 128], [2, 1, 256, 256])
    entry = builder.build_engine(_lmi_graph(work), work / "lmi.engine", fp16=False,
                                 profiles={LMI_X: shapes, LMI_Y: shapes})
    x, y = _pair(np.random.default_rng(1), 2, 128, 128)
    with TrtRunner(EngineFromBytes(work / "lmi.engine"), precision="fp32") as runner:
        out = runner.infer({LMI_X: x, LMI_Y: y})
        ref, cpu_s = _cpu_lmi(x, y)
        err = _agree(out[LMI_OUT], out[LMI_Y_AT], ref, "engine")
        runner.infer({LMI_X: x, LMI_Y: y})
    return (f"{err}, {runner.last_inference_time * 1e3:.2f} ms per 2×128² call (CPU kernel {cpu_s * 1e3:.0f} ms), "
            f"PTX ISA {entry.get('ptx_isa')}")


def check_onnxruntime_cuda(work: Path) -> str:
    import warnings

    import numpy as np

    from galip.runtime.backends.onnxruntime import OnnxrtRunner, SessionFromOnnx, cuda_providers
    from galip.runtime.backends.onnxruntime.loader import provider_really_loads
    try:
        import onnxruntime
    except ImportError as error:
        raise Skip(f"onnxruntime does not import ({_first(error)})") from None
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip(f"onnxruntime {onnxruntime.__version__} has no CUDA provider here (the CPU wheel)")
    kept, in_use = provider_really_loads("CUDAExecutionProvider", onnxruntime)
    if not kept:
        raise Skip(f"the CUDA provider is listed but a probe session ran on {in_use} (CUDA/cuDNN libraries missing)")
    path = _lmi_graph(work)
    x, y = _pair(np.random.default_rng(2), 1, 64, 64)
    ref, _ = _cpu_lmi(x, y)
    notes = []
    for graph in (False, True):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            with OnnxrtRunner(SessionFromOnnx(path, cuda_providers(cuda_graph=graph))) as runner:
                out = runner.infer({LMI_X: x, LMI_Y: y})
                runner.infer({LMI_X: x, LMI_Y: y})
                notes.append(f"{'graph' if graph else 'plain'} {runner.last_inference_time * 1e3:.1f} ms"
                             + (f" (graphs refused: {runner.cuda_graph_error})" if runner.cuda_graph_error else ""))
        _agree(out[LMI_OUT], out[LMI_Y_AT], ref, "onnxruntime-cuda")
    return "LMI graph on CUDA agrees with the CPU kernel; 1×64²: " + "; ".join(notes)


def _torch_cuda():
    try:
        import torch
    except ImportError as error:
        raise Skip(f"torch does not import ({_first(error)})") from None
    if not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} sees no CUDA GPU")
    return torch


def _time(fn, sync, reps: int) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def _compare_torch(model, inputs, reps: int = 10) -> str:
    """Eager CPU fp32 vs CUDA fp32 and fp16 autocast: ms per call and max error / output range."""
    torch = _torch_cuda()
    model = model.eval()
    with torch.no_grad():
        cpu_out = model(*inputs)
        cpu_s = _time(lambda: model(*inputs), lambda: None, 2)
        gpu_model = model.cuda()
        gpu_inputs = [t.cuda() for t in inputs]
        notes, scale = [], float(cpu_out.abs().max()) or 1.0
        for name, limit in (("fp32", 1e-3), ("fp16", 5e-2)):
            with torch.autocast("cuda", dtype=torch.float16, enabled=name == "fp16"):
                out = gpu_model(*gpu_inputs).float().cpu()
                seconds = _time(lambda: gpu_model(*gpu_inputs), torch.cuda.synchronize, reps)
            rel = float((out - cpu_out).abs().max()) / scale
            if not rel <= limit:
                raise AssertionError(f"CUDA {name} differs from CPU by {rel:.2e} of the output range (limit {limit:g})")
            notes.append(f"{name} {seconds * 1e3:.2f} ms ({cpu_s / seconds:.0f}× CPU, err {rel:.1e})")
    return f"CPU fp32 {cpu_s * 1e3:.0f} ms; " + ", ".join(notes)


def check_torch_generator(work: Path) -> str:
    torch = _torch_cuda()
    from galip.train.i2i.unet import I2IGalipUNet
    torch.manual_seed(0)
    model = I2IGalipUNet()
    inputs = [torch.rand(1, 1, 256, 256), torch.randn(1, 8, model.config.context_dim), torch.tensor([1])]
    return "generator 1×256²: " + _compare_torch(model, inputs)


def check_torch_scorenet(work: Path) -> str:
    torch = _torch_cuda()
    from galip.train.midiffusion.scorenet import ScoreNet
    torch.manual_seed(0)
    model = ScoreNet()
    inputs = [torch.rand(1, model.config.in_channels, 128, 128), torch.tensor([500.0])]
    return "score network 1×128²: " + _compare_torch(model, inputs)


ITEMS = [("ptx-driver", check_ptx_driver), ("lmi-ptx-kernel", check_lmi_ptx_kernel),
         ("trt-runner", check_trt_runner), ("trt-lmi-engine", check_trt_lmi_engine),
         ("onnxruntime-cuda", check_onnxruntime_cuda), ("torch-generator", check_torch_generator),
         ("torch-scorenet", check_torch_scorenet)]


def main(argv: list[str] | None = None) -> int:
    """Run every item (or those named in ``argv``); 1 when any FAILs."""
    _galip_namespace()
    from galip.runtime import device_info
    wanted = set(argv or []) or {name for name, _ in ITEMS}
    print(f"gpu-check: {device_info.describe()}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="galip-gpu-check-") as tmp:
        for name, item in ITEMS:
            if name not in wanted:
                continue
            start = time.perf_counter()
            try:
                status, detail = "PASS", item(Path(tmp))
            except Skip as reason:
                status, detail = "SKIP", str(reason)
            except Exception as error:      # noqa: BLE001 - every failure is one FAIL line
                status, detail = "FAIL", _first(error)
                failed += 1
            print(f"{status} {name}: {detail} [{time.perf_counter() - start:.1f} s]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
