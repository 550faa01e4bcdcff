"""The goals of a translation (issue 10, "Done when") and the files ``galip-eval quality`` writes:
``quality.json`` (everything), ``quality.md`` (one row per direction, each goal's figure
marked met ✓ or missed ✗) and ``montage.png`` (:mod:`galip.bench.montage`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from galip.runtime.atomic import atomic_path
from galip.runtime.errors import OutputError

MET, MISSED = "✓", "✗"


def _separation_gap(d: dict) -> float | None:
    """Largest |r(outputs) − r(truths)| over the other targets of the source; None without one."""
    gaps = [abs(s["output_r"] - s["truth_r"]) for s in d["separation"].values()]
    return max(gaps) if gaps else None


@dataclass(frozen=True)
class Goal:
    key: str
    text: str
    value: Callable[[dict], float | None]       # from one direction's summary
    met: Callable[[float], bool]


GOALS = (
    Goal("psnr", "PSNR >= 27 dB inside the brain", lambda d: d["model"]["brain"]["psnr"], lambda v: v >= 27.0),
    Goal("ssim", "SSIM >= 0.93 inside the brain", lambda d: d["model"]["brain"]["ssim"], lambda v: v >= 0.93),
    Goal("psnr_margin", "PSNR >= best baseline's + 1 dB",
         lambda d: d["model"]["brain"]["psnr"] - d["best_baseline"]["psnr"]["value"], lambda v: v >= 1.0),
    Goal("ssim_margin", "SSIM >= best baseline's + 0.02",
         lambda d: d["model"]["brain"]["ssim"] - d["best_baseline"]["ssim"]["value"], lambda v: v >= 0.02),
    Goal("whole_psnr", "whole-volume PSNR >= 24 dB", lambda d: d["model"]["whole"]["psnr"], lambda v: v >= 24.0),
    Goal("hallucination", "background hallucination < 1 %", lambda d: d["hallucination"]["output"],
         lambda v: v < 0.01),
    Goal("separation", "contrast separation within 0.15 of the truth's", _separation_gap, lambda v: v <= 0.15),
    Goal("stripes", "no stripe slices", lambda d: d["stripes"]["stripe_slices"], lambda v: v == 0),
)


def judge(direction: dict) -> dict:
    """``{goal key: {"goal", "value", "met"}}`` for one direction (``met`` None: not measurable)."""
    verdicts = {}
    for goal in GOALS:
        value = goal.value(direction)
        verdicts[goal.key] = {"goal": goal.text, "value": value, "met": None if value is None else bool(goal.met(value))}
    return verdicts


def _mark(verdict: dict) -> str:
    return "" if verdict["met"] is None else f" {MET if verdict['met'] else MISSED}"


def _pair(scores: dict) -> str:
    return f"{scores['psnr']:.1f} / {scores['ssim']:.3f}"


def markdown(report: dict) -> str:
    """The quality table and how it was made."""
    bundle, data = report["bundle"], report["data"]
    steps = f", {bundle['trained_steps']} training steps" if bundle.get("trained_steps") else ""
    held_out = (f"{len(data['subjects'])} held-out phantoms written with seed {data['seed']} at {data['spacing_mm']:g} mm"
                if data["generated"] else f"{len(data['subjects'])} subjects from {data['folder']} (galip-data seed "
                f"{data['seed']})")
    lines = [
        f"# Translation quality: bundle {bundle['name']} ({bundle['model']}{steps})", "",
        f"Command: `{report['command']}`  ",
        f"Data: {held_out}{', slices ' + ':'.join(map(str, data['slices'])) if data['slices'] else ''}; "
        f"runtime: {report['runtime']['backend']}; wall time {report['wall_s']:.0f} s.", "",
        "PSNR dB / SSIM with the papers' metric, mean over subjects; baselines scored the same way. "
        f"{MET} met, {MISSED} missed (goals below).", "",
        "| direction | model (brain) | whole volume | identity | hist. match | hist. match (neg.) "
        "| over best baseline | separation r: output (truth) | hallucination | stripe score (stripe slices, all subjects) | goals met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in report["directions"].items():
        v = d["goals"]
        base = d["baselines"]
        sep = "; ".join(f"{s['output_r']:.2f} ({s['truth_r']:.2f})" for s in d["separation"].values()) or "n/a"
        met = [x["met"] for x in v.values() if x["met"] is not None]
        lines.append(
            f"| {name.replace('->', '→')} "
            f"| {d['model']['brain']['psnr']:.1f}{_mark(v['psnr'])} / {d['model']['brain']['ssim']:.3f}{_mark(v['ssim'])} "
            f"| {d['model']['whole']['psnr']:.1f}{_mark(v['whole_psnr'])} / {d['model']['whole']['ssim']:.3f} "
            f"| {_pair(base['identity']['brain'])} | {_pair(base['histogram match']['brain'])} "
            f"| {_pair(base['histogram match (negated)']['brain'])} "
            f"| {v['psnr_margin']['value']:+.1f}{_mark(v['psnr_margin'])} / "
            f"{v['ssim_margin']['value']:+.3f}{_mark(v['ssim_margin'])} "
            f"| {sep}{_mark(v['separation'])} "
            f"| {100 * d['hallucination']['output']:.1f} %{_mark(v['hallucination'])} "
            f"| {d['stripes']['score']:.2f} ({d['stripes']['stripe_slices']}){_mark(v['stripes'])} "
            f"| {sum(met)}/{len(met)} |")
    lines += ["", "Goals (issue 10): " + "; ".join(g.text for g in GOALS) + ". "
              "\"Over best baseline\" compares with the best baseline of each metric separately.", ""]
    lines += [f"- **{key}**: {text}" if isinstance(text, str) else f"- **{key}**: " + "; ".join(
        f"{k}: {t}" for k, t in text.items()) for key, text in report["definitions"].items()]
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file, then rename); OutputError in one line."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None


def write_outputs(report: dict, views: dict, out: Path) -> dict[str, Path]:
    """Add the verdicts to ``report`` and write quality.json, quality.md and montage.png into ``out``."""
    from .montage import write_montage
    for direction in report["directions"].values():
        direction["goals"] = judge(direction)
    paths = {"json": out / "quality.json", "markdown": out / "quality.md", "montage": out / "montage.png"}
    best = {name: d["best_baseline"]["psnr"]["name"] for name, d in report["directions"].items()}
    write_montage(paths["montage"], views, best, title=f"{report['bundle']['name']} {report['bundle']['model']}: "
                  f"{report['data']['subjects'][0]}")
    write_text(paths["json"], json.dumps(report, indent=2, default=str) + "\n")
    write_text(paths["markdown"], markdown(report))
    return paths
