"""Run a TensorRT engine with device buffers and one stream from cuda-python.

Per :meth:`TrtRunner.infer`: ``set_input_shape`` + host-to-device copy per input,
``get_tensor_shape`` per output, ``set_tensor_address`` for all, ``execute_async_v3`` on
the runner's stream, device-to-host copies, one stream synchronisation. Device buffers
grow on demand and are reused between calls.

:meth:`TrtRunner.run_loop` is the diffusion hook: the carried tensors (``x_t`` <- ``x_prev``,
``x0_last`` <- ``x0_pred``) never leave the device; each pair's two buffers swap addresses
between steps and only the per-step inputs (timestep, noise, ...) are uploaded. With ``cuda_graph=True`` each
distinct binding (two for the ping-pong) is captured once
(``cudaStreamBeginCapture`` / ``EndCapture`` / ``GraphInstantiate``) and replayed with
``cudaGraphLaunch``; if capture fails the runner falls back to ``execute_async_v3`` and
records why in ``cuda_graph_error``.

Written against the public TensorRT 10 and cuda-python (``cuda.bindings.runtime``) APIs;
the development machines have neither, so this is tested with fake modules only.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ... import device_info
from ...errors import BackendError
from ..base import DIFFUSION_CARRY, Runner, TensorMeta
from .loader import INSTALL_GPU, EngineFromBytes, import_tensorrt


def import_cudart() -> Any:
    cudart = device_info.import_cudart()
    if cudart is None:
        raise BackendError(f"cuda-python is not installed (cuda.bindings.runtime does not import); {INSTALL_GPU}")
    return cudart


def check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python result ``(error, *values)``; BackendError unless ``cudaSuccess``."""
    result = result if isinstance(result, tuple) else (result,)
    error, values = result[0], result[1:]
    if error != cudart.cudaError_t.cudaSuccess:
        try:
            name = cudart.cudaGetErrorName(error)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            name = str(error)
        raise BackendError(f"CUDA call {what} failed with {name}; check the driver (nvidia-smi) and free GPU memory")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def handle(obj: Any) -> int:
    """Integer value of a cuda-python handle (``cudaStream_t`` and pointers support ``int()``).

    Not ``getPtr()``: that is the address of the Python object's storage, not the handle.
    """
    try:
        return int(obj)
    except TypeError:
        raise BackendError(f"cannot read a CUDA handle from {type(obj).__name__}; upgrade cuda-python ({INSTALL_GPU})") from None


