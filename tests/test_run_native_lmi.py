"""The onnxruntime-cpu fast path: galip::LMI nodes on the native kernel, the rest in onnxruntime.

A real exported step graph (tiny random score net, galip.export.diffusion_graph) through
:class:`SplitLmiRunner` must equal the plain graph in onnxruntime to 1e-5 for several rows of
a schedule, lmi.onnx likewise; a galip-run diffusion translation must give the same volume
(1e-4 relative) with ``GALIP_LMI=onnx`` and with the native path, and say which it used.
Splitting is also checked on hand-built graphs with two LMI nodes and with none.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from fixtures_bundle import LMI as SMALL_LMI, lps_affine, phantom_volume, write_volume  # noqa: E402
from helpers_export import diffusion_payload, phantom_slices, save_payload  # noqa: E402

from galip.export import lmi_onnx  # noqa: E402
from galip.export import diffusion_graph as dg
from galip.train.midiffusion.trainer import denoiser_from_payload  # noqa: E402
from galip.export.bundle_writer import ExportOptions, export_checkpoint  # noqa: E402
from galip.runtime import lmi_native  # noqa: E402
from galip.runtime import schedule as S  # noqa: E402
from galip.runtime.backends.onnxruntime import OnnxrtRunner, SessionFromOnnx  # noqa: E402
from galip.runtime.backends.onnxruntime.split_lmi import (  # noqa: E402
    SplitLmiRunner, split_at_lmi, split_problem)
from galip.runtime.backends.select import select_backend  # noqa: E402
from galip.runtime.bundle import load_bundle  # noqa: E402
from galip.runtime.cli import app  # noqa: E402
from galip.runtime.errors import BackendError, ConfigError  # noqa: E402
from galip.runtime.settings import Settings  # noqa: E402

pytestmark = pytest.mark.skipif(not lmi_native.native_available(),
                                reason=f"native LMI kernel unavailable: {lmi_native.native_unavailable_reason()}")
THREADS = 1   # the CPU is shared



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(step graph path, lmi.onnx path, schedule) of a tiny random score net."""
    root = tmp_path_factory.mktemp("graphs")
    denoiser, schedule, _ = denoiser_from_payload(diffusion_payload(seed=1))
    onnx.save(dg.export_step(denoiser, opset=18), root / "step.onnx")
    onnx.save(dg.export_lmi(dg.lmi_settings(denoiser.lmi_config), opset=18), root / "lmi.onnx")
    return root / "step.onnx", root / "lmi.onnx", schedule


def plain(path) -> OnnxrtRunner:
    return OnnxrtRunner(SessionFromOnnx(path, threads=THREADS))


def split(path) -> SplitLmiRunner:
    return SplitLmiRunner(path, threads=THREADS)


def assert_same(got: dict, want: dict, atol: float = 1e-5, argmax: tuple[str, ...] = ()) -> None:
    """Same names, dtypes, shapes and values to ``atol``. Outputs in ``argmax`` (y at the
    arg-max offset) may differ where two offsets tie within float noise (implementations break
    near-ties differently, as in test_lmi_onnx): they must agree on 99 % of the pixels."""
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        if name in argmax:
            agree = np.isclose(got[name], want[name], rtol=0, atol=atol)
            assert agree.mean() >= 0.99, f"{name} differs at {np.count_nonzero(~agree)} of {agree.size} pixels"
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------- step graph
def test_step_graph_splits_around_its_one_lmi_node(exported):
    step, _, _ = exported
    cut = split_at_lmi(step)
    assert len(cut.calls) == 1 and len(cut.segments) == 2
    call = cut.calls[0]
    assert call.x == "source" and call.params == dg.lmi_settings(dg.LMIConfig())
    pre, post = cut.segments
    assert pre.inputs == ["x_t"] and pre.outputs == [call.y]          # u(x_t) = clip((x_t+1)/2, 0, 1)
    assert post.outputs == ["x_prev", "x0_pred"]
    assert call.outputs[0] in post.inputs                              # lmi is fed ...
    assert not set(call.outputs[1:]) & set(post.inputs)                # ... y_at, offset_index are not
    assert "source" not in post.inputs                                 # read only by the LMI
    for segment in cut.segments:                                       # no LMI node, no LMI function
        assert not segment.model.functions
        assert all(node.domain != lmi_onnx.DOMAIN for node in segment.model.graph.node)


