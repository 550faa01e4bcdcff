"""galip::LMI as an ONNX local function: onnxruntime (CPU) against a brute-force loop.

The loop below is written from docs/design.md's LMI contract, pixel by pixel and offset by
offset, in float64; the graph must agree to 1e-5 (fp32) on LMI and, wherever the best
offset is not a near-tie, on y_at.
"""
import importlib.util

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from galip.export import lmi_onnx  # noqa: E402
from galip.runtime.errors import ConfigError  # noqa: E402

TOL = 1e-5


def lmi_loop(x, y, patch=3, radius=1, bins=27, sigma=8 / 255, normalize=True):
    """Contract, literally: returns lmi, y_at and the margin best − second best (N, 1, H, W)."""
    centres = np.linspace(0.0, 1.0, bins)

    def soft_bin(v):                                   # (H, W) → (H, W, B), sums to 1
        e = np.exp(-((v[..., None] - centres) ** 2) / (2 * sigma ** 2))
        return e / e.sum(-1, keepdims=True)

    def plogp(p):
        p = p[p > 0]
        return float((p * np.log(p)).sum())            # 0·log 0 = 0

    n_img, _, h, w = x.shape
    half = patch // 2
    out = np.zeros((3, n_img, 1, h, w))
    for n in range(n_img):
        wx, wy = soft_bin(x[n, 0].astype(np.float64)), soft_bin(y[n, 0].astype(np.float64))
        for i in range(h):
            for j in range(w):
                scores = []
                for dy, dx in lmi_onnx.offsets(radius):             # row-major from (−r, −r)
                    joint, pairs = np.zeros((bins, bins)), 0
                    for ki in range(i - half, i + half + 1):
                        for kj in range(j - half, j + half + 1):
                            si, sj = ki + dy, kj + dx               # both inside, else absent
                            if 0 <= ki < h and 0 <= kj < w and 0 <= si < h and 0 <= sj < w:
                                joint += np.outer(wx[ki, kj], wy[si, sj])
                                pairs += 1
                    if pairs == 0:
                        scores.append(0.0)                          # empty histogram
                        continue
                    joint /= pairs
                    h_x, h_y = -plogp(joint.sum(1)), -plogp(joint.sum(0))
                    mi = h_x + h_y + plogp(joint)
                    if normalize:
                        mi = 2 * mi / (h_x + h_y) if h_x + h_y > 0 else 0.0
                    scores.append(mi)
                scores = np.asarray(scores)
                # first offset within the tie tolerance of the max (lmi.cuh's rule)
                best = int(np.argmax(scores >= scores.max() - lmi_onnx.TIE_TOL))
                dy, dx = lmi_onnx.offsets(radius)[best]
                inside = 0 <= i + dy < h and 0 <= j + dx < w
                out[0, n, 0, i, j] = scores[best]
                out[1, n, 0, i, j] = y[n, 0, i + dy, j + dx] if inside else 0.0
                # distance of the decision from flipping: how far the nearest other
                # offset is from the tie threshold
                rest = np.delete(scores, best)
                out[2, n, 0, i, j] = (np.abs(rest - (scores.max() - lmi_onnx.TIE_TOL)).min()
                                      if rest.size else np.inf)
    return out[0], out[1], out[2]


def run_model(model, x, y):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    return session.run(None, {"x": x, "y": y})


def _pair(rng, n, h, w):
    x = rng.random((n, 1, h, w), dtype=np.float32)
    # y: a smooth function of x plus noise, so MI varies over pixels and offsets.
    y = np.clip(0.7 * np.roll(x, 1, axis=3) + 0.3 * rng.random((n, 1, h, w)), 0, 1)
    return x, y.astype(np.float32)


CASES = [  # patch, radius, bins, normalize, (H, W)
    (3, 1, 27, True, (12, 12)),
    (3, 1, 27, False, (9, 14)),
    (5, 1, 12, True, (11, 7)),
    (3, 2, 8, False, (10, 13)),      # r > p // 2: empty offsets at the corners
    (5, 2, 16, True, (8, 9)),
]