class DeviceBuffer:
    """``cudaMalloc`` memory that grows on demand; ``ptr`` is an int device address."""

    def __init__(self, cudart: Any):
        self.cudart, self.ptr, self.nbytes = cudart, 0, 0

    def ensure(self, nbytes: int) -> bool:
        """Make room for ``nbytes``; True when the address changed."""
        if nbytes <= self.nbytes:
            return False
        self.free()
        self.ptr = handle(check(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
        self.nbytes = nbytes
        return True

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
        self.ptr, self.nbytes = 0, 0


class TrtRunner(Runner):
    """Runner over an :class:`EngineFromBytes` loader (or a deserialized ``ICudaEngine``).

    Args:
        engine: loader or engine. precision: label (``fp16``, ``fp32``) for reports.
        cuda_graph: capture each distinct binding as a CUDA graph and replay it.
    """

    def __init__(self, engine: Any, *, precision: str = "fp16", name: str = "tensorrt", cuda_graph: bool = False):
        super().__init__(name, precision)
        self.engine_source = engine
        self.cuda_graph = cuda_graph
        self.cuda_graph_error: str | None = None
        self.engine = self.context = self.stream = None

    # -- lifecycle ---------------------------------------------------------------------
    def activate_impl(self) -> None:
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
        source = self.engine_source
        self.engine = source() if callable(source) else source
        self.context = self.engine.create_execution_context()
        if self.context is None:
            self.engine = None
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?); free GPU memory")
        self.stream = check(self._cudart, self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, DeviceBuffer] = {}
        self._addresses: dict[str, int] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._graphs: dict[tuple, Any] = {}

    def io_metadata_impl(self) -> tuple[list[TensorMeta], list[TensorMeta]]:
        trt, engine = self._trt, self.engine
        inputs, outputs = [], []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(int(d) if int(d) >= 0 else None for d in engine.get_tensor_shape(name))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(TensorMeta(name, dtype, shape))
        return inputs, outputs

    def deactivate_impl(self) -> None:
        cudart = self._cudart
        for graph_exec in self._graphs.values():
            cudart.cudaGraphExecDestroy(graph_exec)
        self._graphs.clear()
        if self.stream is not None:
            cudart.cudaStreamSynchronize(self.stream)
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers.clear()
        self._addresses.clear()
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
        self.stream = None
        self.context = None   # the context must go before the engine
        self.engine = None

    # -- device plumbing ---------------------------------------------------------------
    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        if nbytes:
            cudart = self._cudart
            kind_enum = getattr(cudart.cudaMemcpyKind, f"cudaMemcpy{kind}")
            check(cudart, cudart.cudaMemcpyAsync(dst, src, nbytes, kind_enum, self.stream), f"cudaMemcpyAsync {kind}")

    def _bind(self, name: str, nbytes: int, address: int | None = None) -> int:
        if address is None:
            buffer = self._buffers.setdefault(name, DeviceBuffer(self._cudart))
            buffer.ensure(nbytes)
            address = buffer.ptr
        if self._addresses.get(name) != address:
            if not self.context.set_tensor_address(name, address):
                raise BackendError(f"TensorRT refused the device address of {name!r}")
            self._addresses[name] = address
        return address

    def _upload(self, feed: Mapping[str, np.ndarray]) -> None:
        """Set shapes, size buffers and copy ``feed`` (prepared host arrays) to the device."""
        for name, array in feed.items():
            if self._shapes.get(name) != array.shape:
                if not self.context.set_input_shape(name, array.shape):
                    low, _, high = self.engine.get_tensor_profile_shape(name, 0)
                    raise BackendError(
                        f"{self.name}: input {name!r} shape {array.shape} is outside the engine's profile "
                        f"{tuple(low)}..{tuple(high)}; use a size inside it or re-export with a wider profile"
                    )
                self._shapes[name] = array.shape
            address = self._bind(name, array.nbytes)
            self._copy(address, array.ctypes.data, array.nbytes, "HostToDevice")

    def _bind_outputs(self, fixed: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, meta in self._outputs.items():
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.name}: output {name!r} has a data-dependent shape {shape}; not supported")
            shapes[name] = shape
            nbytes = int(np.prod(shape, dtype=np.int64)) * meta.dtype.itemsize
            self._bind(name, nbytes, (fixed or {}).get(name))
        return shapes

    def _download(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        outputs = {}
        for name, shape in shapes.items():
            host = np.empty(shape, dtype=self._outputs[name].dtype)
            self._copy(host.ctypes.data, self._addresses[name], host.nbytes, "DeviceToHost")
            outputs[name] = host
        check(self._cudart, self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(handle(self.stream)):
            raise BackendError(f"{self.name}: TensorRT execute_async_v3 failed; run with log_level='INFO' to see why")

    def _capture(self) -> Any:
        """Warm up, then capture one ``execute_async_v3`` into an instantiated CUDA graph (None on failure)."""
        cudart = self._cudart
        self._execute()   # lazy TensorRT setup must happen outside the capture
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            check(cudart, cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            ok = self.context.execute_async_v3(handle(self.stream))
            graph = check(cudart, cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            if not ok:
                cudart.cudaGraphDestroy(graph)
                raise BackendError("execute_async_v3 failed during capture")
            graph_exec = check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            cudart.cudaGraphDestroy(graph)
            return graph_exec
        except BackendError as error:
            self.cuda_graph_error = str(error)
            self.cuda_graph = False
            return None

    def _launch(self) -> None:
        if not self.cuda_graph:
            return self._execute()
        key = tuple(sorted(self._addresses.items())) + tuple(sorted(self._shapes.items()))
        graph_exec = self._graphs.get(key)
        if graph_exec is None:
            graph_exec = self._capture()
            if graph_exec is None:
                return self._execute()
            self._graphs[key] = graph_exec
        check(self._cudart, self._cudart.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    # -- inference ---------------------------------------------------------------------
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._upload(feed)
        shapes = self._bind_outputs()
        self._launch()
        return self._download(shapes)

    def run_loop(
        self,
        init: Mapping[str, np.ndarray],
        steps: Iterable[Mapping[str, np.ndarray]],
        carry: Mapping[str, str] = DIFFUSION_CARRY,
    ) -> dict[str, np.ndarray]:
        """Like :meth:`Runner.run_loop`, with every carried pair kept on the device (ping-pong
        buffers: after each step an input and its output swap addresses).

        Shapes are fixed for the whole loop. ``last_inference_time`` is the whole loop.
        """
        absent = [f"{x_in!r} -> {x_out!r}" for x_in, x_out in carry.items()
                  if x_in not in self.input_metadata or x_out not in self.output_metadata]
        if absent:
            raise BackendError(
                f"{self.name}: run_loop carries {', '.join(absent)}, but the engine has inputs "
                f"{self.input_names} and outputs {self.output_names}"
            )
        start = time.perf_counter()
        feed = dict(init)
        shapes: dict[str, tuple[int, ...]] = {}
        buffers: dict[str, list[int]] = {}      # input name -> [its address, its output's address]
        count = 0
        for count, update in enumerate(steps, start=1):
            if count == 1:
                feed.update(update)
                prepared = self.prepare_feed(feed)
                self._upload(prepared)
                shapes = self._bind_outputs()
                for x_in, x_out in carry.items():
                    if (shapes[x_out], self._outputs[x_out].dtype) != (prepared[x_in].shape, prepared[x_in].dtype):
                        raise BackendError(f"{self.name}: run_loop needs {x_out!r} shaped like {x_in!r}; "
                                           f"got {shapes[x_out]} vs {prepared[x_in].shape}")
                    buffers[x_in] = [self._addresses[x_in], self._addresses[x_out]]
            else:
                carried = [name for name in carry if name in update]
                if carried:
                    raise BackendError(f"{self.name}: run_loop step {count} feeds {carried}, which the loop carries")
                for x_in, x_out in carry.items():
                    ping_pong = buffers[x_in]
                    ping_pong.reverse()
                    self._bind(x_in, 0, ping_pong[0])
                    self._bind(x_out, 0, ping_pong[1])
                if update:
                    feed.update(update)
                    prepared = self.prepare_feed(feed)
                    changed = {name: prepared[name] for name in update}
                    moved = {n: a.shape for n, a in changed.items() if a.shape != self._shapes[n]}
                    if moved:
                        raise BackendError(f"{self.name}: run_loop step {count} changes shapes {moved}; keep shapes fixed")
                    self._upload(changed)
            self._launch()
        if count == 0:
            raise BackendError(f"{self.name}: run_loop got no steps; pass at least one")
        outputs = self._download(shapes)
        self.last_inference_time = time.perf_counter() - start
        self.inference_times.append(self.last_inference_time)
        return outputs


def trt_factory(path, *, precision: str = "fp16", cuda_graph: bool = False,
                name: str = "tensorrt", version_compatible: bool = False) -> Callable[[], TrtRunner]:
    """A zero-argument callable making an (inactive) :class:`TrtRunner` over engine ``path``."""
    def make() -> TrtRunner:
        return TrtRunner(EngineFromBytes(path, version_compatible=version_compatible),
                         precision=precision, name=name, cuda_graph=cuda_graph)
    return make
