"""What is measured, part 1: the run's settings and context, backends, the generator cases.

Every per-call case runs each backend in its own worker process with the run's pinned thread
count and times all of them on the same inputs in interleaved rounds (:mod:`.interleave`),
the eager PyTorch fp32 row first (the reference of its group for speed-up and agreement). A backend
that cannot run here still gets a row: ``skipped`` with the reason (the runtime's own
backend probe supplies it for onnxruntime-cuda and TensorRT), or ``failed`` with the
first line of the error. Diffusion cases live in :mod:`galip.bench.diffusion_cases`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from galip.runtime.contract import GEN_DOMAIN, GEN_IMAGE, GEN_OUTPUT

from .harness import Row, first_line, measure
from .interleave import Spec
from .workload import Models, Volume, model_slices, torch_factory

EAGER = "torch-eager"
COMPILE = "torch-compile"
ORT_CPU, ORT_CUDA, TRT = "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"
LMI_LABELS = {"onnx": "LMI in graph", "native": "native LMI"}


@dataclass
class BenchConfig:
    """What one ``galip-bench`` run measures (CLI flags; :meth:`quick_config` for ``--quick``)."""

    quick: bool = False
    device: str = "cpu"
    threads: int | None = None              # per backend worker; None: 1
    seed: int = 0
    warmup: int = 1
    repeats: int = 10                       # calls timed per case (fewer once case_budget_s is spent)
    slow_repeats: int = 3                   # for cases that take seconds per call
    case_budget_s: float = 60.0             # timed seconds per case before rounds stop early
    min_round_s: float = 0.3                # a backend repeats within a round until this is spent
    lmi_threads: tuple[int, ...] = (2,)     # extra thread counts of the native LMI rows (<= usable cores)
    sizes: tuple[int, ...] = (128, 256)     # generator slice sizes
    batches: tuple[int, ...] = (1, 8, 32)
    volumes: tuple[float, ...] = (2.0, 1.0)  # whole-volume phantoms (mm)
    slice_spacing: float = 2.0              # phantom the <= 128² slices and the DDIM slice come from
    volume_batch: int = 8
    volume_repeats: int = 2
    lmi_sizes: tuple[int, ...] = (128, 256)
    lmi_rounds: int = 5                     # interleaved rounds of the LMI case (the authors' takes seconds)
    step_size: int = 128
    ddim_steps: int = 50
    few_steps: int = 5
    ddim_all: bool = True                   # DDIM-50 on every backend (quick: the fastest only)
    compile_budget_s: float = 1200.0        # torch.compile child process; 0 disables
    compile_cases: int = 99                 # (size, batch) cases given to torch.compile
    baseline: bool = True                   # the authors' LMI algorithm
    unet: dict | None = None                # UNetConfig fields (None: the reference architecture)
    net: dict | None = None                 # ScoreNetConfig fields
    timesteps: int = 1000
    fp16: bool | None = None                # export fp16 graphs (None: on cuda only)
    int8: bool = True                       # quantise the random-weight generator (speed rows only)
    bundle: Path | None = None
    target: str | None = None

    @classmethod
    def quick_config(cls, **overrides) -> "BenchConfig":
        """``--quick``: one thread, 128² only, 2 mm volume only, few repeats, DDIM-50 on the
        fastest backend and ``few_steps`` on the rest, a 60 s torch.compile budget."""
        base = dict(quick=True, threads=1, repeats=5, slow_repeats=1, case_budget_s=20.0, sizes=(128,),
                    batches=(1, 8, 32), volumes=(2.0,), volume_repeats=1, lmi_sizes=(128,), lmi_rounds=3, few_steps=3,
                    ddim_all=False, compile_budget_s=60.0, compile_cases=1, warmup=1)
        return cls(**{**base, **overrides})

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["bundle"] = str(self.bundle) if self.bundle else None
        return data


@dataclass
class Context:
    """Shared state of one run: settings, models, inputs, the rows so far, the log."""

    config: BenchConfig
    models: Models
    workdir: Path
    log: Callable[[str], None] = print
    rows: list[Row] = field(default_factory=list)
    volumes: dict[float, Volume] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        return int(self.config.threads or 1)

    @property
    def device(self) -> str:
        return self.config.device

    def volume(self, spacing: float) -> Volume:
        if spacing not in self.volumes:
            from .workload import phantom_volume
            started = time.perf_counter()
            self.volumes[spacing] = phantom_volume(spacing, self.config.seed)
            self.log(f"phantom {self.volumes[spacing].label} in {time.perf_counter() - started:.1f} s")
        return self.volumes[spacing]

    def slices(self, size: int, n: int) -> np.ndarray:
        """n model-space slices (n, 1, size, size): from the phantom whose slices are nearest
        in size (2 mm up to 128², else 1 mm), through the bundle's preprocessing."""
        spacing = self.config.slice_spacing if size <= 128 else 1.0
        return model_slices(self.volume(spacing), self.models.preprocess, n, size)

    def add(self, row: Row) -> Row:
        if row.load is None and row.status == "ok":      # rows timed outside interleaved rounds
            from .machine import load_average
            row.load = (load_average() or [None])[0]
        self.rows.append(row)
        if row.status in ("ok", "estimated"):
            agree = "" if row.max_abs is None else f", max-abs {row.max_abs:.2g}"
            self.log(f"{row.case} {row.backend} {row.precision} b{row.batch} {row.size}: "
                     f"{row.median_ms:.1f} ms ({row.status}, n={row.repeats}{agree})")
        else:
            self.log(f"{row.case} {row.backend} {row.precision}: {row.status}: {row.reason}")
        return row

    def sync(self) -> Callable[[], None] | None:
        if self.device == "cuda":
            import torch
            return torch.cuda.synchronize
        return None


