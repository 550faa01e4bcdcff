"""LMI as an ONNX model-local function ``galip::LMI`` built from standard ops only.

One operator, three implementations (docs/design.md, "The LMI operator"): this is the portable
one. It runs in onnxruntime on CPU through the function body; TensorRT (whose ONNX parser
prefers a registered plugin over a local function of the same name since 10.7, per the
onnx-tensorrt 10.7 release notes) maps the very same node to the
CUDA plugin of :mod:`galip.export.tensorrt.lmi_plugin` through ``op_type`` + the
``plugin_namespace`` attribute.

Contract, with the ONNX ops that implement each step of the function body:

1. soft-bin every pixel, w_a(v) = exp(−(v − c_a)² / 2σ²) / Σ_b exp(−(v − c_b)² / 2σ²),
   c = linspace(0, 1, B): ``Softmax`` over the bin axis of −(v − c)²/2σ², (N, B, H, W);
2. per offset τ = (dy, dx) ∈ [−r, r]², row-major from (−r, −r): shift Y's weights, Y and an
   all-ones validity mask by τ with ``Pad`` (zeros, once) + ``Slice``; out-of-image samples
   get all-zero weights, so they are absent, never intensity 0;
3. joint P_τ(a, b)(i) = Σ_j w_a(X_j) w_b(Y_{j+τ}) / #pairs over the p × p patch around i
   with both j and j + τ inside: outer product ``Mul`` → (N, B·B, H, W), box mean with
   ``AveragePool`` (count_include_pad=1, zero padding drops j outside) over the box mean of
   the shifted mask (the same 1/p² cancels);
4. marginals of that joint (Σ_b P(a, b) = box mean of w_a(X_j) over the same valid pairs,
   as Σ_b w_b = 1; likewise over a: ``AveragePool`` of B channels, no B·B reduction),
   entropies −Σ p log p guarded as p·log(max(p, 1e-30)) (0·log 0 = 0), MI = H_X + H_Y − H_XY
   = Σ P log(P / P_X P_Y), NMI = 2·MI / (H_X + H_Y);
5. stack the T = (2r + 1)² maps (N, T, H, W); the chosen offset is the first one whose MI
   is within 1e-6 of the max (``ArgMax`` with select_last_index=0 over that indicator; the
   tolerance is lmi.cuh's, so float noise cannot flip exact ties), and ``GatherElements``
   takes the LMI and the shifted Y (0 outside) there; the index itself is the third output,
   ``offset_index`` (int32), as the CUDA kernel (and so the TensorRT plugin) writes it.

Edge cases the contract leaves open, decided as in ``runtime/kernels/lmi.cuh``: an offset
with no valid pair in the patch (only possible when r > p // 2) has MI = 0; NMI with
H_X + H_Y = 0 is 0.

Parameters are baked into the body at construction (model settings stored in the
manifest). The node still carries them, plus ``plugin_namespace`` and ``aot``, as
attributes: the TensorRT parser hands node attributes to the plugin, and the function
declares every one of them with its baked value as default so onnxruntime accepts the call
(:func:`check_lmi_nodes` rejects a node whose attributes disagree with its function).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from galip.runtime.contract import LMI_GRAPH_INPUTS, LmiParams
from galip.runtime.contract.lmi import DEFAULT_LMI as _D
from galip.runtime.contract.lmi import LMI_DOMAIN as DOMAIN            # noqa: F401 (re-exported)
from galip.runtime.contract.lmi import LMI_NODE_OUTPUTS as OUTPUTS     # float32, float32, int32
from galip.runtime.contract.lmi import LMI_OP_TYPE as OP_TYPE
from galip.runtime.contract.lmi import LMI_PLUGIN_NAMESPACE as PLUGIN_NAMESPACE
from galip.runtime.errors import ConfigError
from galip.runtime.lmi_native import TIE_TOL  # the kernel's tie rule, one value for all implementations

DEFAULT_OPSET = 17
MIN_OPSET = 13                   # Softmax over one axis; Unsqueeze axes as an input
MIN_IR_VERSION = 9               # FunctionProto.attribute_proto (attribute defaults)
_INT64_MAX = np.iinfo(np.int64).max


def lmi_params(patch: int = _D.patch, radius: int = _D.radius, bins: int = _D.bins, sigma: float = _D.sigma,
               normalize: bool = _D.normalize) -> dict:
    """Checked LMI parameters as a plain dict, σ in float32 (the manifest's ``lmi`` settings)."""
    return LmiParams(patch, radius, bins, sigma, bool(normalize)).to_manifest()


def offsets(radius: int) -> list[tuple[int, int]]:
    """The T = (2r + 1)² offsets (dy, dx) in the contract's row-major order from (−r, −r)."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


class _Body:
    """Collects the nodes of a function body and hands out fresh value names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        self._count += 1
        out = f"const_{self._count}"
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name=out)
        self.nodes.append(helper.make_node("Constant", [], [out], value=tensor))
        return out