@pytest.mark.parametrize("patch,radius,bins,normalize,hw", CASES)
def test_onnxruntime_matches_brute_force_loop(patch, radius, bins, normalize, hw):
    rng = np.random.default_rng(patch * 100 + radius * 10 + bins)
    x, y = _pair(rng, 2, *hw)
    params = dict(patch=patch, radius=radius, bins=bins, sigma=8 / 255, normalize=normalize)
    lmi, y_at = run_model(lmi_onnx.lmi_model(**params), x, y)
    ref_lmi, ref_y_at, margin = lmi_loop(x, y, **params)
    assert lmi.shape == y_at.shape == x.shape and lmi.dtype == np.float32
    np.testing.assert_allclose(lmi, ref_lmi, atol=TOL, rtol=0)
    decided = margin > 10 * TOL                  # the arg-max is not a near-tie there
    assert decided.mean() > 0.9
    np.testing.assert_allclose(y_at[decided], ref_y_at[decided], atol=TOL, rtol=0)


def test_sigma_and_opset_20():
    rng = np.random.default_rng(5)
    x, y = _pair(rng, 1, 7, 10)
    params = dict(patch=3, radius=1, bins=10, sigma=0.06, normalize=True)
    lmi, _ = run_model(lmi_onnx.lmi_model(**params, opset=20), x, y)
    np.testing.assert_allclose(lmi, lmi_loop(x, y, **params)[0], atol=TOL, rtol=0)


def test_constant_images_tie_and_zero_outside():
    x = np.full((1, 1, 6, 5), 0.4, np.float32)
    y = np.full((1, 1, 6, 5), 0.7, np.float32)
    lmi, y_at = run_model(lmi_onnx.lmi_model(), x, y)
    np.testing.assert_allclose(lmi, 0.0, atol=TOL)            # NMI of constant patches
    # every offset ties (MI = 0 up to float noise): the first one, (−1, −1), is chosen,
    # which falls outside along the top row and the left column.
    expected = np.full_like(y, 0.7)
    expected[..., 0, :] = expected[..., :, 0] = 0.0
    np.testing.assert_array_equal(y_at, expected)


def test_lmi_of_image_with_itself_beats_noise():
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 24, 24), dtype=np.float32)
    model = lmi_onnx.lmi_model()
    same, _ = run_model(model, x, x)
    noise, _ = run_model(model, x, rng.random(x.shape, dtype=np.float32))
    assert same.mean() > noise.mean()             # the contract's sanity property


@pytest.mark.skipif(importlib.util.find_spec("galip.train.lmi") is None,
                    reason="galip.train.lmi (the PyTorch reference) is not written yet")
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_pytorch_dense_reference(normalize):
    torch = pytest.importorskip("torch")
    from galip.train.lmi import lmi_dense
    rng = np.random.default_rng(1)
    x, y = _pair(rng, 2 if normalize else 1, 32, 48)        # N = 2 once: the dense path is slow
    lmi, y_at = run_model(lmi_onnx.lmi_model(normalize=normalize), x, y)
    with torch.no_grad():
        ref_lmi, ref_y_at = lmi_dense(torch.from_numpy(x), torch.from_numpy(y), normalize=normalize)
    np.testing.assert_allclose(lmi, ref_lmi.numpy(), atol=TOL, rtol=0)
    agree = np.isclose(y_at, ref_y_at.numpy(), atol=TOL, rtol=0)
    assert agree.mean() > 0.999, f"y_at differs at {np.count_nonzero(~agree)} pixels"


def test_matches_native_host_kernel():
    """ONNX graph against the C++ build of lmi.cuh (the CUDA plugin's per-pixel math)."""
    from galip.runtime import lmi_native
    if not lmi_native.native_available():
        pytest.skip("the native LMI kernel does not build here (no C++ compiler)")
    rng = np.random.default_rng(3)
    x, y = _pair(rng, 2, 32, 48)
    for params in ({}, {"normalize": False}, {"patch": 5, "radius": 2, "bins": 16}):
        model = lmi_onnx.lmi_model(**params, with_offset_index=True)
        lmi, y_at, index = run_model(model, x, y)
        ref_lmi, ref_y_at, ref_index = lmi_native.lmi_numpy(x, y, **params)
        np.testing.assert_allclose(lmi, ref_lmi, atol=TOL, rtol=0)
        assert index.dtype == np.int32
        agree = (index == ref_index) & np.isclose(y_at, ref_y_at, atol=TOL, rtol=0)
        assert agree.mean() > 0.999, f"{params}: differs at {np.count_nonzero(~agree)} pixels"


