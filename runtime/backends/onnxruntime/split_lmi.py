"""Run a graph's ``galip::LMI`` nodes on the native CPU kernel and the rest in onnxruntime.

onnxruntime runs a ``galip::LMI`` node through its ONNX function body (standard ops, a dense
27 × 27 joint histogram per pixel and offset): about 1 s per 128² call on two cores. The
native kernel (:func:`galip.runtime.lmi_native.lmi_numpy`, same contract, 1e-5) takes a tenth
of that. :class:`SplitLmiRunner` cuts the graph at its LMI nodes with ``onnx.utils.Extractor``
and runs, for a graph with k LMI nodes::

    segment 0 (onnxruntime) → LMI 0 (lmi_numpy) → segment 1 → … → LMI k−1 → segment k

Segment i computes, from the graph inputs and every tensor an earlier stage produced, the
inputs of LMI node i (segment k: the graph outputs). A segment with nothing to compute has
no session (``lmi.onnx``, one LMI node from graph inputs to graph outputs, is a bare
``lmi_numpy`` call). Only the graph inputs and LMI outputs a segment's nodes really read
become its inputs, so an unused LMI output (``y_at``, ``offset_index`` of the step graph) is
never fed. The runner has the unsplit graph's input/output names and metadata, so it stands
in for :class:`~galip.runtime.backends.onnxruntime.runner.OnnxrtRunner` anywhere.

The LMI parameters (patch, radius, bins, sigma, normalize) are the node's attributes; where
the model also holds the ``galip::LMI`` function (whose body onnxruntime would run), they must
equal the function's baked defaults, or splitting would change the result: BackendError. A
graph without an LMI node is a BackendError too (run it with ``OnnxrtRunner``).

``onnx`` is imported lazily (the runtime's ``cpu`` extra has it); nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

from ... import lmi_native
from ...contract.lmi import LMI_DOMAIN, LMI_NODE_OUTPUT_TYPES, LMI_OP_TYPE, LMI_PARAM_NAMES
from ...errors import BackendError
from ..base import Runner, TensorMeta
from .loader import INSTALL_CPU, Provider, SessionFromOnnx
from .runner import OnnxrtRunner

NATIVE_NOTE = "LMI on the native CPU kernel"

ModelSource = Union[str, Path, bytes, Any]   # path, serialized bytes or an onnx.ModelProto


def _onnx():
    try:
        import onnx
        import onnx.shape_inference
        import onnx.utils
    except ImportError as error:
        raise BackendError(f"onnx does not import ({error}); install it: {INSTALL_CPU}") from None
    return onnx


def load_model(source: ModelSource, *, external_data: bool = True):
    """An ``onnx.ModelProto`` from a path, serialized bytes or a ModelProto (returned as is)."""
    onnx = _onnx()
    if isinstance(source, onnx.ModelProto):
        return source
    try:
        if isinstance(source, (bytes, bytearray)):
            return onnx.load_from_string(bytes(source))
        return onnx.load(str(source), load_external_data=external_data)
    except Exception as error:   # DecodeError, OSError
        raise BackendError(f"onnx could not read {source if not isinstance(source, bytes) else '<bytes>'}: "
                           f"{error}; re-export the bundle (galip-export)") from None


# ----------------------------------------------------------------------------- LMI nodes
@dataclass(frozen=True)
class LmiCall:
    """One ``galip::LMI`` node: its tensor names and parameters (``lmi_numpy`` keywords)."""

    name: str
    x: str
    y: str
    outputs: tuple[str, ...]      # (lmi, y_at[, offset_index]); "" where the node omits one
    params: dict

    def run(self, x: np.ndarray, y: np.ndarray, threads: int | None = None) -> dict[str, np.ndarray]:
        """The node's named outputs from the native kernel."""
        results = lmi_native.lmi_numpy(x, y, **self.params, num_threads=threads)
        return {name: value for name, value in zip(self.outputs, results) if name}


def is_lmi_node(node) -> bool:
    return (node.domain, node.op_type) == (LMI_DOMAIN, LMI_OP_TYPE)


def _attributes(protos) -> dict:
    onnx = _onnx()
    return {a.name: onnx.helper.get_attribute_value(a) for a in protos}


_CAST = {"patch": int, "radius": int, "bins": int, "sigma": lambda v: float(np.float32(v)), "normalize": bool}


def _typed(attributes: dict) -> dict:
    """The LMI parameters among ``attributes``, typed as ``lmi_numpy`` takes them."""
    return {k: _CAST[k](attributes[k]) for k in LMI_PARAM_NAMES if k in attributes}