def _sum_plogp(g: _Body, p: str, channels: int) -> str:
    """Σ_channels p log p of (N, C, H, W) → (N, 1, H, W), with 0·log 0 = 0.

    The guard is log(max(p, 1e-30)): exact at p = 0, and below 1e-30 the term is < 1e-28.
    The channel sum is a 1×1 Conv with ones (a GEMM, much faster than ReduceSum here).
    """
    plogp = g.op("Mul", p, g.op("Log", g.op("Max", p, g.const(1e-30))))
    return g.op("Conv", plogp, g.const(np.ones((1, channels, 1, 1))))


def _function_attributes(params: dict) -> list[onnx.AttributeProto]:
    """The node attributes the function accepts, with the baked values as defaults."""
    return [helper.make_attribute("patch", params["patch"]),
            helper.make_attribute("radius", params["radius"]),
            helper.make_attribute("bins", params["bins"]),
            helper.make_attribute("sigma", params["sigma"]),
            helper.make_attribute("normalize", int(params["normalize"])),
            helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
            helper.make_attribute("aot", 1)]


def lmi_function_proto(patch: int = _D.patch, radius: int = _D.radius, bins: int = _D.bins,
                       sigma: float = _D.sigma, normalize: bool = _D.normalize,
                       opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """The ``galip::LMI`` local function: X, Y (N, 1, H, W) float32 → lmi, y_at, offset_index.

    lmi, y_at (N, 1, H, W) float32; offset_index (N, 1, H, W) int32, the row-major index of
    the chosen offset (0 = (−r, −r)), as the CUDA kernel writes it (the plugin's 3rd output).

    N, H, W are dynamic; the parameters are baked in. ``opset`` is the default-domain opset
    the body is written for (>= 13; it must equal the opset of the model that holds it).
    """
    params = lmi_params(patch, radius, bins, sigma, normalize)
    if opset < MIN_OPSET:
        raise ConfigError(f"the LMI function needs ONNX opset >= {MIN_OPSET}, got {opset}")
    p, r, B = params["patch"], params["radius"], params["bins"]
    g = _Body()

    # Shape (N, B·B, H, W) of the flattened joint.
    shape_x = g.op("Shape", "X")
    n_ = g.op("Slice", shape_x, g.const([0], np.int64), g.const([1], np.int64))
    hw_ = g.op("Slice", shape_x, g.const([2], np.int64), g.const([4], np.int64))
    shape_joint = g.op("Concat", n_, g.const([B * B], np.int64), hw_, axis=0)

    # 1. Soft-bin weights (N, B, H, W): softmax over bins of −(v − c)² / 2σ².
    centres = g.const(np.linspace(0.0, 1.0, B, dtype=np.float32).reshape(1, B, 1, 1))
    neg_inv_two_var = g.const(-1.0 / (2.0 * params["sigma"] ** 2))

    def soft_bin(v: str) -> str:
        d = g.op("Sub", v, centres)
        return g.op("Softmax", g.op("Mul", g.op("Mul", d, d), neg_inv_two_var), axis=1)

    w_x, w_y = soft_bin("X"), soft_bin("Y")

    # 2. Zero-pad Y, its weights and the validity mask by r once; each offset is a Slice.
    pads = g.const([0, 0, r, r, 0, 0, r, r], np.int64)
    ones = g.op("ConstantOfShape", shape_x,
                value=numpy_helper.from_array(np.ones(1, np.float32)))
    y_pad, w_y_pad, mask_pad = (g.op("Pad", v, pads) for v in ("Y", w_y, ones))
    w_x5 = g.op("Unsqueeze", w_x, g.const([2], np.int64))             # (N, B, 1, H, W)
    axes_hw = g.const([2, 3], np.int64)
    pool = {"kernel_shape": [p, p], "pads": [p // 2] * 4, "strides": [1, 1],
            "count_include_pad": 1}
    tiny = g.const(0.5 / (p * p))        # below any non-empty pair count / p²
    zero, one, two = g.const(0.0), g.const(1.0), g.const(2.0)
    mi_maps, y_shifted = [], []
    for dy, dx in offsets(r):
        # Slice [r + d, r + d + size) of the padded axis, i.e. end = −(r − d) or "to the end".
        starts = g.const([r + dy, r + dx], np.int64)
        ends = g.const([-(r - d) if r - d > 0 else _INT64_MAX for d in (dy, dx)], np.int64)
        shift = lambda v: g.op("Slice", v, starts, ends, axes_hw)     # noqa: E731
        y_s, w_y_s, mask_s = shift(y_pad), shift(w_y_pad), shift(mask_pad)
        y_shifted.append(y_s)

        # 3. Joint histogram over the valid pairs of the patch, kept as S = Σ_pairs / p²
        #    (N, B·B, H, W) and c = #pairs / p² (N, 1, H, W): P = S / c.
        outer = g.op("Mul", w_x5, g.op("Unsqueeze", w_y_s, g.const([1], np.int64)))
        s_joint = g.op("AveragePool", g.op("Reshape", outer, shape_joint), **pool)
        count = g.op("AveragePool", mask_s, **pool)
        c_safe = g.op("Max", count, tiny)

        # 4. Marginals of that joint without summing it: P_X(a) = Σ_b P(a, b) is the mean over
        #    the same valid pairs of w_a(X_j), since Σ_b w_b(Y_{j+τ}) = 1 (likewise P_Y), so
        #    they are box means of B channels. H_X + H_Y = −Σ p log p over those 2B channels;
        #    with Σ_ab S = c, H_XY = −Σ P log P = log c − Σ S log S / c (S is not divided).
        p_x = g.op("AveragePool", g.op("Mul", w_x, mask_s), **pool)
        p_y = g.op("AveragePool", w_y_s, **pool)
        marg = g.op("Div", g.op("Concat", p_x, p_y, axis=1), c_safe)   # (N, 2B, H, W)
        h_marg = g.op("Neg", _sum_plogp(g, marg, 2 * B))
        h_xy = g.op("Sub", g.op("Log", c_safe), g.op("Div", _sum_plogp(g, s_joint, B * B), c_safe))
        mi = g.op("Sub", h_marg, h_xy)
        if params["normalize"]:
            # NMI = 2·MI / (H_X + H_Y), 0 where H_X + H_Y = 0 (as lmi.cuh).
            positive = g.op("Greater", h_marg, zero)
            safe = g.op("Where", positive, h_marg, one)
            mi = g.op("Where", positive, g.op("Div", g.op("Mul", mi, two), safe), zero)
        # An offset without any valid pair has an empty histogram: MI = 0.
        mi = g.op("Where", g.op("Greater", count, zero), mi, zero)
        mi_maps.append(mi)                                               # (N, 1, H, W)

    # 5. Max over offsets; ties (|ΔMI| <= TIE_TOL, as GALIP_LMI_TIE_TOL in lmi.cuh) go to the
    #    first offset: ArgMax of the "within tol of the max" indicator, first index on ties.
    #    lmi = MI there, y_at = shifted Y there (0 where that offset falls outside).
    mi_stack = g.op("Concat", *mi_maps, axis=1)                          # (N, T, H, W)
    y_stack = g.op("Concat", *y_shifted, axis=1)
    top = g.op("GatherElements", mi_stack,
               g.op("ArgMax", mi_stack, axis=1, keepdims=1, select_last_index=0), axis=1)
    near_top = g.op("GreaterOrEqual", mi_stack, g.op("Sub", top, g.const(TIE_TOL)))
    best = g.op("ArgMax", g.op("Cast", near_top, to=TensorProto.FLOAT), axis=1, keepdims=1,
                select_last_index=0)
    g.nodes.append(helper.make_node("GatherElements", [mi_stack, best], [OUTPUTS[0]], axis=1))
    g.nodes.append(helper.make_node("GatherElements", [y_stack, best], [OUTPUTS[1]], axis=1))
    g.nodes.append(helper.make_node("Cast", [best], [OUTPUTS[2]], to=TensorProto.INT32))

    doc = (f"galip LMI (docs/design.md contract): patch={p} radius={r} bins={B} "
           f"sigma={params['sigma']!r} normalize={params['normalize']}")
    return helper.make_function(
        DOMAIN, OP_TYPE, ["X", "Y"], list(OUTPUTS), g.nodes,
        [helper.make_opsetid("", opset)],
        attribute_protos=_function_attributes(params), doc_string=doc)


def lmi_node(x: str, y: str, outputs=OUTPUTS[:2], name: str | None = None,
             **params) -> onnx.NodeProto:
    """A call of ``galip::LMI`` on value names ``x``, ``y``.

    ``outputs``: names for (lmi, y_at) or (lmi, y_at, offset_index); with two, the third is
    named ``<lmi>_offset_index`` (the node always has the plugin's three outputs, TensorRT
    maps node outputs to plugin outputs one to one; onnxruntime drops an unused one).
    Attributes: the LMI parameters, ``plugin_namespace="galip"`` and ``aot=1``: TensorRT
    maps the node to the plugin by op_type + namespace (and picks its AOT kernel);
    onnxruntime runs the function body, which declares these attributes.
    """
    outputs = list(outputs)
    if len(outputs) == 2:
        outputs.append(f"{outputs[0]}_offset_index")
    if len(outputs) != 3:
        raise ConfigError(f"an LMI node has outputs (lmi, y_at[, offset_index]), got {outputs}")
    attrs = {a.name: helper.get_attribute_value(a)
             for a in _function_attributes(lmi_params(**params))}
    return helper.make_node(OP_TYPE, [x, y], outputs, name=name or f"{OP_TYPE}_{x}_{y}",
                            domain=DOMAIN, **attrs)


def _opset_of(model: onnx.ModelProto, domain: str) -> int | None:
    return next((o.version for o in model.opset_import if o.domain == domain), None)


def _baked_params(function: onnx.FunctionProto) -> dict:
    """The parameters a ``galip::LMI`` function was built with (its attribute defaults)."""
    values = {a.name: helper.get_attribute_value(a) for a in function.attribute_proto}
    values["normalize"] = bool(values["normalize"])
    return {k: values[k] for k in _D.kwargs()}


def add_lmi_function(model: onnx.ModelProto, params: dict | None = None) -> onnx.ModelProto:
    """Add the ``galip::LMI`` function (and the 'galip' opset import) to ``model`` in place.

    The function is written for the model's default-domain opset; the IR version is raised
    to >= 9 (function attribute defaults). A model holds one LMI setting: an existing
    ``galip::LMI`` function with other parameters is an error. Returns ``model``.
    """
    params = lmi_params(**{**_D.kwargs(), **(params or {})})
    opset = _opset_of(model, "")
    if opset is None or opset < MIN_OPSET:
        raise ConfigError(f"the LMI function needs a model with default-domain opset >= "
                          f"{MIN_OPSET}, got {opset}; export the model with a newer opset")
    for existing in model.functions:
        if (existing.domain, existing.name) == (DOMAIN, OP_TYPE):
            if _baked_params(existing) != params:
                raise ConfigError(f"model already holds galip::LMI with {_baked_params(existing)}, "
                                  f"asked for {params}; one LMI setting per model")
            return model
    model.functions.append(lmi_function_proto(**params, opset=opset))
    if _opset_of(model, DOMAIN) is None:
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model


def check_lmi_nodes(model: onnx.ModelProto) -> None:
    """Raise ConfigError where a ``galip::LMI`` node's attributes disagree with its function.

    onnxruntime runs the baked body whatever the node says, while TensorRT's plugin reads
    the node: the two must not drift apart.
    """
    function = next((f for f in model.functions if (f.domain, f.name) == (DOMAIN, OP_TYPE)), None)
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]
    if nodes and function is None:
        raise ConfigError("model has galip::LMI nodes but no galip::LMI function; "
                          "call add_lmi_function(model, params)")
    for node in nodes:
        given = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for a in function.attribute_proto:
            want = helper.get_attribute_value(a)
            got = given.get(a.name, want)
            if isinstance(want, bytes):
                same = got == want
            else:
                same = np.isclose(float(got), float(want), rtol=1e-6, atol=0)
            if not same:
                raise ConfigError(f"LMI node {node.name!r}: attribute {a.name}={got!r} but its "
                                  f"function was built with {want!r}; rebuild the node")


def lmi_model(patch: int = _D.patch, radius: int = _D.radius, bins: int = _D.bins, sigma: float = _D.sigma,
              normalize: bool = _D.normalize, opset: int = DEFAULT_OPSET,
              with_offset_index: bool = False) -> onnx.ModelProto:
    """Standalone model x, y (N, 1, H, W) float32 → lmi, y_at (+ offset_index int32)."""
    params = lmi_params(patch, radius, bins, sigma, normalize)
    dims = ["N", 1, "H", "W"]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in OUTPUTS[:2]]
    if with_offset_index:
        outputs.append(helper.make_tensor_value_info(OUTPUTS[2], TensorProto.INT32, dims))
    graph = helper.make_graph(
        [lmi_node(*LMI_GRAPH_INPUTS, OUTPUTS, name="lmi", **params)], "galip_lmi",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in LMI_GRAPH_INPUTS], outputs)
    opsets = [helper.make_opsetid("", opset)]
    ir_version = max(MIN_IR_VERSION, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version,
                              producer_name="galip")
    add_lmi_function(model, params)
    return model
