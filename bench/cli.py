"""``galip-bench``: latency and output agreement of every backend against eager PyTorch.

Every backend runs in its own worker process with a pinned thread count, and the backends
of a case are timed in interleaved rounds (order rotated each round); a speed-up is the
median of the per-round ratios, so load changes on a shared machine cancel. One run
measures, on the same inputs, after a warm-up: the generator (per-slice
latency, batch throughput, whole phantom volumes through the runtime pipeline), the LMI
operator (the authors' algorithm, dense PyTorch, native C++, ONNX in onnxruntime), one
MIDiffusion sampler step and one slice with DDIM; and writes results.json, results.md
and results.png into ``--out``. See bench/README.md.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from galip.runtime.cli_support import user_errors
from galip.runtime.errors import ConfigError

app = typer.Typer(add_completion=False, rich_markup_mode=None)
console = Console(stderr=True)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


HELP = ("Latency and output agreement of every backend against eager PyTorch, measured in one run on "
        "the same inputs with warm-up and repeats: the generator (per slice, batches, whole phantom volumes), "
        "the LMI operator (vs the authors' algorithm), one MIDiffusion step and one DDIM slice. Writes "
        "results.json, results.md and results.png into --out. Example: galip-bench --quick --out bench/results")


@app.command(help=HELP)
def main(
    quick: Annotated[bool, typer.Option("--quick", help="A few minutes on 2 cores: 1 thread, 128² only, the 2 mm "
                                        "volume only, few repeats, DDIM-50 on the fastest backend only, "
                                        "a 60 s torch.compile budget.")] = False,
    device: Annotated[Device, typer.Option(help="cpu: eager PyTorch and onnxruntime CPU (GPU rows say why "
                                           "they were skipped); cuda: eager fp32/fp16, onnxruntime CUDA, TensorRT.")] = Device.cpu,
    out: Annotated[Path, typer.Option(help="Folder for results.json, results.md, results.png.")] = Path("bench/results"),
    bundle: Annotated[Optional[Path], typer.Option(help="Time this bundle's graphs instead of building random-weight "
                                                   "full-size models (eager rows then use its architectures with "
                                                   "random weights).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Threads pinned in every backend's worker process (torch, "
                                                   "onnxruntime, native LMI); default 1.")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Timed calls per case (after the warm-up).")] = None,
    compile_budget: Annotated[Optional[float], typer.Option("--compile-budget", help="Seconds torch.compile may "
                                                            "take (0 disables); default 1200, 60 with --quick.")] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Skip the authors' LMI algorithm "
                                              "(~10 s per 128² call).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of weights, phantom and noise.")] = 0,
) -> None:
    from .cases import BenchConfig
    from .suite import run_bench

    with user_errors():
        overrides = {"device": device.value, "seed": seed, "bundle": bundle, "baseline": not no_baseline}
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be at least 1, got {threads}")
            overrides["threads"] = threads
        if repeats is not None:
            if repeats < 1:
                raise ConfigError(f"--repeats must be at least 1, got {repeats}")
            overrides["repeats"] = repeats
        if compile_budget is not None:
            overrides["compile_budget_s"] = max(0.0, compile_budget)
        config = BenchConfig.quick_config(**overrides) if quick else BenchConfig(**overrides)
        run_bench(config, out, log=lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True))
