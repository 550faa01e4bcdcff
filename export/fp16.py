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

The converter clamps fp32 constants into fp16's range (|v| in [1e-7, 1e4] by default,
kept as is here) and inserts the casts; the result is checked and shape-inferred again.
"""
from __future__ import annotations

from typing import Iterable

import onnx
from onnx import TensorProto

from galip.runtime.errors import ConfigError

from .generator_graph import check_graph

INSTALL = "pip install 'galip[train]' (onnxconverter-common)"
KEEP_FP32_OPS = (
    "LMI",                                                      # galip::LMI (contract: fp32)
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
    image inputs when any of its inputs does. Constants and initializers do not.
    """
    tainted = set(spatial_inputs)
    keep = []
    for node in model.graph.node:
        if any(name in tainted for name in node.input):
            tainted.update(node.output)
        else:
            keep.append(node.name)
    return keep


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
    blocked_ops = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(KEEP_FP32_OPS))
    blocked_nodes = sorted(set(fp32_nodes(model, spatial_inputs)) | set(keep_fp32_nodes))
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=blocked_ops, node_block_list=blocked_nodes)
    for value in (*converted.graph.input, *converted.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            raise ValueError(f"fp16 conversion changed the type of graph I/O {value.name!r}")
    del converted.graph.value_info[:]     # re-inferred below from the converted graph
    return check_graph(converted, allowed_custom=allowed_custom)


def io_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type (TensorProto enum) of every graph input and output, by name."""
    return {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