# ----------------------------------------------------------------------------- backends
@dataclass
class Backend:
    """A way to run one model: a runner factory, or why there is none.

    ``lmi``: for a diffusion step on onnxruntime-cpu, where the runtime runs its LMI
    (``onnx``: the graph's function body; ``native``: the native kernel, split runner);
    passed to ``select_backend(lmi=...)`` and, as ``Settings.lmi``, to the pipeline's ``prepare``.
    """

    name: str
    precision: str
    device: str
    factory: Callable | None = None
    reason: str = ""
    reference: bool = False
    lmi: str | None = None
    note: str = ""
    runtime: str | None = None      # the runtime backend name (select_backend's), None for eager
    spec: Spec | None = None        # how a worker process builds it (interleaved cases)

    @property
    def key(self) -> str:
        return f"{self.name} {self.precision}"

    @property
    def available(self) -> bool:
        return self.factory is not None

    def settings_backend(self, device: str) -> tuple[str, str | None]:
        """(backend, precision) for the runtime pipeline's Settings: this backend's own, or for
        eager rows (whose runner replaces the pipeline's) the runtime's default on ``device``."""
        if self.runtime is not None:
            return self.runtime, self.precision
        return (ORT_CPU if device == "cpu" else "auto"), None


def gpu_reason() -> str | None:
    """Why no GPU backend can run here, or None when torch sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return "torch does not import"
    if not torch.cuda.is_available():
        return f"no CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


def runtime_backend(ctx: Context, model: str, requested: str, precision: str,
                    lmi: str | None = None) -> Backend:
    """A bundle backend through the runtime's own probe (``select_backend``); skip reason if not.

    ``lmi`` (diffusion on onnxruntime-cpu): ``onnx`` or ``native``; the row is labelled with
    it, and skipped when the runtime does not place the LMI there (saying why).
    """
    from galip.runtime.backends.select import select_backend
    from galip.runtime.errors import GalipError
    device = "cpu" if requested == ORT_CPU else "cuda"
    domain = ctx.models.target if model == "diffusion" else None
    name = requested if lmi is None else f"{requested} ({LMI_LABELS[lmi]})"
    try:
        factory, choice = select_backend(ctx.models.bundle, model, requested, precision, domain=domain,
                                         threads=ctx.threads, lmi=lmi)
    except GalipError as error:     # e.g. lmi="native" where the native kernel cannot run
        return Backend(name, precision, device, reason=str(error), lmi=lmi)
    spec = Spec("galip.bench.workers:runtime", dict(bundle=str(ctx.models.bundle.root), model=model,
                requested=requested, precision=precision, domain=domain, threads=ctx.threads, lmi=lmi))
    return Backend(name, precision, device, factory, lmi=lmi, note=choice.reason, runtime=requested, spec=spec)


def bundle_backends(ctx: Context, model: str, spec: dict) -> list[Backend]:
    """The bundle's graphs/engines to run for ``model`` on this run's device."""
    graphs = spec.get("graphs", {})
    if ctx.device == "cpu":
        if model == "diffusion":   # the LMI in the graph's function body, and on the native kernel
            backends = [runtime_backend(ctx, model, ORT_CPU, "fp32", lmi) for lmi in LMI_LABELS]
        else:
            backends = [runtime_backend(ctx, model, ORT_CPU, "fp32")]
        if "int8" in graphs:
            backends.append(runtime_backend(ctx, model, ORT_CPU, "int8"))
        else:
            backends.append(Backend(ORT_CPU, "int8", "cpu", reason="the bundle has no int8 graph "
                                    "(galip-export --int8 writes one for a generator whose quality holds)"))
        why = gpu_reason() or "--device cpu (run with --device cuda for the GPU backends)"
        backends += [Backend(name, precision, "cuda", reason=why) for name, precision in
                     ((ORT_CUDA, "fp32"), (ORT_CUDA, "fp16"), (TRT, "fp32"), (TRT, "fp16"))]
        return backends
    return [runtime_backend(ctx, model, name, precision) for name, precision in
            ((ORT_CUDA, "fp32"), (ORT_CUDA, "fp16"), (TRT, "fp32"), (TRT, "fp16"))]


def eager_backends(ctx: Context, kind: str) -> list[Backend]:
    """Eager PyTorch fp32 on the run's device (the reference), and fp16 (autocast) on a GPU.
    ``kind``: ``generator`` or ``step`` (the diffusion step module)."""
    from .workload import eager_generator, eager_step
    models = ctx.models
    checkpoint = models.generator_checkpoint if kind == "generator" else models.diffusion_checkpoint
    entry = models.generator if kind == "generator" else models.diffusion
    make = eager_generator if kind == "generator" else eager_step
    seed = ctx.config.seed

    def backend(precision: str, device: str, reference: bool = False) -> Backend:
        factory = torch_factory(lambda: make(checkpoint, entry, seed), entry["io"]["inputs"], entry["io"]["outputs"],
                                name=EAGER, precision=precision, device=device)
        spec = Spec("galip.bench.workers:eager", dict(kind=kind, checkpoint=str(checkpoint) if checkpoint else None,
                    entry=entry, io=entry["io"], seed=seed, device=device, precision=precision))
        return Backend(EAGER, precision, device, factory, reference=reference, spec=spec)
    if ctx.device == "cuda":
        why = gpu_reason()
        if why:
            return [Backend(EAGER, p, "cuda", reason=why) for p in ("fp32", "fp16")]
        return [backend("fp32", "cuda", True), backend("fp16", "cuda")]
    return [backend("fp32", "cpu", True), Backend(EAGER, "fp16", "cuda", reason=gpu_reason() or "--device cpu")]


# ----------------------------------------------------------------------------- generator
def generator_cases(ctx: Context) -> None:
    """Per-slice latency (batch 1), throughput (batches 8, 32) at each size, every backend."""
    spec = ctx.models.generator
    if spec is None:
        ctx.add(Row.skipped("the bundle has no generator", case="generator", backend="all"))
        return
    cfg = ctx.config
    class_id = ctx.models.bundle.domains[ctx.models.target].class_id
    feeds = {}
    for size in cfg.sizes:
        images = ctx.slices(size, max(cfg.batches))
        for batch in cfg.batches:
            feeds[(size, batch)] = {GEN_IMAGE: images[:batch], GEN_DOMAIN: np.full(batch, class_id, np.int64)}
    backends = eager_backends(ctx, "generator") + bundle_backends(ctx, "generator", spec)
    reference = interleaved_case(ctx, backends, feeds, GEN_OUTPUT, 1.0, case="generator")
    if backends[0].available:             # torch.compile in its own child, after the interleaved rounds
        compile_rows(ctx, feeds, reference)
    else:
        ctx.add(Row.skipped(backends[0].reason, case="generator", backend=COMPILE, device=backends[0].device))


def interleaved_case(ctx: Context, backends: list[Backend], feeds: dict, output: str, data_range: float,
                     *, case: str) -> dict:
    """Every available backend in its own worker; each feed ((size, batch) -> arrays) timed in
    interleaved rounds. Returns the reference backend's outputs per feed key."""
    from .interleave import interleave, start_workers
    cfg = ctx.config
    live = []
    for backend in backends:
        if backend.spec is None:
            ctx.add(Row.skipped(backend.reason, case=case, backend=backend.name, precision=backend.precision,
                                device=backend.device))
        else:
            live.append(backend)
    workers = start_workers({b.key: b.spec for b in live}, ctx.threads)
    reference: dict = {}
    try:
        for (size, batch), feed in feeds.items():
            big = batch * size * size > 8 * 128 * 128
            ctx.log(f"{case} b{batch} {size}x{size}: {len(live)} workers, interleaved rounds")
            series = interleave(workers, (size, batch), feed, rounds=cfg.slow_repeats if big else cfg.repeats,
                                warmup=cfg.warmup, budget_s=cfg.case_budget_s, min_round_s=cfg.min_round_s)
            rows = []
            for backend in live:
                found = series[backend.key]
                fields = dict(case=case, backend=backend.name, precision=backend.precision, device=backend.device,
                              batch=batch, size=f"{size}x{size}")
                if found.error or not found.seconds:
                    rows.append((backend, Row.failed(found.error or "no round finished", **fields), None))
                    continue
                row = Row.from_series(found, reference=backend.reference, **fields)
                if backend.precision == "int8" and cfg.bundle is None:
                    row.note = "static QDQ; random weights here, so speed only (galip-export --int8 gates quality)"
                row.extra["activate_s"] = round(workers[backend.key].setup_s or 0.0, 3)
                rows.append((backend, row, found.output[output] if found.output else None))
                if backend.reference and found.output:
                    reference[(size, batch)] = found.output[output]
            for backend, row, out in rows:
                if out is not None and not backend.reference and (size, batch) in reference:
                    row.with_agreement(out, reference[(size, batch)], data_range)
                ctx.add(row)
    finally:
        for worker in workers.values():
            worker.stop()
    return reference