@pytest.mark.parametrize("t, t_prev, eta", [(19, 15, 0.0), (11, 6, 1.0), (4, 0, 0.5), (0, -1, 0.0)])
def test_split_step_equals_the_plain_graph(exported, t, t_prev, eta):
    step, lmi_graph, schedule = exported
    ab = schedule.alphas_cumprod.double().numpy()
    ab_t, ab_prev = ab[t], (ab[t_prev] if t_prev >= 0 else 1.0)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    coef_xt = np.sqrt(max(0.0, 1 - ab_prev - sigma ** 2) / (1 - ab_t))
    coef_x0, coef_x0_last = np.sqrt(ab_prev) - coef_xt * np.sqrt(ab_t), -0.1 * (t_prev >= 0)
    rng = np.random.default_rng(t)
    source = phantom_slices(2, 40, 48, seed=t)
    x0 = 2 * phantom_slices(2, 40, 48, seed=t + 100) - 1
    x_t = (np.sqrt(ab_t) * x0 + np.sqrt(1 - ab_t) * rng.standard_normal(x0.shape)).astype(np.float32)
    with split(lmi_graph) as runner:
        lmi_source = runner.infer({"x": source, "y": source})["lmi"]
    scalar = lambda v: np.array([v], np.float32)    # noqa: E731
    feed = {"x_t": x_t, "source": source, "lmi_source": lmi_source, "timestep": scalar(t),
            "alpha_bar_t": scalar(ab_t), "coef_xt": scalar(coef_xt), "coef_x0": scalar(coef_x0),
            "coef_x0_last": scalar(coef_x0_last), "sigma": scalar(sigma),
            "noise": rng.standard_normal(x0.shape, dtype=np.float32), "x0_last": x0[::-1].copy()}
    with plain(step) as reference, split(step) as runner:
        assert runner.input_metadata == reference.input_metadata
        assert runner.output_metadata == reference.output_metadata
        want, got = reference.infer(feed), runner.infer(feed)
        assert len(runner.segment_times) == 3
        # run_loop (the pipeline's entry point) carries x_prev → x_t, x0_pred → x0_last like the plain runner
        rows = [{"noise": feed["noise"] * k} for k in (1.0, 0.5)]
        assert_same(runner.run_loop(feed, rows), reference.run_loop(feed, rows))
    assert_same(got, want)


def test_split_lmi_graph_is_a_bare_kernel_call(exported):
    _, lmi_graph, _ = exported
    cut = split_at_lmi(lmi_graph)
    assert [s.model for s in cut.segments] == [None, None]
    x, y = phantom_slices(2, 24, 40, seed=3), phantom_slices(2, 24, 40, seed=4)
    with plain(lmi_graph) as reference, split(lmi_graph) as runner:
        assert runner.output_names == reference.output_names == ["lmi", "y_at"]
        for feed in ({"x": x, "y": y}, {"x": x, "y": x}):
            assert_same(runner.infer(feed), reference.infer(feed), argmax=("y_at",))


# ----------------------------------------------------------------------------- hand-built graphs
DIMS = ["N", 1, "H", "W"]


def _graph(nodes, inputs, outputs, lmi: dict | None = None, initializers=()) -> onnx.ModelProto:
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, DIMS)   # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi(n) for n in inputs], [vi(n) for n in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=lmi_onnx.MIN_IR_VERSION)
    return lmi_onnx.add_lmi_function(model, lmi) if lmi is not None else model


def two_lmi_graph() -> onnx.ModelProto:
    """a = LMI(x, y); b = LMI(x, clip(a)); out = a + 2·b, and y_at of the first as a second output."""
    N = helper.make_node
    nodes = [
        N("Mul", ["y", "half"], ["y2"]),
        lmi_onnx.lmi_node("x", "y2", ("a", "a_y_at"), name="first", **SMALL_LMI),
        N("Clip", ["a", "zero", "one"], ["a01"]),
        lmi_onnx.lmi_node("x", "a01", ("b", "b_y_at"), name="second", **SMALL_LMI),
        N("Mul", ["b", "two"], ["b2"]),
        N("Add", ["a", "b2"], ["out"]),
    ]
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v])
              for n, v in (("half", 0.5), ("zero", 0.0), ("one", 1.0), ("two", 2.0))]
    return _graph(nodes, ["x", "y"], ["out", "a_y_at"], SMALL_LMI, consts)


