"""The I2I-Galip generator as one ONNX graph with the per-domain conditioning baked in.

Graph (the bundle contract, ``models.generator``)::

    image      float32 [N, 1, H, W]  model space [0, 1], H and W multiples of 32
    domain     int64   [N]           the target domain's class_id (runtime/domains.py)
    translated float32 [N, 1, H, W]  model space (the runtime clips to [0, 1])

The target domain enters the U-Net in two places (paper Eq. 6–7): the class embedding
added in every res block and the caption context read by every cross-attention. Both are
constant per domain, so :class:`GeneratorGraph` precomputes them once per class_id row:

1. per res block, ``Linear(SiLU(class_embed[c]))`` → a table (C_rows, out_ch);
2. per cross-attention, the key and value projections of the domain's context tokens,
   split into heads → K, V (C_rows, heads, L, d).

The rest is the training U-Net itself (``I2IGalipUNet.body``): the table layers plug into
its hooks (ResBlock's ``term``, Attention's ``kv``), so no layer's maths is written twice.

The graph gathers a row of each table by ``domain`` (ONNX ``Gather``): no text tower, no
context tensor and no K/V projection of the context at run time. Rows of class ids the
model was not trained on hold a zero context (``models.generator.domains`` lists the
valid ones).

Also the shared export plumbing of the ``export`` layer: :func:`torch_to_onnx` (the
TorchScript-based exporter with dynamic N/H/W), :func:`check_graph` (full checker, strict
shape inference, no ATen/custom-autograd fallbacks) and :func:`save_graph` (atomic write).
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Iterable

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from galip.runtime.atomic import atomic_path
from galip.runtime.contract import GEN_DOMAIN, GEN_IMAGE, GEN_OUTPUT
from galip.runtime.contract import GENERATOR_INPUTS as INPUTS, GENERATOR_OUTPUTS as OUTPUTS
from galip.runtime.errors import ConfigError
from galip.train.i2i.model import generator_from_checkpoint
from galip.train.i2i.trainer import PAYLOAD_FORMAT as GENERATOR_FORMAT
from galip.train.i2i.unet import Attention, I2IGalipUNet, ResBlock, SpatialTransformer

DEFAULT_OPSET = 18


# ----------------------------------------------------------------------------- the wrapper
class _TableResBlock(nn.Module):
    """The trained res block with its class term ``emb(SiLU(e_c))`` read from a per-domain
    table (ResBlock's ``term`` hook); x (N, C, H, W), domain (N,) → (N, C_out, H', W')."""

    takes = "emb"      # the U-Net body passes the domain index where training passes emb

    def __init__(self, block: ResBlock, class_table: torch.Tensor):
        super().__init__()
        self.block = block
        with torch.no_grad():
            self.register_buffer("emb_table", block.emb(F.silu(class_table)).float())

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.block(x, None, self.emb_table[domain])


class _TableCrossAttention(nn.Module):
    """The trained cross-attention with keys and values of the constant per-domain context
    precomputed per domain (Attention's ``kv`` hook). Called as ``attn2(x, domain)`` by the
    unchanged TransformerBlock (the domain index travels in the ``context`` argument)."""

    def __init__(self, attn: Attention, context_rows: torch.Tensor):
        super().__init__()
        self.attn = attn
        with torch.no_grad():
            self.register_buffer("k_table", attn._split(attn.to_k(context_rows)).contiguous())  # (C_rows, h, L, d)
            self.register_buffer("v_table", attn._split(attn.to_v(context_rows)).contiguous())

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.attn(x, kv=(self.k_table[domain], self.v_table[domain]))


class GeneratorGraph(nn.Module):
    """G(image, class_id) with the per-domain tables baked in (module docstring).

    ``unet``: the trained U-Net (eval); ``context``: (D, L, C) context table in the order
    of ``class_ids`` (the checkpoint's domain order). forward(image (N, 1, H, W) float32,
    domain (N,) int64 class ids) → (N, 1, H, W).
    """

    def __init__(self, unet: I2IGalipUNet, context: torch.Tensor, class_ids: list[int]):
        super().__init__()
        unet = copy.deepcopy(unet).eval().requires_grad_(False)
        rows = unet.config.n_classes
        if context.shape[0] != len(class_ids) or max(class_ids) >= rows:
            raise ConfigError(f"context table {tuple(context.shape)} does not match class ids "
                              f"{class_ids} of a generator with {rows} class rows")
        by_class = context.new_zeros((rows, *context.shape[1:])).float()
        by_class[torch.as_tensor(class_ids)] = context.float()
        class_table = unet.class_embed.weight.detach().float()          # (rows, 4·base)
        for stage in (*unet.input_blocks, unet.middle_block, *unet.output_blocks):
            for i, layer in enumerate(stage):
                if isinstance(layer, ResBlock):
                    stage[i] = _TableResBlock(layer, class_table)
                elif isinstance(layer, SpatialTransformer):
                    for block in layer.blocks:
                        block.attn2 = _TableCrossAttention(block.attn2, by_class)
        unet.class_embed = None            # baked into the tables
        self.unet = unet

    def forward(self, image: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.unet.body(image, domain, domain)      # the training U-Net's own body


def generator_from_payload(payload: dict, *, ema: bool = True) -> tuple[GeneratorGraph, I2IGalipUNet, torch.Tensor, list[dict]]:
    """(graph wrapper, eager U-Net, context table (D, L, C), domain dicts) of a checkpoint.

    ``ema=True`` takes the EMA weights (what the paper evaluates and galip exports).
    """
    if payload.get("format") != GENERATOR_FORMAT:
        raise ConfigError(f"checkpoint format {payload.get('format')!r} is not {GENERATOR_FORMAT!r}")
    unet, context, domains = generator_from_checkpoint(payload, ema=ema)
    return GeneratorGraph(unet, context, [int(d["class_id"]) for d in domains]), unet, context, domains


# ----------------------------------------------------------------------------- export plumbing
def torch_to_onnx(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict, *, opset: int = DEFAULT_OPSET,
                  custom_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    """Trace ``module`` (eval, no grad) with the TorchScript exporter → ModelProto in memory.

    The dynamo exporter needs onnxscript, which galip does not depend on; the TorchScript
    path is deterministic for these plain conv/matmul/softmax networks.
    """
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # legacy-exporter deprecation, tracer shape checks
        torch.onnx.export(module.eval(), args, buffer, dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, do_constant_folding=True,
                          custom_opsets=custom_opsets or {})
    model = onnx.load_from_string(buffer.getvalue())
    model.producer_name = "galip"
    return model


def check_graph(model: onnx.ModelProto, *, allowed_custom: Iterable[tuple[str, str]] = ()) -> onnx.ModelProto:
    """Full ONNX checker + strict shape inference; return the model with inferred value_info.

    Raises ``ValueError`` when a node of a non-default domain other than ``allowed_custom``
    ((domain, op_type) pairs) remains: an ATen fallback or an un-exported autograd Function
    (``prim::PythonOp``) would run nowhere but in PyTorch.
    """
    allowed = set(allowed_custom)
    foreign = sorted({(n.domain, n.op_type) for n in model.graph.node
                      if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in allowed})
    if foreign:
        raise ValueError(f"graph holds non-standard nodes {foreign}: an ATen fallback or an "
                         "autograd Function without a symbolic; rewrite that part of the model")
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def save_graph(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` atomically (one file: graphs stay below protobuf's 2 GB)."""
    path = Path(path)
    data = model.SerializeToString()
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_bytes(data)
    return path


def export_generator(payload: dict, *, opset: int = DEFAULT_OPSET, trace_size: int = 64,
                     ema: bool = True) -> onnx.ModelProto:
    """The checked fp32 generator graph of a ``galip-train generator`` checkpoint payload."""
    graph, unet, _, domains = generator_from_payload(payload, ema=ema)
    multiple = unet.config.size_multiple
    size = max(multiple, trace_size // multiple * multiple)
    image = torch.rand(2, 1, size, size)
    domain = torch.tensor([int(d["class_id"]) for d in domains][:2] * 2)[:2]
    spatial = {0: "N", 2: "H", 3: "W"}
    model = torch_to_onnx(graph, (image, domain), list(INPUTS), list(OUTPUTS),
                          {GEN_IMAGE: spatial, GEN_DOMAIN: {0: "N"}, GEN_OUTPUT: spatial}, opset=opset)
    model.doc_string = ("galip I2I-Galip generator: image [N,1,H,W] in [0,1], domain = class_id [N] "
                        "-> translated [N,1,H,W]")
    return check_graph(model)
