"""``galip-eval samplers BUNDLE``: the diffusion model's samplers side by side on held-out phantoms.

Each sampler setting (the paper's 1000-step ancestral sampler, DDIM with a few step counts
and η, DPM-Solver++(2M)) translates the same slab of the same held-out subjects through
the runtime (:func:`galip.bench.quality.run_quality` with ``--slices`` and the setting as
run options), so the table differs only by the sampler: PSNR/SSIM inside the brain mask
(the papers' metric), the same for the training-free baselines of the direction, seconds
per slice, and the gap to the reference setting (the first, 1000-step ancestral). The
cheapest setting within ``tolerance_db`` of the reference is marked as the one to ship.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from galip.runtime.bundle import Bundle
from galip.runtime.errors import ConfigError
from galip.runtime.schedule import parse_sampler

from .quality import HELD_OUT_SEED, QualityRequest, direction_name, run_quality
from .quality_report import write_text
from .run_options import RunOptions

TOLERANCE_DB = 0.5
DEFAULT_SLAB = (44, 48)      # four axial slices through the ventricles of a 2 mm phantom


@dataclass(frozen=True)
class SamplerSetting:
    """One row: ``sampler`` (ddpm, ddim, dpmpp2m), ``steps`` (None: ddpm's all T) and DDIM's ``eta``."""

    sampler: str
    steps: int | None = None
    eta: float = 0.0     # DDIM's; ddpm is η = 1, dpmpp2m has none

    @property
    def label(self) -> str:
        if self.sampler == "ddpm":
            return "DDPM ancestral, all steps"
        if self.sampler == "ddim":
            return f"DDIM {self.steps}, eta {self.eta:g}"
        return f"DPM-Solver++(2M) {self.steps}"

    def run_settings(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "eta": None if self.sampler == "dpmpp2m" else self.eta}

    @classmethod
    def parse(cls, text: str) -> "SamplerSetting":
        """``ddpm``, ``ddim:20``, ``ddim:20:0.5`` or ``dpmpp2m:10``; ConfigError otherwise."""
        return cls(*parse_sampler(text))


DEFAULT_SETTINGS = ("ddpm", "ddim:50", "ddim:20", "ddim:10", "ddim:20:0.5", "ddim:20:1",
                    "dpmpp2m:20", "dpmpp2m:10", "dpmpp2m:5")


@dataclass
class SamplerTableRequest:
    bundle: Bundle
    out: Path
    source: str = "T1"
    target: str = "T2"
    slices: tuple[int, int] = DEFAULT_SLAB
    subjects: int = 2
    seed: int = HELD_OUT_SEED
    spacing: float = 2.0
    data: Path | None = None
    settings: list[SamplerSetting] = field(default_factory=lambda: [SamplerSetting.parse(s) for s in DEFAULT_SETTINGS])
    run_options: dict = field(default_factory=dict)
    command: str = ""


def run_sampler_table(request: SamplerTableRequest, log=lambda line: None) -> dict:
    """Score every setting; returns the report (also written as samplers.json / samplers.md)."""
    if request.target not in request.bundle.diffusion:
        raise ConfigError(f"bundle {request.bundle.root} has no diffusion model for {request.target}")
    request.out.mkdir(parents=True, exist_ok=True)
    data, rows, baselines = request.data, [], None
    name = direction_name(request.source, request.target)
    for setting in request.settings:
        log(f"{setting.label}: translating slices {request.slices[0]}:{request.slices[1]} of {request.subjects} subjects")
        quality = QualityRequest(
            bundle=request.bundle, out=request.out, data=data, subjects=request.subjects, seed=request.seed,
            spacing=request.spacing, model="diffusion", slices=request.slices, sources=(request.source,),
            options=RunOptions(settings={**request.run_options, **setting.run_settings()}))
        report, _ = run_quality(quality, log)
        data = Path(report["data"]["folder"])          # the first run writes the data, the rest reuse it
        direction = report["directions"][name]
        baselines = {k: v["brain"] for k, v in direction["baselines"].items()}
        rows.append({"setting": setting.label, "sampler": setting.sampler, "steps": setting.steps,
                     "eta": setting.eta, "brain": direction["model"]["brain"],
                     "s_per_slice": direction["translate_s"] / max(1, direction["slices_translated"])})
    reference = rows[0]["brain"]["psnr"]
    for row in rows:
        row["vs_reference_db"] = row["brain"]["psnr"] - reference
    within = [r for r in rows if r["vs_reference_db"] >= -TOLERANCE_DB]
    default = min(within, key=lambda r: r["s_per_slice"]) if within else None
    result = {"command": request.command, "bundle": str(request.bundle.root), "direction": name,
              "data": {"folder": str(data), "seed": request.seed, "subjects": request.subjects,
                       "slices": list(request.slices), "spacing_mm": request.spacing},
              "run_options": request.run_options, "reference": rows[0]["setting"],
              "tolerance_db": TOLERANCE_DB, "rows": rows, "baselines": baselines,
              "cheapest_within_tolerance": default and default["setting"]}
    write_text(request.out / "samplers.json", json.dumps(result, indent=2) + "\n")
    write_text(request.out / "samplers.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"Samplers of the diffusion model, {result['direction']}, held-out phantoms (seed {result['data']['seed']}, "
             f"{result['data']['subjects']} subjects, slices {result['data']['slices'][0]}:{result['data']['slices'][1]}, "
             f"{result['data']['spacing_mm']:g} mm), inside the brain mask.", "",
             f"Command: `{result['command']}`", "",
             f"| sampler | PSNR (dB) | SSIM | vs {result['reference']} (dB) | s / slice |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        mark = " **(default)**" if row["setting"] == result["cheapest_within_tolerance"] else ""
        lines.append(f"| {row['setting']}{mark} | {row['brain']['psnr']:.2f} | {row['brain']['ssim']:.3f} | "
                     f"{row['vs_reference_db']:+.2f} | {row['s_per_slice']:.2f} |")
    for label, value in (result["baselines"] or {}).items():
        lines.append(f"| baseline: {label} | {value['psnr']:.2f} | {value['ssim']:.3f} | | |")
    chosen = result["cheapest_within_tolerance"]
    lines += ["", f"Cheapest setting within {result['tolerance_db']:g} dB of the reference "
                  f"({result['reference']}): {chosen or 'none'}."]
    return "\n".join(lines) + "\n"