def test_graph_with_two_lmi_nodes_splits_at_each(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(two_lmi_graph(), path)
    cut = split_at_lmi(path)
    assert [c.name for c in cut.calls] == ["first", "second"] and len(cut.segments) == 3
    assert [(s.inputs, s.outputs) for s in cut.segments] == [(["y"], ["y2"]), (["a"], ["a01"]), (["a", "b"], ["out"])]
    feed = {"x": phantom_slices(2, 20, 28, seed=5), "y": phantom_slices(2, 20, 28, seed=6)}
    with plain(path) as reference, split(path) as runner:
        assert_same(runner.infer(feed), reference.infer(feed), argmax=("a_y_at",))


def test_graph_without_lmi_node_is_refused(tmp_path):
    path = tmp_path / "none.onnx"
    onnx.save(_graph([helper.make_node("Add", ["x", "y"], ["out"])], ["x", "y"], ["out"]), path)
    assert split_problem(path) == "the graph has no galip::LMI node"
    with pytest.raises(BackendError, match="no galip::LMI node"):
        split_at_lmi(path)
    with pytest.raises(BackendError, match="no galip::LMI node"):
        split(path).activate()


def test_node_disagreeing_with_its_function_is_refused(tmp_path):
    model = two_lmi_graph()
    node = next(n for n in model.graph.node if n.name == "second")
    next(a for a in node.attribute if a.name == "bins").i = 27      # the function body still uses 8
    path = tmp_path / "drift.onnx"
    onnx.save(model, path)
    assert "function body computes" in split_problem(path)
    with pytest.raises(BackendError, match="'second'.*function body computes"):
        split_at_lmi(path)


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A galip-export bundle (fp32 step graph + lmi.onnx, no engines) of a tiny score net."""
    root = tmp_path_factory.mktemp("bundle")
    checkpoint = save_payload(diffusion_payload(seed=2, target="T2"), root / "checkpoint.pt")
    export_checkpoint(checkpoint, root / "b", ExportOptions(fp16=False, engines=False))
    return root / "b"


@pytest.fixture
def no_gpu_backends(monkeypatch):
    from galip.runtime import device_info
    monkeypatch.setattr(device_info, "import_tensorrt", lambda: None)
    monkeypatch.setattr(device_info, "tensorrt_version", lambda: None)


def test_selection_says_where_the_lmi_runs(bundle, no_gpu_backends, monkeypatch):
    loaded = load_bundle(bundle)
    monkeypatch.setenv("GALIP_LMI", "onnx")         # only galip-run's --lmi default reads it
    factory, choice = select_backend(loaded, "diffusion", "onnxruntime-cpu", domain="T2")
    assert choice.lmi == "native" and choice.reason.endswith("; LMI on the native CPU kernel")
    assert isinstance(factory(), SplitLmiRunner)
    factory, choice = select_backend(loaded, "diffusion", "onnxruntime-cpu", domain="T2", lmi="onnx")
    assert choice.lmi == "onnx" and choice.reason.endswith("; LMI in the ONNX graph (--lmi onnx)")
    assert type(factory()) is OnnxrtRunner
    with pytest.raises(ConfigError, match="--lmi must be one of auto, native, onnx"):
        select_backend(loaded, "diffusion", "onnxruntime-cpu", domain="T2", lmi="bogus")
    with pytest.raises(ConfigError, match="--lmi must be one of auto, native, onnx"):
        Settings(lmi="bogus").check()


def test_without_the_kernel_auto_falls_back_and_native_refuses(bundle, no_gpu_backends, monkeypatch):
    monkeypatch.setattr(lmi_native, "native_unavailable_reason", lambda: "no C++ compiler")
    loaded = load_bundle(bundle)
    factory, choice = select_backend(loaded, "diffusion", domain="T2")
    assert choice.name == "onnxruntime-cpu" and choice.lmi == "onnx"
    assert choice.reason.endswith("LMI in the ONNX graph (native CPU kernel unavailable: no C++ compiler)")
    assert type(factory()) is OnnxrtRunner
    with pytest.raises(BackendError, match="--lmi native but .*no C\\+\\+ compiler"):
        select_backend(loaded, "diffusion", domain="T2", lmi="native")


def test_galip_run_gives_the_same_volume_with_either_lmi(bundle, tmp_path, no_gpu_backends, monkeypatch):
    data = phantom_volume(shape=(20, 24, 3))
    source = write_volume(tmp_path / "s.nii.gz", data, lps_affine())
    volumes, outputs = {}, {}
    for mode, flag in (("onnx", []), ("auto", ["--lmi", "auto"])):
        monkeypatch.setenv("GALIP_LMI", mode)       # the default of --lmi; the flag wins
        out = tmp_path / f"{mode}.nii.gz"
        result = CliRunner().invoke(app, [str(source), "--to", "T2", "--model", "diffusion", "--bundle",
                                          str(bundle), "--out", str(out), "--sampler", "ddim", "--steps", "3", "--eta", "1",
                                          "--threads", str(THREADS), *flag])
        assert result.exit_code == 0, result.output
        outputs[mode] = result.stdout
        volumes[mode] = np.asarray(nib.load(str(out)).dataobj, dtype=np.float32)
    assert "LMI on the native CPU kernel" in outputs["auto"]
    assert "LMI in the ONNX graph (--lmi onnx)" in outputs["onnx"]
    scale = np.abs(volumes["onnx"]).max()
    assert scale > 0
    np.testing.assert_allclose(volumes["auto"], volumes["onnx"], rtol=0, atol=1e-4 * scale)


def test_step_table_rows_feed_the_split_runner(bundle, no_gpu_backends, monkeypatch):
    """The runtime's own table (not a hand-made one) through both runners, one batch."""
    loaded = load_bundle(bundle)
    spec = loaded.model("diffusion", "T2")
    table = S.step_table(spec.schedule, "dpmpp2m", 4)
    source = phantom_slices(1, 32, 32, seed=9)
    rng = np.random.default_rng(0)
    step = loaded.path(spec.graphs["fp32"].file)
    with plain(step) as reference, split(step) as runner, split(loaded.path(spec.lmi_graph.file)) as lmi:
        init = {"x_t": rng.standard_normal(source.shape, dtype=np.float32), "source": source,
                "lmi_source": lmi.infer({"x": source, "y": source})["lmi"], "x0_last": np.zeros_like(source)}
        rows = [{**row, "noise": rng.standard_normal(source.shape, dtype=np.float32)} for row in table.feeds()]
        assert_same(runner.run_loop(init, rows), reference.run_loop(init, rows), atol=1e-4)
