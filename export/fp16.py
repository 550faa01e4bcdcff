"""fp16 variants of the exported graphs: fp16 compute, fp32 inputs/outputs, fp32 islands.

Conversion is onnxconverter-common's ``float16.convert_float_to_float16`` (the converter
onnxruntime's own transformer tools use) with ``keep_io_types=True``, so a runtime feeds
and reads float32 whatever the precision. Kept in fp32 (Cast nodes around them):

* by op type (:data:`KEEP_FP32_OPS`): the LMI node (the contract is fp32; its
  soft-binning exp and p·log p terms underflow in fp16), Softmax, every normalisation
  (GroupNorm exports as InstanceNormalization, LayerNormalization, and their
  ReduceMean/Pow/Sqrt pieces should a model spell them out), and the converter's own
  defaults (ops without fp16 kernels in onnxruntime's CPU provider: Resize, Max, Min, ...);
* by node (:func:`fp32_nodes`): every node that does not depend on an image-sized input.
  Those are O(N) vector ops (the sinusoidal timestep embedding, whose sin/cos of
  t·freq ≈ 1000 rad would lose all precision in fp16, the time/class MLPs, the per-domain
  table gathers), so fp32 costs nothing there;
* whatever the caller names in ``keep_fp32_nodes`` (the diffusion step keeps its DDIM
  update in fp32: x̂_0 divides by √ᾱ_t ≈ 0.006 at t = T).

The converter rounds fp32 weights and constants of the fp16 part to fp16 (magnitudes
clamped to [1e-7, 65504], fp16's finite range, instead of its default 1e4 ceiling) and
inserts the casts; the result is checked and shape-inferred again.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import onnx
from onnx import TensorProto

from galip.runtime.contract import LMI_OP_TYPE
from galip.runtime.errors import ConfigError

from .generator_graph import check_graph

FP16_MAX = 65504.0                # largest finite fp16 (the converter's default clamps at 1e4)
INSTALL = "pip install 'galip[train]' (onnxconverter-common)"
KEEP_FP32_OPS = (
    LMI_OP_TYPE,                                                # galip::LMI (contract: fp32)
    "Softmax", "LogSoftmax",
    "InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "Pow", "Sqrt", "Reciprocal",
    "Sin", "Cos", "Exp", "Log", "Range", "CumSum",
)


def _converter():
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ConfigError(f"--fp16 needs onnxconverter-common, which is not installed; {INSTALL} "
                          "or export with --no-fp16") from None
    return float16


def fp32_nodes(model: onnx.ModelProto, spatial_inputs: Iterable[str]) -> list[str]:
    """Names of the nodes whose outputs do not depend on any of ``spatial_inputs``.

    Walks the graph in topological order (ONNX graphs are sorted); a node depends on the
    image inputs when any of its inputs does. Constants, initializers and ``Shape`` outputs
    (sizes, not image data: the timestep broadcast to N stays fp32) do not.
    """
    tainted = set(spatial_inputs)
    keep = []
    for node in model.graph.node:
        if node.op_type == "Shape":         # sizes are metadata, not image data
            keep.append(node.name)
        elif any(name in tainted for name in node.input):
            tainted.update(node.output)
        else:
            keep.append(node.name)
    return keep


def _blocked_nodes(model: onnx.ModelProto, spatial_inputs: Iterable[str], blocked_ops: set[str],
                   extra: Iterable[str]) -> list[str]:
    """Nodes to keep fp32: image-independent ones and ``extra``; a Constant only when every
    consumer stays fp32 too (else the converter stores it as fp16 and no Cast is needed)."""
    nodes = model.graph.node
    independent = set(fp32_nodes(model, spatial_inputs))
    blocked = {n.name for n in nodes if n.name in independent and n.op_type != "Constant"}
    blocked |= set(extra)
    fp32 = blocked | {n.name for n in nodes if n.op_type in blocked_ops}
    consumers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    for node in nodes:
        if node.op_type == "Constant":
            users = [c for out in node.output for c in consumers.get(out, [])]
            if users and all(c in fp32 for c in users):
                blocked.add(node.name)
    return sorted(blocked)


def _split_shared_initializers(model: onnx.ModelProto, fp32: set[str]) -> None:
    """Give fp32 (blocked) nodes their own copy of an initializer fp16 nodes read too (the
    converter keeps such an initializer fp32 for everyone, which mistypes the fp16 reader)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, []).append(node)
    for name, nodes in readers.items():
        kept = [n for n in nodes if n.name in fp32]
        if kept and len(kept) < len(nodes):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}__fp32"
            graph.initializer.append(copy)
            for node in kept:
                node.input[:] = [copy.name if i == name else i for i in node.input]