def lmi_calls(model) -> list[LmiCall]:
    """Every top-level ``galip::LMI`` node of ``model``, in graph (topological) order.

    Parameters come from the node's attributes, else the function's defaults. BackendError
    when a node's parameters differ from those the model's ``galip::LMI`` function was built
    with (onnxruntime runs the function body; the kernel would compute something else).
    """
    function = next((f for f in model.functions if (f.domain, f.name) == (LMI_DOMAIN, LMI_OP_TYPE)), None)
    baked = _typed(_attributes(function.attribute_proto)) if function is not None else {}
    calls = []
    for index, node in enumerate(model.graph.node):
        if not is_lmi_node(node):
            continue
        label = f"LMI node {node.name or index!r}"
        if len(node.input) != 2 or len(node.output) > len(LMI_NODE_OUTPUT_TYPES):
            raise BackendError(f"{label} has inputs {list(node.input)} and outputs {list(node.output)}; "
                               "galip::LMI takes (x, y) and gives (lmi, y_at[, offset_index])")
        params = {**baked, **_typed(_attributes(node.attribute))}
        missing = [k for k in LMI_PARAM_NAMES if k not in params]
        if missing:
            raise BackendError(f"{label} has no {', '.join(missing)} attribute; re-export the bundle")
        if any(params[k] != v for k, v in baked.items()):
            raise BackendError(f"{label} has {params} but its function body computes {baked}; "
                               "re-export the bundle")
        calls.append(LmiCall(node.name or f"lmi_{index}", node.input[0], node.input[1],
                             tuple(node.output), params))
    return calls


def split_problem(source: ModelSource) -> str | None:
    """Why ``source`` cannot run through :class:`SplitLmiRunner` (one line), or None when it can.

    Reads the graph without its external data (cheap); used to pick the runner up front.
    """
    try:
        calls = lmi_calls(load_model(source, external_data=False))
    except BackendError as error:
        return str(error)
    return None if calls else "the graph has no galip::LMI node"


# ----------------------------------------------------------------------------- splitting
@dataclass
class Segment:
    """A piece of the graph run by onnxruntime: ``model`` None when it has nothing to compute."""

    inputs: list[str]
    outputs: list[str]
    model: Any = field(default=None, repr=False)


@dataclass
class LmiSplit:
    """``segments[i]`` feeds ``calls[i]``; the last segment computes the graph outputs."""

    segments: list[Segment]
    calls: list[LmiCall]
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


def _meta(value_info) -> TensorMeta:
    onnx = _onnx()
    tensor = value_info.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, ValueError, TypeError):
        raise BackendError(f"tensor {value_info.name!r} has ONNX type {tensor.elem_type}, "
                           "which galip runners do not support") from None
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    return TensorMeta(value_info.name, dtype, dims)


def _has_subgraphs(nodes) -> bool:
    onnx = _onnx()
    graph_types = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in graph_types for node in nodes for a in node.attribute)


def _extract(extractor, available: list[str], outputs: list[str]) -> Segment:
    """Segment computing ``outputs`` from (the used part of) ``available``, via the Extractor."""
    if not outputs:
        return Segment([], [])
    try:
        model = extractor.extract_model(available, outputs)
        # Keep only the inputs the segment's nodes read (or passes through); subgraphs may read
        # outer names implicitly, so a graph with control flow keeps every available input.
        if not _has_subgraphs(model.graph.node):
            read = {name for node in model.graph.node for name in node.input} | set(outputs)
            used = [name for name in available if name in read]
            if used != available:
                model = extractor.extract_model(used, outputs)
    except ValueError as error:   # a name without type information, or a malformed graph
        raise BackendError(f"could not split the graph at its LMI nodes: {error}") from None
    if any(is_lmi_node(node) for node in model.graph.node):
        raise BackendError(f"could not split the graph at its LMI nodes: the segment computing {outputs} "
                           "still holds a galip::LMI node")
    return Segment([i.name for i in model.graph.input], outputs, model)


def _add_lmi_output_types(model, calls: list[LmiCall]) -> None:
    """Types for LMI outputs that shape inference left untyped (the kernel's types, any shape)."""
    onnx = _onnx()
    known = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    for call in calls:
        for name, dtype in zip(call.outputs, LMI_NODE_OUTPUT_TYPES):
            if name and name not in known:
                elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, None))