def test_model_passes_full_checker_and_shape_inference():
    model = lmi_onnx.lmi_model()
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    for out in inferred.graph.output:
        dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        assert dims == ["N", 1, "H", "W"]
    index = onnx.shape_inference.infer_shapes(lmi_onnx.lmi_model(with_offset_index=True),
                                              strict_mode=True).graph.output[2]
    assert index.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("galip", 1)}
    body_ops = {n.op_type for n in model.functions[0].node}
    assert all(onnx.defs.has(op) for op in body_ops)           # standard ops only
    for node in model.functions[0].node:
        if node.op_type == "ArgMax":              # ties go to the first offset
            assert {a.name: a.i for a in node.attribute}["select_last_index"] == 0


def test_node_is_the_tensorrt_plugin_call():
    node = lmi_onnx.lmi_node("a", "b", ("l", "ya"), patch=5, radius=2, bins=16,
                             sigma=0.05, normalize=False)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain) == ("LMI", "galip")
    assert list(node.output) == ["l", "ya", "l_offset_index"]   # the plugin's three outputs
    assert attrs["plugin_namespace"] == b"galip" and attrs["aot"] == 1
    assert (attrs["patch"], attrs["radius"], attrs["bins"], attrs["normalize"]) == (5, 2, 16, 0)
    assert attrs["sigma"] == pytest.approx(0.05)
    function = lmi_onnx.lmi_function_proto(patch=5, radius=2, bins=16, sigma=0.05, normalize=False)
    declared = {a.name for a in function.attribute_proto}
    assert set(attrs) == declared     # every node attribute is declared by the function


def test_add_lmi_function_to_a_bigger_graph():
    helper, TP = onnx.helper, onnx.TensorProto
    dims = ["N", 1, "H", "W"]
    nodes = [helper.make_node("Sigmoid", ["a"], ["a01"]),
             lmi_onnx.lmi_node("a01", "b", ("m", "b_at"), bins=12),
             helper.make_node("Add", ["m", "b_at"], ["out"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TP.FLOAT, dims) for n in ("a", "b")],
        [helper.make_tensor_value_info("out", TP.FLOAT, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    lmi_onnx.add_lmi_function(model, {"bins": 12})
    lmi_onnx.add_lmi_function(model, {"bins": 12})            # idempotent
    assert len(model.functions) == 1 and model.ir_version >= 9
    onnx.checker.check_model(model, full_check=True)
    lmi_onnx.check_lmi_nodes(model)
    rng = np.random.default_rng(2)
    a, b = (rng.random((1, 1, 9, 8), dtype=np.float32) for _ in range(2))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"a": a, "b": b})
    ref_lmi, ref_y_at, margin = lmi_loop(1 / (1 + np.exp(-a)), b, bins=12)
    decided = margin > 10 * TOL
    np.testing.assert_allclose(out[decided], (ref_lmi + ref_y_at)[decided], atol=TOL)
    with pytest.raises(ConfigError, match="one LMI setting per model"):
        lmi_onnx.add_lmi_function(model, {"bins": 27})


def test_node_that_disagrees_with_its_function_is_rejected():
    model = lmi_onnx.lmi_model(bins=12)
    model.graph.node[0].CopyFrom(lmi_onnx.lmi_node("x", "y", ("lmi", "y_at"), bins=27))
    with pytest.raises(ConfigError, match="bins=27"):
        lmi_onnx.check_lmi_nodes(model)


@pytest.mark.parametrize("bad", [{"patch": 4}, {"patch": 0}, {"radius": -1}, {"bins": 1},
                                 {"sigma": 0.0}])
def test_bad_parameters_say_what_is_wrong(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        lmi_onnx.lmi_function_proto(**bad)
