"""galip-export --int8: static QDQ generator graph, shipped only when the held-out quality check
passes (export/int8.py). Tiny random-weight generator, 8 mm phantoms (seconds on 2 cores)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from galip.export import int8
from galip.export.cli import app
from galip.runtime.bundle import load_bundle

from helpers_export import generator_payload, save_payload

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_payload(generator_payload(seed=4), tmp_path_factory.mktemp("int8") / "checkpoint.pt")


@pytest.fixture
def small_phantoms(monkeypatch):
    monkeypatch.setattr(int8, "SPACING_MM", 8.0)
    monkeypatch.setattr(int8, "CALIBRATION_SLICES", 2)


def export(checkpoint, out):
    return CliRunner().invoke(app, [str(checkpoint), "--out", str(out), "--no-fp16", "--no-engines", "--int8"])


def test_int8_is_refused_in_one_line_when_the_quality_check_fails(checkpoint, tmp_path, small_phantoms,
                                                                   monkeypatch):
    # a bar no graph can pass: int8 would have to beat fp32 by 100 dB in every direction
    monkeypatch.setattr(int8, "MAX_DROP_DB", -100.0)
    result = export(checkpoint, tmp_path / "bundle")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: int8 generator not shipped: int8 PSNR") and "allowed -100 dB" in lines[-1]
    assert "Traceback" not in result.output
    assert not (tmp_path / "bundle" / int8.INT8_FILE).exists()
    graphs = load_bundle(tmp_path / "bundle").manifest["models"]["generator"]["graphs"]
    assert set(graphs) == {"fp32"}                              # the fp32 bundle is intact


def test_int8_ships_with_its_scores_and_galip_run_uses_it(checkpoint, tmp_path, small_phantoms, monkeypatch):
    monkeypatch.setattr(int8, "MAX_DROP_DB", 100.0)
    result = export(checkpoint, tmp_path / "bundle")
    assert result.exit_code == 0, result.output
    assert "int8 generator shipped" in result.output
    bundle = load_bundle(tmp_path / "bundle")                   # checksums of the int8 graph included
    entry = bundle.manifest["models"]["generator"]["graphs"]["int8"]
    quality = entry["quality"]
    assert entry["file"] == int8.INT8_FILE and set(quality["fp32"]) == set(quality["int8"])
    assert len(quality["fp32"]) == 6 and quality["held_out_seed"] == int8.HELD_OUT_SEED
    import onnx
    ops = {node.op_type for node in onnx.load(str(bundle.path(entry["file"]))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops

    from galip.runtime.pipeline import Settings, prepare
    from galip.train import phantom
    subject = phantom.make_subject(phantom.load_anatomy(), 0, 5, 8.0, 0.02)
    out = {}
    for precision in ("fp32", "int8"):
        translator = prepare(bundle, "T2", Settings(backend="onnxruntime-cpu", precision=precision, threads=1))
        assert translator.choice.precision == precision
        out[precision] = translator.translate(subject.images["T1w"], subject.affine, "mri").data
    scale = float(np.abs(out["fp32"]).max())
    assert np.abs(out["int8"] - out["fp32"]).mean() < 0.05 * scale    # quantised, not another model


def test_check_verdict_and_message():
    check = int8.Int8Check({"T1->T2": 20.0, "T2->T1": 18.0}, {"T1->T2": 19.8, "T2->T1": 17.5}, 0.3)
    assert not check and "T2->T1" in str(check) and "drop 0.50 dB" in str(check)
    assert int8.Int8Check({"a": 20.0}, {"a": 19.75}, 0.3) and not int8.Int8Check()
    assert json.dumps(check.to_json())