def split_at_lmi(source: ModelSource) -> LmiSplit:
    """Cut ``source`` at every ``galip::LMI`` node (module docstring); BackendError if it has none."""
    onnx = _onnx()
    model = load_model(source)
    calls = lmi_calls(model)
    if not calls:
        raise BackendError(f"graph {model.graph.name!r} has no galip::LMI node: nothing to run on the "
                           "native kernel; run it with OnnxrtRunner")
    try:   # value_info for the tensors the cuts go through (LMI inputs and outputs)
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as error:   # InferenceError
        raise BackendError(f"onnx shape inference failed on {model.graph.name!r}: {error}") from None
    _add_lmi_output_types(inferred, calls)
    extractor = onnx.utils.Extractor(inferred)
    initializers = {t.name for t in model.graph.initializer}
    available = [i.name for i in model.graph.input if i.name not in initializers]
    segments = []
    for call in calls:
        needed = [name for name in dict.fromkeys((call.x, call.y)) if name not in available]
        segments.append(_extract(extractor, available, needed))
        available += needed + [name for name in call.outputs if name and name not in available]
    final = [o.name for o in model.graph.output if o.name not in available]
    segments.append(_extract(extractor, available, final))
    inputs = [_meta(i) for i in model.graph.input if i.name not in initializers]
    return LmiSplit(segments, calls, inputs, [_meta(o) for o in model.graph.output])


# ----------------------------------------------------------------------------- runner
class SplitLmiRunner(Runner):
    """The graph with its LMI nodes on the native CPU kernel (:func:`split_at_lmi`).

    Args:
        model: path of an ``.onnx`` file, serialized bytes or a ``ModelProto``; split on
            :meth:`activate`.
        providers: onnxruntime providers of the segments (the kernel runs on the host, so CPU).
        threads: intra-op threads of the segments and OpenMP threads of the kernel (default:
            all cores, or ``$GALIP_NUM_THREADS`` for the kernel).
        precision, name: labels, as :class:`OnnxrtRunner`'s.

    Same ``infer(feed) -> outputs`` and input/output names as ``OnnxrtRunner`` over the
    unsplit graph. ``segment_times`` holds the seconds of each stage of the last call
    (segment 0, LMI 0, segment 1, ...).
    """

    def __init__(self, model: ModelSource, *, providers: Sequence[Provider] = ("CPUExecutionProvider",),
                 threads: int | None = None, precision: str = "fp32", name: str = "onnxruntime-cpu"):
        super().__init__(name, precision)
        self.model = model
        self.providers = list(providers)
        self.threads = threads
        self.split: LmiSplit | None = None
        self.segments: list[OnnxrtRunner | None] = []
        self.segment_times: list[float] = []
        self._stack: contextlib.ExitStack | None = None

    def activate_impl(self) -> None:
        why = lmi_native.native_unavailable_reason()   # builds the kernel on first use
        if why is not None:
            raise BackendError(why)
        split = split_at_lmi(self.model)
        with contextlib.ExitStack() as stack:
            segments = []
            for index, segment in enumerate(split.segments):
                if segment.model is None:
                    segments.append(None)
                    continue
                loader = SessionFromOnnx(segment.model.SerializeToString(), self.providers, threads=self.threads)
                runner = OnnxrtRunner(loader, precision=self.precision, name=f"{self.name} segment {index}")
                segments.append(stack.enter_context(runner))
            self._stack = stack.pop_all()
        self.split, self.segments = split, segments

    def io_metadata_impl(self) -> tuple[list[TensorMeta], list[TensorMeta]]:
        return list(self.split.inputs), list(self.split.outputs)

    def deactivate_impl(self) -> None:
        stack, self._stack = self._stack, None
        self.split, self.segments = None, []
        if stack is not None:
            stack.close()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(feed)
        times = []
        for index, runner in enumerate(self.segments):
            start = time.perf_counter()
            if runner is not None:
                values.update(runner.infer({name: values[name] for name in runner.input_names}))
            times.append(time.perf_counter() - start)
            if index < len(self.split.calls):
                call = self.split.calls[index]
                start = time.perf_counter()
                values.update(call.run(values[call.x], values[call.y], self.threads))
                times.append(time.perf_counter() - start)
        self.segment_times = times
        return {meta.name: np.asarray(values[meta.name]).astype(meta.dtype, copy=False)
                for meta in self._outputs.values()}


def split_lmi_factory(path: ModelSource, *, threads: int | None = None, precision: str = "fp32",
                      name: str = "onnxruntime-cpu") -> Callable[[], SplitLmiRunner]:
    """A zero-argument callable making an (inactive) :class:`SplitLmiRunner` over ``path``."""
    def make() -> SplitLmiRunner:
        return SplitLmiRunner(path, threads=threads, precision=precision, name=name)
    return make
