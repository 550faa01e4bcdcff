"""Build onnxruntime sessions lazily (Polygraphy's ``SessionFromOnnx``).

``onnxruntime`` is imported only when a loader is called, so this module imports on a
machine without it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from ...errors import BackendError

Provider = Union[str, tuple[str, dict]]
GRAPH_OPTIMIZATION = {
    "disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL",
}
INSTALL_CPU = "pip install 'galip[cpu]'"
INSTALL_GPU = "pip install 'galip[gpu]'"


def import_onnxruntime():
    """The ``onnxruntime`` module, or BackendError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise BackendError(f"onnxruntime does not import ({error}); install it: {INSTALL_CPU}") from None
    return onnxruntime


def provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def cuda_providers(device_id: int = 0, cuda_graph: bool = False, **options: Any) -> list[Provider]:
    """Provider list for the CUDA execution provider, with CPU as onnxruntime's fallback.

    ``cuda_graph=True`` sets the provider option ``enable_cuda_graph`` (needs fixed input
    shapes and IO bound to fixed device memory; :class:`OnnxrtRunner` does that).
    """
    cuda_options = {"device_id": str(device_id), **{k: str(v) for k, v in options.items()}}
    if cuda_graph:
        cuda_options["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]


class SessionFromOnnx:
    """Loader: ``SessionFromOnnx(path)()`` -> ``onnxruntime.InferenceSession``.

    Args:
        model: path of an ``.onnx`` file, serialized bytes, or a callable returning either.
        providers: execution providers in priority order (names or ``(name, options)``).
        threads: intra-op threads; default all cores (``os.cpu_count()``).
        graph_optimization: ``disable`` | ``basic`` | ``extended`` | ``all``.
    """

    def __init__(
        self,
        model: Union[str, Path, bytes, Callable[[], Union[str, Path, bytes]]],
        providers: Sequence[Provider] = ("CPUExecutionProvider",),
        threads: int | None = None,
        graph_optimization: str = "all",
    ):
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise BackendError(
                f"unknown graph_optimization {graph_optimization!r}; choose one of {', '.join(GRAPH_OPTIMIZATION)}"
            )
        self.model = model
        self.providers = list(providers)
        self.threads = threads
        self.graph_optimization = graph_optimization

    @property
    def requested_provider(self) -> str:
        """The provider asked for first (the one a runner must really get)."""
        return provider_name(self.providers[0])

    def __call__(self):
        ort = import_onnxruntime()
        model = self.model() if callable(self.model) else self.model
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[self.graph_optimization]
        )
        source = model if isinstance(model, (bytes, bytearray)) else str(model)
        try:
            return ort.InferenceSession(source, sess_options=options, providers=self.providers)
        except Exception as error:   # onnxruntime raises its own Fail/InvalidGraph types
            where = "<bytes>" if isinstance(source, (bytes, bytearray)) else source
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BackendError(
                f"onnxruntime could not load {where}: {first}; check the bundle (galip-run --verify) or re-export"
            ) from None


# ----------------------------------------------------------------------------- probe graph
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: Union[int, bytes, str]) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def identity_model_bytes() -> bytes:
    """A serialized ONNX model ``y = Identity(x)``, x, y: float32[1] (IR 8, opset 13).

    Written with a few lines of protobuf encoding so the runtime needs no ``onnx``
    package; used to probe whether an execution provider really loads.
    """
    dims = _field(1, _field(1, 1))                                     # shape { dim { dim_value: 1 } }
    tensor_type = _field(1, _field(1, 1) + _field(2, dims))             # elem_type FLOAT, shape
    value_info = lambda name: _field(1, name) + _field(2, tensor_type)  # noqa: E731
    node = _field(1, "x") + _field(2, "y") + _field(4, "Identity")
    graph = _field(1, node) + _field(2, "probe") + _field(11, value_info("x")) + _field(12, value_info("y"))
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(2, "galip") + _field(7, graph) + _field(8, opset)


def provider_really_loads(provider: Provider, ort=None) -> tuple[bool, list[str]]:
    """Build a session on the probe graph with ``provider``; did it keep it?

    onnxruntime-gpu lists CUDA even where its libraries cannot load and silently falls
    back to CPU, so the answer is ``provider in session.get_providers()``. Returns
    ``(kept, providers_in_use)``; ``(False, [])`` when the session cannot be built.
    """
    ort = ort or import_onnxruntime()
    name = provider_name(provider)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4   # the fallback is expected here; keep stderr quiet
        providers = [provider] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
        with warnings.catch_warnings():   # "provider not in available providers"
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(identity_model_bytes(), sess_options=options, providers=providers)
        in_use = list(session.get_providers())
    except Exception:
        return False, []
    return name in in_use, in_use
