"""One benchmark run, end to end: models → cases → results.json, results.md, results.png."""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from . import report
from .cases import BenchConfig, Context, generator_cases, skip_all, volume_cases
from .diffusion_cases import ddim_cases, lmi_cases, step_cases
from .machine import load_average, machine_info
from .workload import build_models, user_models

OUTPUTS = ("results.json", "results.md", "results.png")


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """Every backend gets ``threads``: torch intra-op, the native LMI kernel, onnxruntime (per session)."""
    import torch
    before, env_before = torch.get_num_threads(), os.environ.get("GALIP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["GALIP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env_before is None:
            os.environ.pop("GALIP_NUM_THREADS", None)
        else:
            os.environ["GALIP_NUM_THREADS"] = env_before


def run_bench(config: BenchConfig, out: Path, log: Callable[[str], None] = print,
              command: str | None = None) -> dict[str, Path]:
    """Measure everything ``config`` asks for and write the three result files into ``out``."""
    started = time.perf_counter()
    config.threads = config.threads or 1
    machine = machine_info(config.threads)
    with tempfile.TemporaryDirectory(prefix="galip-bench-") as tmp, _threads(config.threads):
        workdir = Path(tmp)
        setup_started = time.perf_counter()
        if config.bundle is not None:
            models = user_models(config.bundle, config.target)
            log(f"bundle {config.bundle}: eager rows use its architectures with random weights "
                "(so model outputs are not compared; LMI agreement is)")
        else:
            fp16 = config.fp16 if config.fp16 is not None else config.device == "cuda"
            models = build_models(workdir / "models", unet=config.unet, net=config.net,
                                  timesteps=config.timesteps, fp16=fp16, engines=config.device == "cuda",
                                  seed=config.seed, target=config.target or "T2", log=log,
                                  int8=config.int8 and config.device == "cpu")
        setup_s = time.perf_counter() - setup_started
        ctx = Context(config, models, workdir, log)
        for name, case in (("generator", generator_cases), ("generator volume", volume_cases),
                           ("lmi", lmi_cases)):
            try:
                case(ctx)
            except Exception as error:     # noqa: BLE001 - one broken case must not lose the others
                skip_all(ctx, name, error)
        try:
            ddim_cases(ctx, step_cases(ctx))
        except Exception as error:     # noqa: BLE001
            skip_all(ctx, "diffusion", error)
    if config.bundle is not None:   # eager weights are random: only the LMI's agreement means something
        for row in ctx.rows:
            if row.case != "lmi" and row.max_abs is not None:
                row.max_abs = row.psnr = None
                row.extra["agreement"] = "not computed: --bundle without checkpoints (random eager weights)"
    report.add_speedups(ctx.rows)
    wall = time.perf_counter() - started
    extra = {
        "command": command or "galip-bench " + shlex.join(sys.argv[1:]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall, 1), "setup_s": round(setup_s, 1),
        "export": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in models.export_seconds.items()},
        "load_average_end": load_average(),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results.json": report.write_json(out / "results.json", ctx.rows, machine, config.to_json(), extra),
        "results.md": report.write_markdown(out / "results.md", ctx.rows, machine, extra),
        "results.png": report.write_png(out / "results.png", ctx.rows),
    }
    log(f"wrote {', '.join(str(p) for p in paths.values())} ({wall:.0f} s)")
    return paths
