"""results.json, results.md and results.png of one ``galip-bench`` run.

Speed-up = the median over interleaved rounds of (the group's reference row's time / the
row's time) in that round (:func:`galip.bench.harness.speedup`), where a group is one case at
one batch and size, and its reference is eager PyTorch fp32 on the run's device (for ``lmi``:
``lmi_dense``, galip's PyTorch reference). Rows not timed in those rounds (torch.compile's
child, GPU rows, estimates) use the ratio of medians. Estimated rows (``case ... (estimated)``)
form their own group. The goals of issue 14 are evaluated from these speed-ups, never
asserted: a missed goal is reported as missed, an unmeasurable one as not measured.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .harness import Row, speedup
from .machine import describe

SCHEMA = "galip-bench/1"


# ----------------------------------------------------------------------------- speed-ups
def add_speedups(rows: list[Row]) -> None:
    """Fill ``speedup``/``speedup_vs`` of every ok or estimated row that has a reference:
    the group's eager row of the same status (measured against measured, estimated against
    estimated: ``case (estimated)`` rows form their own group)."""
    refs: dict[tuple, Row] = {}
    for row in rows:
        if row.reference and row.status in ("ok", "estimated") and row.median_ms:
            refs[(row.case, row.batch, row.size)] = row
    for row in rows:
        ref = refs.get((row.case, row.batch, row.size))
        if ref is None or row.status not in ("ok", "estimated") or not row.median_ms:
            continue
        row.speedup = speedup(ref, row)
        row.speedup_vs = f"{ref.backend} {ref.precision} ({ref.device})"


# ----------------------------------------------------------------------------- goals
def _find(rows, case, backend=None, precision=None, status="ok", startswith=False):
    for row in rows:
        name_ok = row.case.startswith(case) if startswith else row.case == case
        if (name_ok and row.status == status and (backend is None or row.backend == backend)
                and (precision is None or row.precision == precision)):
            yield row


GENERATOR_GOAL = "onnxruntime CPU >= 1.5x eager PyTorch fp32 on the generator at batch 1 and 8 (128x128)"
LMI_GOAL = ("native LMI >= 2x the previous kernel on 1 thread (stretch 4x) and >= 100x the authors' "
            "algorithm at equal threads (128x128)")
GPU_GOAL = "GPU: TensorRT fp16 >= 8x eager PyTorch fp32 (generator)"


def goals(rows: list[Row]) -> list[dict]:
    """The goals: measured value, target, met (True/False) or None (not measured)."""
    out = []
    # 1. onnxruntime CPU fp32 >= 1.5x eager PyTorch, generator b1 and b8 at 128².
    ort = [r for r in _find(rows, "generator", "onnxruntime-cpu", "fp32")
           if r.speedup and r.size == "128x128" and r.batch in (1, 8)]
    if ort:
        worst = min(r.speedup for r in ort)
        out.append({"goal": GENERATOR_GOAL, "target": 1.5, "worst": round(worst, 3), "met": worst >= 1.5,
                    "measured": ", ".join(f"b{r.batch}: {r.speedup:.2f}x" for r in ort)})
    else:
        out.append({"goal": GENERATOR_GOAL, "target": 1.5, "measured": "no b1/b8 128x128 rows for both backends",
                    "met": None})
    # 2. native LMI vs the previous kernel (1 thread) and vs the authors' algorithm (equal threads).
    lmi_rows = [r for r in _find(rows, "lmi", startswith=False) if r.size == "128x128"]
    one = next((r for r in lmi_rows if r.backend.startswith("native C++ (lmi_numpy)") and r.extra.get("threads") == 1),
               None)
    if one is not None and one.extra.get("speedup_vs_previous"):
        vs_prev, vs_authors = one.extra["speedup_vs_previous"], one.extra.get("speedup_vs_authors")
        parts = [f"{one.median_ms:.1f} ms, {vs_prev:.2f}x the previous kernel on 1 thread"]
        parts.append(f"{vs_authors:.0f}x the authors' algorithm" if vs_authors else "authors' algorithm not measured")
        for r in lmi_rows:
            if r.backend.startswith("native C++ (lmi_numpy),") and r.extra.get("speedup_vs_previous"):
                parts.append(f"{r.extra['threads']} threads: {r.median_ms:.1f} ms, "
                             f"{r.extra['speedup_vs_previous']:.2f}x the previous kernel")
        out.append({"goal": LMI_GOAL, "target": "2x (stretch 4x), 100x", "measured": "; ".join(parts),
                    "met": vs_prev >= 2.0 and (vs_authors is None or vs_authors >= 100.0),
                    "stretch": vs_prev >= 4.0})
    else:
        out.append({"goal": LMI_GOAL, "target": "2x (stretch 4x), 100x", "met": None,
                    "measured": "no 1-thread native and previous-kernel LMI rows at 128x128"})
    # 3. GPU: TensorRT fp16 >= 8x eager fp32 (generator).
    trt = [r for r in _find(rows, "generator", "tensorrt", "fp16") if r.speedup]
    if trt:
        worst = min(trt, key=lambda r: r.speedup)
        out.append({"goal": GPU_GOAL, "target": 8.0, "met": worst.speedup >= 8.0,
                    "measured": ", ".join(f"b{r.batch} {r.size}: {r.speedup:.1f}x" for r in trt)})
    else:
        skipped = next(_find(rows, "generator", "tensorrt", "fp16", status="skipped"), None)
        why = skipped.reason if skipped is not None else "no TensorRT row"
        out.append({"goal": GPU_GOAL, "target": 8.0, "measured": why, "met": None})
    return out


# ----------------------------------------------------------------------------- files
def write_json(path: Path, rows: list[Row], machine: dict, config: dict, extra: dict) -> Path:
    data = {"schema": SCHEMA, **extra, "config": config, "machine": machine,
            "goals": goals(rows), "rows": [row.to_json() for row in rows]}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def _num(value, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def _ms(value) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def markdown_table(rows: list[Row]) -> str:
    """The measured and estimated rows as a markdown table."""
    head = ("| case | backend | precision | device | batch | size | median ms | p90 ms | n | load | "
            "speed-up | max-abs | PSNR dB | note |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if r.status not in ("ok", "estimated"):
            continue
        speed = ""
        if r.speedup:
            speed = f"{r.speedup:.2f}x" if r.speedup < 100 else f"{r.speedup:.0f}x"
        if r.reference:
            speed = "1 (ref)"
        note = r.note
        vs_authors, vs_previous = r.extra.get("speedup_vs_authors"), r.extra.get("speedup_vs_previous")
        if vs_previous:
            note = f"**{vs_previous:.2f}x the previous kernel**; {note}"
        if vs_authors and r.backend != "authors' algorithm":
            note = f"**{vs_authors:.0f}x the authors' algorithm**; {note}"
        if r.status == "estimated":
            note = f"**estimated**: {note}"
        cells = [r.case, r.backend, r.precision, r.device, "" if r.batch is None else str(r.batch), r.size,
                 _ms(r.median_ms), _ms(r.p90_ms), str(r.repeats or ""), _num(r.load, ".2f"), speed,
                 _num(r.max_abs, ".2g"), _num(r.psnr, ".1f"), note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def skipped_table(rows: list[Row]) -> str:
    """Skipped and failed rows with their reasons (identical reasons of one case merged)."""
    merged: dict[tuple, list[str]] = {}
    for r in rows:
        if r.status in ("skipped", "failed"):
            key = (r.case, r.status, r.reason)
            label = f"{r.backend} {r.precision}" + (f" b{r.batch}" if r.batch else "")
            merged.setdefault(key, []).append(label)
    if not merged:
        return "Nothing was skipped."
    lines = ["| case | backends | status | reason |", "|---|---|---|---|"]
    for (case, status, reason), labels in merged.items():
        lines.append(f"| {case} | {', '.join(labels)} | {status} | {reason.replace('|', '/')} |")
    return "\n".join(lines)


def write_markdown(path: Path, rows: list[Row], machine: dict, extra: dict) -> Path:
    lines = ["# galip-bench results", "",
             f"`{extra.get('command', 'galip-bench')}` — {extra.get('created', '')}, "
             f"total wall time {extra.get('wall_s', 0):.0f} s", "",
             f"Machine: {describe(machine)}.", ""]
    load_end = extra.get("load_average_end")
    if load_end:
        lines += [f"Load average (1/5/15 min) at start {machine.get('load_average_1_5_15')}, at end {load_end}: "
                  "other processes share these cores, so absolute times are inflated; ratios within "
                  "this run compare like with like.", ""]
    lines += [markdown_table(rows), "", "Each backend ran in its own worker process with the run's thread count; "
              "the backends of a case were timed in interleaved rounds, their order rotated each round. "
              "Speed-up: the median over rounds of the eager PyTorch fp32 row's time (same case, batch and "
              "size; for `lmi`: `lmi_dense`, galip's PyTorch reference) over this row's time in the same "
              "round; rows timed outside those rounds (torch.compile, GPU, whole volumes, DDIM slices) use "
              "the ratio of medians. `load`: mean 1-minute load average over the row's rounds. "
              "Agreement: max-abs and PSNR of this backend's output against eager PyTorch's on the "
              "same input (data range 1 for [0, 1] images and LMI, 2 for the step's x_prev in [-1, 1], "
              "the reference's range for volumes); `inf` = identical. `n` = timed calls after the "
              "warm-up (rounds, each one or more calls).", "", "## Goals", ""]
    for goal in goals(rows):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[goal["met"]]
        lines.append(f"- {goal['goal']}: {verdict} — {goal['measured']}")
    lines += ["", "## Skipped and failed", "", skipped_table(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_png(path: Path, rows: list[Row], title: str = "galip-bench: speed-up vs eager PyTorch fp32") -> Path:
    """Horizontal bars of speed-up (log scale), one per non-reference row that has one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [r for r in rows if r.speedup and not r.reference]
    labels = []
    for r in bars:
        size = r.size.split(" (")[0]
        label = f"{r.case.replace(' (estimated)', ' (est.)')} | {r.backend} {r.precision} | b{r.batch} {size}"
        if r.extra.get("speedup_vs_authors") and r.backend != "authors' algorithm":
            label += f" [{r.extra['speedup_vs_authors']:.0f}x authors]"
        labels.append(label)
    values = [r.speedup for r in bars]
    colors = ["#bbbbbb" if r.status == "estimated" else ("#2a9d8f" if r.speedup >= 1 else "#e76f51") for r in bars]
    fig, ax = plt.subplots(figsize=(12, 0.32 * max(4, len(bars)) + 1.4))
    if bars:
        ax.barh(range(len(bars)), values, color=colors)
        ax.set_yticks(range(len(bars)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        for i, value in enumerate(values):
            ax.text(value, i, f" {value:.2g}x", va="center", fontsize=7)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no speed-ups measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("speed-up vs eager PyTorch fp32 (log scale; grey = estimated)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
