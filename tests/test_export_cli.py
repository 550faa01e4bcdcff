"""``galip-export``: one-line errors, bundles with both models, engines skipped or faked."""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from helpers_export import diffusion_payload, generator_payload, save_payload

pytest.importorskip("onnxruntime")

from galip.export.cli import app  # noqa: E402
from galip.runtime.bundle import load_bundle  # noqa: E402
from galip.runtime.pipeline import prepare  # noqa: E402
from galip.runtime.settings import Settings  # noqa: E402
from test_export import FakeTRT  # noqa: E402

SKIP_LINE = "engines skipped: TensorRT not installed: pip install 'galip[gpu]' on a machine with an NVIDIA GPU"



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"generator": save_payload(generator_payload(seed=2), root / "gen" / "checkpoint.pt"),
            "diffusion": save_payload(diffusion_payload(seed=3, target="T2"), root / "dif" / "checkpoint.pt")}


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles):
    """Exit 2 with exactly one error line, the last one (status lines may precede it)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    for needle in needles:
        assert needle in errors[0]


def test_missing_checkpoint_is_one_line(tmp_path):
    result = invoke(tmp_path / "nope.pt", "--out", tmp_path / "b")
    _one_line_error(result, "does not exist")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_unreadable_and_unknown_checkpoints_are_one_line(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    _one_line_error(invoke(garbage, "--out", tmp_path / "b"), "cannot be read")
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "weights": torch.zeros(2)}, other)
    _one_line_error(invoke(other, "--out", tmp_path / "b"), "'something-else'", "galip-train")


@pytest.mark.parametrize("args, needle", [
    (["--min-size", "30"], "--min-size 30 is not a positive multiple of 32"),
    (["--opt-size", "64", "--max-size", "32"], "--min-size <= --opt-size <= --max-size"),
    (["--max-batch", "0"], "--max-batch"),
    (["--opset", "13"], "--opset"),
    (["--sampler", "dpmpp2m:10:0.5"], "ddim:STEPS[:ETA]"),
    (["--sampler", "euler:10"], "dpmpp2m:STEPS"),
])
def test_bad_sizes_are_one_line(checkpoints, tmp_path, args, needle):
    _one_line_error(invoke(checkpoints["generator"], "--out", tmp_path / "b", *args), needle)


def test_sizes_must_fit_the_bundle_size_multiple(checkpoints, tmp_path):
    # TINY_NET halves once (multiple 2), but its training preprocessing pads to 32
    _one_line_error(invoke(checkpoints["diffusion"], "--out", tmp_path / "b", "--min-size", "48",
                           "--opt-size", "64", "--max-size", "64"), "multiple of 32", "use e.g. 64")


def test_generator_then_diffusion_share_one_bundle(checkpoints, tmp_path, no_tensorrt):
    bundle = tmp_path / "bundle"
    first = invoke(checkpoints["generator"], "--out", bundle)
    assert first.exit_code == 0, first.output
    assert first.output.count("engines skipped") == 1 and SKIP_LINE in first.output
    second = invoke(checkpoints["diffusion"], "--out", bundle, "--sampler", "ddim:8:0.5")
    assert second.exit_code == 0, second.output
    loaded = load_bundle(bundle)                             # checksums verified
    models = loaded.manifest["models"]
    assert set(models) == {"generator", "diffusion"} and set(models["diffusion"]) == {"T2"}
    assert models["generator"]["graphs"] == {"fp32": {"file": "generator.onnx"},
                                             "fp16": {"file": "generator_fp16.onnx"}}
    assert models["generator"]["engines"] == [] and models["generator"]["domains"] == ["T1", "T2", "PD"]
    step = models["diffusion"]["T2"]
    assert step["graphs"]["fp32"] == {"file": "diffusion_T2_step.onnx"}
    assert step["lmi_graph"]["file"] == "lmi.onnx"
    assert step["schedule"] == {"kind": "ddpm_linear", "beta_start": 1e-3, "beta_end": 0.2, "timesteps": 20}
    assert step["sampler"] == {"default": "ddim", "steps": 8, "eta": 0.5, "spacing": "trailing"}
    assert step["data_range"] == [-1.0, 1.0]
    assert set(step["lmi"]) == {"patch", "radius", "bins", "sigma", "normalize"}
    assert set(loaded.manifest["files"]) == {"generator.onnx", "generator_fp16.onnx", "diffusion_T2_step.onnx",
                                             "diffusion_T2_step_fp16.onnx", "lmi.onnx"}
    assert loaded.preprocess["size_multiple"] == 32 and set(loaded.manifest["domains"]) == {"T1", "T2", "PD"}
    # re-exporting the generator without fp16 keeps the diffusion model
    third = invoke(checkpoints["generator"], "--out", bundle, "--no-fp16", "--no-engines")
    assert third.exit_code == 0, third.output and "--no-engines" in third.output
    models = load_bundle(bundle).manifest["models"]
    assert list(models["generator"]["graphs"]) == ["fp32"] and "T2" in models["diffusion"]


def test_tampered_bundle_is_refused(checkpoints, tmp_path, no_tensorrt):
    bundle = tmp_path / "bundle"
    assert invoke(checkpoints["diffusion"], "--out", bundle, "--no-fp16").exit_code == 0
    data = (bundle / "lmi.onnx").read_bytes()
    (bundle / "lmi.onnx").write_bytes(data.replace(b"galip", b"GALIP"))       # same size, other bytes
    _one_line_error(invoke(checkpoints["diffusion"], "--out", bundle, "--no-fp16"), "sha256")


def test_engines_with_a_fake_tensorrt(checkpoints, tmp_path, monkeypatch):
    fake = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    from galip.export.tensorrt import lmi_plugin
    from galip.runtime import device_info
    registered = []
    ptx = tmp_path / "lmi.ptx"
    ptx.write_text(".version 8.7\n.target sm_80\n")
    monkeypatch.setattr(device_info, "gpu_compute_capability", lambda device=0: "8.9")
    monkeypatch.setattr(device_info, "driver_version", lambda: 12080)
    monkeypatch.setattr(lmi_plugin, "_registered", ptx)
    monkeypatch.setattr(lmi_plugin, "register_lmi_plugin", lambda *a, **k: registered.append(1))
    bundle = tmp_path / "bundle"
    result = invoke(checkpoints["diffusion"], "--out", bundle, "--max-batch", "4", "--opt-size", "64",
                    "--max-size", "128", "--timing-cache", tmp_path / "timing.cache", "--version-compatible")
    assert result.exit_code == 0, result.output
    assert "engines skipped" not in result.output and registered
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["models"]["diffusion"]["T2"]
    (engine,) = spec["engines"]
    assert engine["file"] == "diffusion_T2_step_fp16.engine" and engine["precision"] == "fp16"
    assert engine["tensorrt_version"] == "10.13.0.35" and engine["compute_capability"] == "8.9"
    assert engine["version_compatible"] is True and ("set_flag", "VERSION_COMPATIBLE") in fake.calls
    assert (engine["ptx_isa"], engine["min_driver_cuda"]) == ("8.7", 12080)     # the LMI kernel's PTX
    assert engine["profiles"]["x_t"] == {"min": [1, 1, 32, 32], "opt": [4, 1, 64, 64], "max": [4, 1, 128, 128]}
    assert set(engine["profiles"]) == {"x_t", "source", "lmi_source", "noise", "x0_last"}
    assert spec["lmi_graph"]["engines"][0]["precision"] == "fp32"
    parsed = [c[1] for c in fake.calls if c[0] == "parse_from_file"]
    assert [p.rsplit("/", 1)[-1] for p in parsed] == ["diffusion_T2_step_fp16.onnx", "lmi.onnx"]
    assert "diffusion_T2_step_fp16.engine" in load_bundle(bundle).manifest["files"]
    assert (tmp_path / "timing.trt10.13.0.sm_89.cache").read_bytes() == b"CACHE"


@pytest.mark.parametrize("sampler, entry", [("ddpm", {"default": "ddpm", "steps": 20, "eta": 0.0}),
                                            ("dpmpp2m:7", {"default": "dpmpp2m", "steps": 7, "eta": 0.0}),
                                            ("ddim:500:1", {"default": "ddim", "steps": 20, "eta": 1.0})])
def test_export_records_the_sampler_it_is_given(checkpoints, tmp_path, sampler, entry):
    result = invoke(checkpoints["diffusion"], "--out", tmp_path / "b", "--no-engines", "--no-fp16", "--sampler", sampler)
    assert result.exit_code == 0, result.output
    recorded = load_bundle(tmp_path / "b").manifest["models"]["diffusion"]["T2"]["sampler"]
    assert recorded == {**entry, "spacing": "trailing"}        # steps capped at the schedule's T = 20


def test_a_bias_free_generator_says_so_in_its_own_entry(tmp_path, no_tensorrt):
    payload = generator_payload(seed=2)
    payload["preprocess"] = {**payload["preprocess"], "bias_field": "n4"}
    checkpoint = save_payload(payload, tmp_path / "gen" / "checkpoint.pt")
    diffusion = save_payload(diffusion_payload(seed=3, target="T2"), tmp_path / "dif" / "checkpoint.pt")
    bundle = tmp_path / "bundle"
    for source in (diffusion, checkpoint):             # a diffusion model trained on biased slices beside it
        result = invoke(source, "--out", bundle, "--no-fp16", "--no-engines")
        assert result.exit_code == 0, result.output
    loaded = load_bundle(bundle)
    models = loaded.manifest["models"]
    assert "bias_field" not in loaded.preprocess                       # the bundle's shared settings
    assert models["generator"]["preprocess"] == {**loaded.preprocess, "bias_field": "n4"}
    assert "preprocess" not in models["diffusion"]["T2"]
    assert prepare(loaded, "T2").config.bias_field == "n4"
    assert prepare(loaded, "T2", replace(Settings(), model="diffusion")).config.bias_field == "none"