def compile_rows(ctx: Context, feeds: dict, reference: dict) -> None:
    """torch.compile of the eager generator, in a child process under ``compile_budget_s``."""
    from .compile_child import run_compiled
    cfg = ctx.config
    base = dict(case="generator", backend=COMPILE, precision="fp32", device=ctx.device)
    if cfg.compile_budget_s <= 0:
        ctx.add(Row.skipped("disabled (--compile-budget 0)", **base))
        return
    keys = list(feeds)[: cfg.compile_cases]
    arrays = {}
    for size, batch in keys:
        arrays[f"s{size}_b{batch}"] = feeds[(size, batch)]["image"]
        arrays[f"domain_s{size}_b{batch}"] = feeds[(size, batch)]["domain"]
    workdir = ctx.workdir / "compile"
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(workdir / "inputs.npz", **arrays)
    spec = {"checkpoint": str(ctx.models.generator_checkpoint) if ctx.models.generator_checkpoint else None,
            "manifest_entry": None if ctx.models.generator_checkpoint else ctx.models.generator,
            "inputs": str(workdir / "inputs.npz"), "cases": [f"s{s}_b{b}" for s, b in keys],
            "device": ctx.device, "threads": ctx.threads, "warmup": cfg.warmup, "repeats": cfg.repeats,
            "budget_per_case_s": cfg.case_budget_s}
    ctx.log(f"torch.compile in a child process (budget {cfg.compile_budget_s:.0f} s) ...")
    data, reason = run_compiled(spec, workdir, cfg.compile_budget_s)
    if data is None:
        ctx.add(Row.skipped(reason, **base))
        return
    outputs = np.load(workdir / "outputs.npz", allow_pickle=False)
    for size, batch in keys:
        key = f"s{size}_b{batch}"
        fields = dict(base, batch=batch, size=f"{size}x{size}")
        if key not in data:
            ctx.add(Row.skipped(f"not reached: {data.get('unfinished') or 'child stopped'}", **fields))
            continue
        from .harness import Timing
        entry = data[key]
        row = Row.timed(Timing(tuple(entry["seconds"]), entry["warmup"]), **fields)
        row.note = f"first call (compilation) {entry['first_call_s']:.1f} s"
        row.extra["first_call_s"] = round(entry["first_call_s"], 2)
        if (size, batch) in reference:
            row.with_agreement(outputs[key], reference[(size, batch)], 1.0)
        ctx.add(row)
    if len(keys) < len(feeds):
        ctx.add(Row.skipped(f"other sizes/batches not compiled (--quick compiles {len(keys)} case(s) "
                            f"to stay within its time budget)", **dict(base, batch=None)))


