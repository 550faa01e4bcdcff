"""Run an onnxruntime session through IO binding (Polygraphy's ``OnnxrtRunner``).

CPU: inputs bound with ``bind_cpu_input``, outputs allocated by onnxruntime on the host.
CUDA: inputs copied to device ``OrtValue``s, outputs left on the device and copied back
once; with ``enable_cuda_graph`` in the provider options the first call captures a CUDA
graph, so every later call must have the same shapes and reuses the same device buffers
(inputs refreshed with ``OrtValue.update_inplace``). onnxruntime refuses CUDA graphs for a
graph it cannot place wholly on the CUDA provider (the LMI function body's shape nodes may
need Memcpy nodes): the session then fails to build, or the first run fails to capture. The
runner falls back to plain IO binding, records why in ``cuda_graph_error`` and says so with
a RuntimeWarning. The CUDA paths are written against onnxruntime's public API and tested
with fakes only (no GPU on the development machines).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from ...errors import BackendError
from ..base import Runner, TensorMeta, bind_dims, resolve_dims
from .loader import INSTALL_GPU, SessionFromOnnx, provider_name

_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _meta(arg: Any) -> TensorMeta:
    """TensorMeta from an onnxruntime NodeArg (``.name``, ``.type``, ``.shape``)."""
    if arg.type not in _DTYPES:
        raise BackendError(f"tensor {arg.name!r} has type {arg.type}, which galip runners do not support")
    shape = tuple(d if isinstance(d, (int, str)) or d is None else None for d in arg.shape)
    return TensorMeta(arg.name, np.dtype(_DTYPES[arg.type]), shape)


class OnnxrtRunner(Runner):
    """Runner over a :class:`SessionFromOnnx` loader (or a ready ``InferenceSession``).

    Args:
        loader: ``SessionFromOnnx`` (called on :meth:`activate`), any callable returning a
            session, or a session.
        precision: label of the graph's precision (``fp32``, ``fp16``), for reports.
        name: defaults to ``onnxruntime-cuda`` / ``onnxruntime-cpu`` from the first provider.

    ``activate`` raises BackendError when the session does not really run on the provider
    asked for first (onnxruntime-gpu falls back to CPU silently).
    """

    def __init__(self, loader: Any, *, precision: str = "fp32", name: str | None = None):
        self.loader = loader
        providers = list(getattr(loader, "providers", []) or ["CPUExecutionProvider"])
        self.requested_provider = provider_name(providers[0])
        options = providers[0][1] if isinstance(providers[0], tuple) else {}
        self.device = "cuda" if self.requested_provider == "CUDAExecutionProvider" else "cpu"
        self.device_id = int(options.get("device_id", 0))
        self.cuda_graph = self.device == "cuda" and str(options.get("enable_cuda_graph", "0")) == "1"
        super().__init__(name or f"onnxruntime-{self.device}", precision)
        self.session = None
        self.providers_in_use: list[str] = []
        self.cuda_graph_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def _drop_cuda_graph(self, error: Exception) -> bool:
        """Switch to plain IO binding after onnxruntime refused CUDA graphs; False if it cannot."""
        if not (self.cuda_graph and hasattr(self.loader, "without_cuda_graph")):
            return False
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.cuda_graph_error = first
        self.cuda_graph = False
        self.loader = self.loader.without_cuda_graph()
        warnings.warn(f"{self.name}: onnxruntime refused CUDA graphs ({first}); running with plain IO binding",
                      RuntimeWarning, stacklevel=3)
        return True

    def _session(self) -> Any:
        try:
            return self.loader() if callable(self.loader) else self.loader
        except BackendError as error:
            if not self._drop_cuda_graph(error):
                raise
            return self.loader()

    def activate_impl(self) -> None:
        session = self._session()
        in_use = list(session.get_providers())
        if self.requested_provider not in in_use:
            del session
            raise BackendError(
                f"asked onnxruntime for {self.requested_provider} but the session runs on "
                f"{', '.join(in_use) or 'nothing'} (its libraries did not load); install "
                f"onnxruntime-gpu matching your CUDA ({INSTALL_GPU}) or use --backend onnxruntime-cpu"
            )
        self.session = session
        self.providers_in_use = in_use
        self._binding = session.io_binding()
        self._graph_shapes: dict[str, tuple[int, ...]] | None = None
        self._device_inputs: dict[str, Any] = {}
        self._device_outputs: dict[str, Any] = {}

    def io_metadata_impl(self) -> tuple[list[TensorMeta], list[TensorMeta]]:
        return ([_meta(a) for a in self.session.get_inputs()],
                [_meta(a) for a in self.session.get_outputs()])

    def deactivate_impl(self) -> None:
        self._device_inputs.clear()
        self._device_outputs.clear()
        self._binding = None
        self.session = None
        self.providers_in_use = []

    # -- inference ---------------------------------------------------------------------
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cpu":
            return self._infer_cpu(feed)
        if self.cuda_graph:
            first = self._graph_shapes is None
            try:
                return self._infer_cuda_graph(feed)
            except Exception as error:    # onnxruntime's own types: the capture was refused
                if not first or isinstance(error, BackendError) or not self._drop_cuda_graph(error):
                    raise
                self.deactivate_impl()
                self.activate_impl()
        return self._infer_cuda(feed)

    def _infer_cpu(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu()))

    def _ortvalue(self) -> Any:
        from onnxruntime import OrtValue
        return OrtValue

    def _infer_cuda(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        OrtValue = self._ortvalue()
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        device_inputs = {n: OrtValue.ortvalue_from_numpy(a, "cuda", self.device_id) for n, a in feed.items()}
        for name, value in device_inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in zip(self._outputs, binding.get_outputs())}

    def _infer_cuda_graph(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {name: tuple(array.shape) for name, array in feed.items()}
        if self._graph_shapes is None:
            self._capture(feed)
            self._graph_shapes = shapes
        elif shapes != self._graph_shapes:
            raise BackendError(
                f"{self.name}: the CUDA graph was captured for input shapes {self._graph_shapes}, got {shapes}; "
                "keep shapes fixed (pad the batch) or create the runner without cuda_graph"
            )
        else:
            for name, array in feed.items():
                self._device_inputs[name].update_inplace(array)
        self.session.run_with_iobinding(self._binding)
        return {name: value.numpy() for name, value in self._device_outputs.items()}

    def _capture(self, feed: dict[str, np.ndarray]) -> None:
        """Allocate fixed device inputs and outputs and bind them once (onnxruntime captures on the next run)."""
        OrtValue = self._ortvalue()
        bound = bind_dims(self._inputs.values(), feed)
        binding = self._binding
        for name, array in feed.items():
            self._device_inputs[name] = OrtValue.ortvalue_from_numpy(array, "cuda", self.device_id)
            binding.bind_ortvalue_input(name, self._device_inputs[name])
        for name, meta in self._outputs.items():
            shape = resolve_dims(meta, bound)
            if shape is None:
                raise BackendError(
                    f"{self.name}: CUDA graph needs static output shapes, but output {meta} has a dimension "
                    "not named after an input dimension; export the graph with named dims or disable cuda_graph"
                )
            self._device_outputs[name] = OrtValue.ortvalue_from_shape_and_type(
                list(shape), meta.dtype.type, "cuda", self.device_id
            )
            binding.bind_ortvalue_output(name, self._device_outputs[name])


def onnxrt_factory(path, providers, *, threads: int | None = None, precision: str = "fp32",
                   name: str | None = None) -> Callable[[], OnnxrtRunner]:
    """A zero-argument callable making an (inactive) :class:`OnnxrtRunner` over ``path``."""
    def make() -> OnnxrtRunner:
        return OnnxrtRunner(SessionFromOnnx(path, providers, threads=threads), precision=precision, name=name)
    return make