def _drop_round_trips(model: onnx.ModelProto) -> int:
    """Remove Cast(fp16) → Cast(fp32) pairs the converter leaves between two fp32 islands
    (an exact fp32 value made lossy for nothing); return how many fp16 casts went."""
    graph = model.graph
    outputs = {v.name for v in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    removed: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if cast_to(node) != TensorProto.FLOAT16 or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(cast_to(u) != TensorProto.FLOAT or u.output[0] in outputs for u in users):
            continue
        source = node.input[0]
        for user in users:
            for reader in consumers.get(user.output[0], []):
                for i, name in enumerate(reader.input):
                    if name == user.output[0]:
                        reader.input[i] = source
        removed += [node, *users]
    for node in removed:
        graph.node.remove(node)
    return sum(1 for node in removed if cast_to(node) == TensorProto.FLOAT16)


def _restore_fp32_outputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Undo the converter's fp16 Cast on graph outputs produced by an fp32 (blocked) node.

    With ``keep_io_types`` the converter still appends Cast(fp16) after a blocked node that
    writes a graph output and retypes the output fp16; drop that Cast so the fp32 value is
    the output itself.
    """
    graph = model.graph
    wanted = set(names)
    for value in graph.output:
        if value.name not in wanted or value.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        cast = next(n for n in graph.node if value.name in n.output)
        if cast.op_type != "Cast":
            raise ValueError(f"fp16 conversion left output {value.name!r} fp16 behind a {cast.op_type}")
        inner = cast.input[0]
        for node in graph.node:
            node.output[:] = [value.name if o == inner else o for o in node.output]
            node.input[:] = [value.name if i == inner else i for i in node.input]
        graph.node.remove(cast)
        value.type.tensor_type.elem_type = TensorProto.FLOAT


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the converter's block list and casts key on names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def to_fp16(model: onnx.ModelProto, *, spatial_inputs: Iterable[str],
            keep_fp32_nodes: Iterable[str] = (),
            allowed_custom: Iterable[tuple[str, str]] = ()) -> onnx.ModelProto:
    """fp16 copy of the fp32 ``model`` (module docstring); inputs and outputs stay float32.

    ``spatial_inputs``: the image-sized inputs (nodes independent of them stay fp32).
    ``allowed_custom``: custom (domain, op_type) nodes the check accepts (galip::LMI).
    """
    float16 = _converter()
    model = onnx.ModelProto.FromString(model.SerializeToString())     # leave the caller's alone
    _name_nodes(model)
    blocked_ops = set(float16.DEFAULT_OP_BLOCK_LIST) | set(KEEP_FP32_OPS)
    blocked_nodes = _blocked_nodes(model, spatial_inputs, blocked_ops, keep_fp32_nodes)
    _split_shared_initializers(model, set(blocked_nodes) | {n.name for n in model.graph.node
                                                            if n.op_type in blocked_ops})
    with warnings.catch_warnings():    # "the float32 number 1e-09 will be truncated to 1e-07"
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=sorted(blocked_ops), node_block_list=blocked_nodes,
            min_positive_val=1e-7, max_finite_val=FP16_MAX)
    _restore_fp32_outputs(converted, [v.name for v in model.graph.output
                                      if v.type.tensor_type.elem_type == TensorProto.FLOAT])
    _drop_round_trips(converted)
    for value in (*converted.graph.input, *converted.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            raise ValueError(f"fp16 conversion changed the type of graph I/O {value.name!r}")
    del converted.graph.value_info[:]     # re-inferred below from the converted graph
    return check_graph(converted, allowed_custom=allowed_custom)


def io_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type (TensorProto enum) of every graph input and output, by name."""
    return {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
