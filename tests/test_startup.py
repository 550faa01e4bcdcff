"""Start-up: load_bundle opens no graph, a diffusion run parses its step graph once in Python,
checksums are verified when a file is opened, and a TensorRT deployment needs no onnx."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from fixtures_bundle import lps_affine, phantom_volume, write_volume
from galip.runtime import device_info
from galip.runtime.backends.native_lmi import NativeLmiRunner
from galip.runtime.backends.select import Choice, select_backend, select_lmi
from galip.runtime.backends.tensorrt import TrtRunner
from galip.runtime.bundle import MANIFEST_NAME, load_bundle, write_manifest
from galip.runtime.cli import app
from galip.runtime.contract import LmiParams
from galip.runtime.errors import BundleError
from galip.runtime.schedule import NoiseSchedule

from test_backends import FakeCudart, fake_tensorrt   # noqa: F401  (the fake TensorRT of the backend tests)
from test_bundle import base_manifest, tiny_graph
from test_run_native_lmi import bundle, no_gpu_backends   # noqa: F401  (fixtures: an exported diffusion bundle)

PARSERS = ("load", "load_model", "load_from_string", "load_model_from_string")


@pytest.fixture
def parses(monkeypatch):
    """Names of the graphs onnx parses (every public loader) and shape-infers while the test runs
    (infer_shapes parses its own result: counted as the inference, not as a parse)."""
    seen = {"parsed": [], "inferred": []}
    inside = []
    for name in PARSERS:
        def counting(*args, _original=getattr(onnx, name), **kwargs):
            model = _original(*args, **kwargs)
            if not inside:
                seen["parsed"].append(model.graph.name)
            return model
        monkeypatch.setattr(onnx, name, counting)
    infer = onnx.shape_inference.infer_shapes

    def inferring(model, *args, **kwargs):
        seen["inferred"].append(model.graph.name)
        inside.append(True)
        try:
            return infer(model, *args, **kwargs)
        finally:
            inside.pop()
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", inferring)
    return seen


def run(bundle_dir, tmp_path, *flags):
    source = write_volume(tmp_path / "s.nii.gz", phantom_volume(shape=(20, 24, 3)), lps_affine())
    result = CliRunner().invoke(app, [str(source), "--to", "T2", "--bundle", str(bundle_dir), "--out",
                                      str(tmp_path / "out.nii.gz"), "--threads", "1", "--overwrite", *flags])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_diffusion_run_parses_its_step_graph_once(bundle, tmp_path, no_gpu_backends, parses):  # noqa: F811
    load_bundle(bundle)
    assert parses == {"parsed": [], "inferred": []}          # the manifest only, no graph
    line = run(bundle, tmp_path, "--model", "diffusion", "--steps", "2", "--lmi", "auto")
    assert "LMI on the native CPU kernel" in line
    step = load_bundle(bundle).diffusion["T2"].graphs["fp32"].file
    assert len(parses["parsed"]) == 1 and len(parses["inferred"]) == 1, (step, parses)
    parses["parsed"].clear(), parses["inferred"].clear()
    run(bundle, tmp_path, "--model", "diffusion", "--steps", "2", "--lmi", "onnx")
    assert parses == {"parsed": [], "inferred": []}          # onnxruntime reads the graphs itself


# ----------------------------------------------------------------------------- TensorRT without onnx
def trt_diffusion_bundle(root):
    """A diffusion bundle with step and lmi engines for the fake GPU (sm_90, TRT 10.13.0)."""
    root.mkdir()
    for name in ("step.onnx", "lmi.onnx"):
        onnx.save(tiny_graph(), root / name)
    engine = {"precision": "fp32", "tensorrt_version": "10.13.0.35", "compute_capability": "9.0"}
    for name in ("step.engine", "lmi.engine"):
        (root / name).write_bytes(b"ENGINE")
    manifest = base_manifest()
    manifest["models"] = {"diffusion": {"T2": {
        "graphs": {"fp32": {"file": "step.onnx"}}, "engines": [{"file": "step.engine", **engine}],
        "lmi_graph": {"file": "lmi.onnx", "engines": [{"file": "lmi.engine", **engine}]},
        "schedule": NoiseSchedule().to_manifest(), "lmi": LmiParams().to_manifest(), "data_range": [-1, 1]}}}
    write_manifest(root, manifest)
    return root


@pytest.fixture
def trt_bundle(tmp_path):
    return trt_diffusion_bundle(tmp_path / "b")


@pytest.fixture
def trt_only(monkeypatch, trt_bundle):
    """A fake GPU with TensorRT, and neither onnx nor onnxruntime importable (the bundle is
    written before: export needs onnx)."""
    cudart = FakeCudart()
    trt, _ = fake_tensorrt(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(device_info, "import_cudart", lambda: cudart)
    monkeypatch.setattr(device_info, "gpu_compute_capability", lambda device=0: "9.0")
    for name in [m for m in sys.modules if m == "onnx" or m.startswith(("onnx.", "onnxruntime"))]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)          # import onnx -> ImportError
    return cudart


def test_tensorrt_runs_without_onnx_and_uses_the_lmi_engine(trt_bundle, trt_only):
    root = trt_bundle
    loaded = load_bundle(root)
    factory, choice = select_backend(loaded, "diffusion", domain="T2")
    assert choice.name == "tensorrt" and choice.file.name == "step.engine"
    lmi = select_lmi(loaded, loaded.diffusion["T2"], choice)()
    assert isinstance(lmi, TrtRunner)
    for runner in (factory(), lmi):                       # engines read (and verified) on activation
        with runner:
            assert runner.is_active
    (root / "lmi.engine").write_bytes(b"ENGINX")          # same size: refused when opened
    loaded = load_bundle(root)
    with pytest.raises(BundleError, match="sha256 mismatch for lmi.engine"):
        select_lmi(loaded, loaded.diffusion["T2"], choice)().activate()


def test_lmi_of_the_source_without_a_matching_engine(tmp_path, monkeypatch):
    root = trt_diffusion_bundle(tmp_path / "b")
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest["models"]["diffusion"]["T2"]["lmi_graph"]["engines"] = []
    del manifest["files"]
    write_manifest(root, manifest)
    loaded = load_bundle(root)
    on_trt = Choice("tensorrt", "fp32", "", root / "step.engine")
    runner = select_lmi(loaded, loaded.diffusion["T2"], on_trt)()
    assert isinstance(runner, NativeLmiRunner) and runner.params == LmiParams().exported()
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    with runner:
        out = runner.infer({"x": x, "y": x})
    assert set(out) == {"lmi", "y_at"} and out["lmi"].shape == x.shape
