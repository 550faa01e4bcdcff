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


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def _busy_cores() -> float:
    """The 1-minute load average (runnable processes), 0 where the OS does not report it."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def default_threads() -> int:
    """Intra-op threads when none are given: ``$GALIP_NUM_THREADS``, else the usable cores that
    are idle now (usable cores minus the 1-minute load average, rounded; at least 1).

    Measured on 2 cores with one busy (galip-bench, interleaved, issue 14): the generator on 2
    spinning threads ran 2.0x slower than on 1 thread, on 2 non-spinning threads 1.3x slower;
    so threads go only to idle cores, and they spin only when every usable core is idle
    (:func:`default_spinning`).
    """
    env = os.environ.get("GALIP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, min(_usable_cores(), _usable_cores() - round(_busy_cores())))


def default_spinning(threads: int) -> bool | None:
    """Spin-wait between ops only on an idle machine: False when several threads share cores with
    other work (load average >= 0.5), None (onnxruntime's default: spin) otherwise."""
    if threads > 1 and _busy_cores() >= 0.5:
        return False
    return None


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
        threads: intra-op threads; default :func:`default_threads` (the idle usable cores).
        graph_optimization: ``disable`` | ``basic`` | ``extended`` | ``all``.
        spinning: whether intra-op worker threads spin-wait between ops
            (``session.intra_op.allow_spinning``); None: :func:`default_spinning`.
        config: further session config entries (``SessionOptions.add_session_config_entry``).
    """

    def __init__(
        self,
        model: Union[str, Path, bytes, Callable[[], Union[str, Path, bytes]]],
        providers: Sequence[Provider] = ("CPUExecutionProvider",),
        threads: int | None = None,
        graph_optimization: str = "all",
        spinning: bool | None = None,
        config: dict[str, str] | None = None,
    ):
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise BackendError(
                f"unknown graph_optimization {graph_optimization!r}; choose one of {', '.join(GRAPH_OPTIMIZATION)}"
            )
        self.model = model
        self.providers = list(providers)
        self.threads = threads
        self.graph_optimization = graph_optimization
        self.spinning = spinning
        self.config = dict(config or {})

    def without_cuda_graph(self) -> "SessionFromOnnx":
        """The same loader with ``enable_cuda_graph`` dropped from every provider's options."""
        providers = [(p[0], {k: v for k, v in p[1].items() if k != "enable_cuda_graph"})
                     if isinstance(p, tuple) else p for p in self.providers]
        return SessionFromOnnx(self.model, providers, self.threads, self.graph_optimization, self.spinning,
                               self.config)

    @property
    def requested_provider(self) -> str:
        """The provider asked for first (the one a runner must really get)."""
        return provider_name(self.providers[0])

    def __call__(self):
        ort = import_onnxruntime()
        model = self.model() if callable(self.model) else self.model
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads = self.threads or default_threads()
        options.inter_op_num_threads = 1
        # onnxruntime's own log lines would break galip's one-line errors; its failures also
        # arrive as exceptions, which the pipeline reports (naming the graph and the bundle).
        options.log_severity_level = 4
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[self.graph_optimization]
        )
        entries = dict(self.config)
        spinning = self.spinning if self.spinning is not None else default_spinning(threads)
        if spinning is not None:
            entries["session.intra_op.allow_spinning"] = "1" if spinning else "0"
        for key, value in entries.items():
            options.add_session_config_entry(key, str(value))
        source = model if isinstance(model, (bytes, bytearray)) else str(model)
        try:
            return ort.InferenceSession(source, sess_options=options, providers=self.providers)
        except Exception as error:   # onnxruntime raises its own Fail/InvalidGraph types
            where = "<bytes>" if isinstance(source, (bytes, bytearray)) else source
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BackendError(
                f"onnxruntime could not load {where}: {first}; re-export the bundle (galip-export)"
            ) from None


# ----------------------------------------------------------------------------- probe graph
def identity_model_bytes() -> bytes:
    """A serialized ONNX model ``y = Identity(x)``, x, y: float32[1] (IR 8, opset 13).

    Used to probe whether an execution provider really loads; IR 8 and opset 13 are old
    enough for every onnxruntime galip supports. BackendError when ``onnx`` is missing.
    """
    try:
        from onnx import TensorProto, helper
    except ImportError as error:
        raise BackendError(f"onnx does not import ({error}); install it: {INSTALL_CPU}") from None
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, producer_name="galip", ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    return model.SerializeToString()


def provider_really_loads(provider: Provider, ort=None) -> tuple[bool, list[str]]:
    """Build a session on the probe graph with ``provider``; did it keep it?

    onnxruntime-gpu lists CUDA even where its libraries cannot load and silently falls
    back to CPU, so the answer is ``provider in session.get_providers()``. Returns
    ``(kept, providers_in_use)``; ``(False, [])`` when the session cannot be built.
    Raises BackendError when ``onnx`` (which builds the probe) is missing.
    """
    ort = ort or import_onnxruntime()
    name = provider_name(provider)
    probe = identity_model_bytes()
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4   # the fallback is expected here; keep stderr quiet
        providers = [provider] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
        with warnings.catch_warnings():   # "provider not in available providers"
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(probe, sess_options=options, providers=providers)
        in_use = list(session.get_providers())
    except Exception:
        return False, []
    return name in in_use, in_use