# ----------------------------------------------------------------------------- whole volume
def volume_cases(ctx: Context) -> None:
    """Whole-volume wall time through the runtime pipeline, per phantom spacing and backend:
    preprocessing, batches of ``volume_batch`` slices, restore; runners activated inside the
    timed call (weights loaded from disk, as galip-run does); NIfTI I/O excluded."""
    from galip.runtime.backends.select import Choice
    from galip.runtime.pipeline import Settings, prepare
    spec = ctx.models.generator
    if spec is None:
        return
    cfg = ctx.config
    eager = [b for b in eager_backends(ctx, "generator") if b.available]
    runtime = [b for b in bundle_backends(ctx, "generator", spec) if b.available]
    for spacing in cfg.volumes:
        volume = ctx.volume(spacing)
        case = f"generator volume {spacing:g} mm"
        reference = None
        for backend in eager + runtime:
            fields = dict(case=case, backend=backend.name, precision=backend.precision, device=backend.device,
                          batch=cfg.volume_batch, size=volume.label)
            try:
                name, precision = backend.settings_backend(ctx.device)
                translator = prepare(ctx.models.bundle, ctx.models.target,
                                     Settings(model="generator", backend=name, precision=precision,
                                              batch=cfg.volume_batch, threads=ctx.threads))
                translator = dataclasses.replace(
                    translator, factory=backend.factory,
                    choice=Choice(backend.name, backend.precision, f"galip-bench: {backend.name}", Path("-")))
                timing, result = measure(lambda: translator.translate(volume.data, volume.affine, "mri"),
                                         warmup=0, repeats=cfg.volume_repeats, budget_s=cfg.case_budget_s,
                                         sync=ctx.sync())
            except Exception as error:     # noqa: BLE001
                ctx.add(Row.failed(error, **fields))
                continue
            row = Row.timed(timing, reference=backend.reference, **fields)
            row.note = "wall time of one volume, runner activation included"
            if backend.reference:
                reference = result.data
            elif reference is not None:
                row.with_agreement(result.data, reference)
            ctx.add(row)


def skip_all(ctx: Context, case: str, error: BaseException) -> None:
    ctx.add(Row.failed(error, case=case, backend="all"))
    ctx.log(f"{case}: {first_line(error)}")


__all__ = ["BenchConfig", "Context", "Backend", "generator_cases", "volume_cases"]
