"""galip-bench: the harness end to end on tiny models, the authors' LMI baseline, the report.

The end-to-end run builds tiny random-weight checkpoints, exports them into a bundle,
measures every case with one repeat on an 8 mm phantom and 32² slices, and checks the
three result files and their fields (seconds on 2 cores).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from galip.bench.cases import BenchConfig
from galip.bench.harness import Row, Timing, measure
from galip.bench.lmi_baseline import lmi_authors
from galip.bench.report import add_speedups, goals

pytest.importorskip("onnxruntime")

TINY_UNET = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, groups=4, head_channels=8,
                 attention_ds=(4,), context_dim=16)
TINY_NET = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), groups=4, dropout=0.0)
ROW_FIELDS = {"case", "backend", "precision", "device", "batch", "size", "median_ms", "p90_ms", "repeats",
              "warmup", "max_abs", "psnr", "status", "reason", "note", "speedup", "speedup_vs"}


def tiny_config(**overrides) -> BenchConfig:
    base = dict(quick=True, threads=1, repeats=1, slow_repeats=1, warmup=0, case_budget_s=5.0, sizes=(32,),
                batches=(1, 2), volumes=(8.0,), slice_spacing=8.0, volume_repeats=1, lmi_sizes=(32,),
                step_size=32, ddim_steps=4, few_steps=2, ddim_all=False, compile_budget_s=0.0, lmi_rounds=2, int8=False,
                unet=TINY_UNET, net=TINY_NET, timesteps=20)
    return BenchConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from galip.bench.suite import run_bench
    out = tmp_path_factory.mktemp("bench") / "results"
    paths = run_bench(tiny_config(), out, log=lambda text: None, command="galip-bench (test)")
    return out, paths


# ----------------------------------------------------------------------------- end to end
def test_run_writes_three_files_with_machine_and_rows(results):
    out, paths = results
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]
    assert paths["results.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    machine = data["machine"]
    assert machine["cpu_model"] and machine["usable_cores"] >= 1 and machine["threads_per_backend"] == 1
    assert machine["versions"]["torch"] and machine["versions"]["onnxruntime"]
    assert "gpu" in machine and data["wall_s"] > 0 and len(data["goals"]) == 3
    rows = data["rows"]
    assert all(ROW_FIELDS <= set(row) for row in rows)
    assert {row["status"] for row in rows} <= {"ok", "skipped", "failed", "estimated"}
    assert not [row for row in rows if row["status"] == "failed"], [r["reason"] for r in rows if r["status"] == "failed"]
    ok = [row for row in rows if row["status"] == "ok"]
    assert all(row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["repeats"] >= 1 for row in ok)
    assert all(row["reason"] for row in rows if row["status"] == "skipped")


def test_every_case_measures_eager_and_onnxruntime_with_agreement(results):
    out, _ = results
    rows = json.loads((out / "results.json").read_text())["rows"]

    def ok(case, backend, **match):
        return [r for r in rows if r["case"] == case and r["backend"] == backend and r["status"] == "ok"
                and all(r[k] == v for k, v in match.items())]

    for batch in (1, 2):
        (eager,) = ok("generator", "torch-eager", batch=batch)
        (ort,) = ok("generator", "onnxruntime-cpu", batch=batch, precision="fp32")
        assert eager["speedup"] == 1.0 and ort["speedup"] > 0
        assert ort["max_abs"] < 1e-3 and (ort["psnr"] == "inf" or ort["psnr"] > 60)
    assert ok("generator volume 8 mm", "onnxruntime-cpu")[0]["max_abs"] < 1e-2
    lmi_backends = {r["backend"] for r in rows if r["case"] == "lmi" and r["status"] == "ok"}
    assert {"authors' algorithm", "torch dense (lmi_dense)", "native C++ (lmi_numpy)", "onnxruntime-cpu"} <= lmi_backends
    native = [r for r in rows if r["case"] == "lmi" and r["backend"] == "native C++ (lmi_numpy)"][0]
    assert native["max_abs"] < 1e-4 and native["extra"]["speedup_vs_authors"] > 0
    assert native["extra"]["speedup_vs_previous"] > 0 and len(native["extra"]["round_ms"]) == native["repeats"]
    assert native["load"] is not None
    (step,) = ok("diffusion step", "onnxruntime-cpu (LMI in graph)")
    assert step["max_abs"] < 1e-4
    assert ok("diffusion DDIM-2 slice", "torch-eager")
    # DDIM-4 (the "full" run here) measured once on the fastest backend; estimates are marked
    measured = [r for r in rows if r["case"] == "diffusion DDIM-4 slice" and r["status"] == "ok"]
    estimated = [r for r in rows if r["case"] == "diffusion DDIM-4 slice (estimated)"]
    assert len(measured) == 1 and estimated
    assert all(r["status"] == "estimated" and "estimated" in r["note"] and r["repeats"] == 0 for r in estimated)


def test_gpu_and_int8_rows_say_why_they_were_skipped(results):
    out, _ = results
    rows = json.loads((out / "results.json").read_text())["rows"]
    skipped = {(r["case"], r["backend"], r["precision"]): r["reason"] for r in rows if r["status"] == "skipped"}
    assert "int8" in skipped[("generator", "onnxruntime-cpu", "int8")]
    assert skipped[("generator", "torch-compile", "fp32")]
    if not torch.cuda.is_available():
        assert "CUDA" in skipped[("generator", "tensorrt", "fp16")]
        assert "CUDA" in skipped[("generator", "torch-eager", "fp16")]
    text = (out / "results.md").read_text()
    assert "| case | backend |" in text and "## Goals" in text and "## Skipped and failed" in text


# ----------------------------------------------------------------------------- harness, report
def test_measure_warmup_repeats_and_budget():
    calls = []
    timing, value = measure(lambda: calls.append(1) or len(calls), warmup=2, repeats=5)
    assert len(calls) == 7 and value == 7 and timing.repeats == 5 and timing.warmup == 2
    timing, _ = measure(lambda: sum(range(20000)), warmup=0, repeats=1000, budget_s=0.0)
    assert timing.repeats == 1                     # the budget stops after one timed call
    t = Timing((0.001, 0.002, 0.003, 0.004, 0.010))
    assert t.median_ms == pytest.approx(3.0) and t.p90_ms == pytest.approx(7.6)


def test_speedups_are_medians_of_per_round_ratios_and_goals_report_misses():
    def row(backend, ms, rounds=None, **kw):
        r = Row(case=kw.pop("case", "generator"), backend=backend, batch=kw.pop("batch", 1), size="128x128",
                median_ms=ms, **kw)
        if rounds:
            r.extra["round_ms"] = rounds
        return r
    rows = [row("torch-eager", 100.0, [100.0, 300.0, 100.0], reference=True),
            # slowed with eager in round 2 (load): per-round ratios 1.25, 1.25, 1.25 -> 1.25,
            # where the ratio of medians would say 100/90 = 1.11
            row("onnxruntime-cpu", 90.0, [80.0, 240.0, 80.0]),
            row("onnxruntime-cpu", 800.0, batch=8),   # no reference at b8 -> no speed-up
            row("native C++ (lmi_numpy)", 60.0, case="lmi", extra={"speedup_vs_authors": 150.0,
                                                                   "speedup_vs_previous": 1.5, "threads": 1}),
            Row.skipped("no CUDA GPU", case="generator", backend="tensorrt", precision="fp16", device="cuda")]
    add_speedups(rows)
    assert rows[1].speedup == pytest.approx(1.25) and rows[0].speedup == 1.0 and rows[2].speedup is None
    met = {g["goal"].split(" ")[0]: g["met"] for g in goals(rows)}
    assert met == {"onnxruntime": False, "native": False, "GPU:": None}
    assert "1.50x the previous kernel" in goals(rows)[1]["measured"]
    assert "no CUDA GPU" in goals(rows)[2]["measured"]
    assert Row.skipped("x", case="c", backend="b").to_json()["status"] == "skipped"
    assert Row(case="c", backend="b", psnr=math.inf).to_json()["psnr"] == "inf"


def test_cli_rejects_bad_threads_in_one_line():
    from galip.bench.cli import app
    result = CliRunner().invoke(app, ["--threads", "0", "--out", "unused"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- LMI baseline
def smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    s = ndimage.gaussian_filter(rng.random((h, w)), 4.0)
    s = (s - s.min()) / (s.max() - s.min())
    return torch.from_numpy(s.astype(np.float32))[None, None]


@pytest.mark.parametrize("seed", [0, 1])
def test_lmi_baseline_is_close_to_the_contract_lmi_on_a_smooth_image(seed):
    """What is checked: inside the image (>= r + p//2 = 2 pixels from the border, where both
    see the same samples) the authors' NMI map matches galip's contract LMI to a mean
    absolute difference < 5e-3 and a max < 0.05 (NMI units), with correlation > 0.999;
    not equal, because of integer-cast binning, un-normalised per-sample kernels and the
    1e-10 guards. At the border it differs on purpose: out-of-image samples count as
    intensity 0 there and are absent in the contract."""
    from galip.train.lmi import lmi
    x = smooth_image(40, 48, seed)
    y = (1.0 - x) ** 2                      # another "contrast" of the same anatomy
    ours, _ = lmi(x, y)
    theirs, _ = lmi_authors(x, y)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    diff = (theirs - ours)[inner].abs()
    assert diff.mean() < 5e-3 and diff.max() < 0.05
    assert np.corrcoef(theirs[inner].flatten(), ours[inner].flatten())[0, 1] > 0.999
    border = (theirs - ours).abs()
    border[inner] = 0
    assert border.max() > 0.05              # zero padding vs absent samples


def test_lmi_baseline_takes_any_size_and_returns_y_at_a_neighbour():
    x = smooth_image(20, 28, 3)
    y = torch.rand(1, 1, 20, 28, generator=torch.Generator().manual_seed(0))
    lmi_map, y_at = lmi_authors(x, y)
    assert lmi_map.shape == y_at.shape == (1, 1, 20, 28)
    assert torch.isfinite(lmi_map).all() and (lmi_map >= 0).all()
    padded = torch.nn.functional.pad(y, (1, 1, 1, 1))
    neighbours = torch.stack([padded[..., dy:dy + 20, dx:dx + 28] for dy in range(3) for dx in range(3)])
    assert ((neighbours - y_at).abs() < 1e-7).any(0).all()


def test_lmi_baseline_bins_integer_cast_grey_levels():
    """Sub-grey-level changes do not move the result: the integer cast (what makes the
    authors' LMI non-differentiable) maps both inputs to the same grey levels."""
    x = smooth_image(24, 24, 4)
    grey = torch.floor(x * 255) / 255
    a, _ = lmi_authors(grey + 0.2 / 255, grey)
    b, _ = lmi_authors(grey + 0.7 / 255, grey)
    assert torch.equal(a, b)
