"""What is measured, part 2: MIDiffusion — the LMI operator, one sampler step, one slice.

* ``lmi``: one LMI(source, u(x_t)) call on a phantom slice against a mid-sampling noisy
  sample (what every sampler step computes), by the authors' algorithm
  (:mod:`galip.bench.lmi_baseline`), the dense PyTorch reference (``lmi_dense``, the eager
  PyTorch row), the native C++ kernel (``lmi_numpy``, what ``lmi`` runs on CPU) and the
  kernel before issue 14 (``algorithm="planes"``), both also at ``lmi_threads``, and the
  bundle's ONNX function in onnxruntime, each in a worker, timed in interleaved rounds.
  Agreement is against ``lmi_dense``.
* ``diffusion step``: one call of the step contract (LMI + score network + the sampler update)
  at a mid-schedule row, eager ``DiffusionStep`` against the bundle's step graph.
* ``diffusion DDIM-K slice``: one middle slice of the 2 mm phantom translated by the
  runtime pipeline with K DDIM steps (LMI(source, source) once, K step calls, restore);
  DDIM-50 is measured on the fastest backend of the step case (every backend without
  ``--quick``), and for the others an ``estimated`` row = 50 × the step median, marked so.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from galip.runtime.contract import (DEFAULT_LMI, LMI_GRAPH_INPUTS, LMI_GRAPH_OUTPUTS, STEP_LMI_SOURCE, STEP_NOISE,
                                    STEP_SCALAR_INPUTS, STEP_SOURCE, STEP_X0_LAST, STEP_X_PREV, STEP_X_T, io_entry)

from .cases import EAGER, ORT_CPU, ORT_CUDA, Backend, Context, bundle_backends, eager_backends, gpu_reason
from . import gpu_lmi
from .harness import Row, measure
from .workload import Volume, eager_lmi, lmi_input, noisy_sample, torch_factory

LMI_IO = io_entry(LMI_GRAPH_INPUTS, LMI_GRAPH_OUTPUTS)


def lmi_settings(ctx: Context) -> dict:
    spec = ctx.models.diffusion
    return {**DEFAULT_LMI.kwargs(), **(spec or {}).get("lmi", {})}


# ----------------------------------------------------------------------------- LMI operator
AUTHORS, DENSE = "authors' algorithm", "torch dense (lmi_dense)"
NATIVE, PREVIOUS = "native C++ (lmi_numpy)", "native C++, previous kernel"
LMI_NOTES = {
    AUTHORS: "re-implementation: unfold + expand, integer-cast 27-bin dense joints (lmi_baseline.py)",
    DENSE: "galip's PyTorch reference of the contract, all offsets, vectorised",
    NATIVE: "dense 32-bin windows, joint rows in registers (lmi.cuh), what lmi() runs on CPU",
    PREVIOUS: "the kernel before issue 14 (sparse 11x12 outer products into a zeroed joint)",
    ORT_CPU: "galip::LMI ONNX function (dense, standard ops)",
}


def lmi_cases(ctx: Context) -> None:
    """One LMI call per implementation, CPU ones each in a worker, in interleaved rounds; the
    native kernels also at each thread count of ``lmi_threads`` the machine has cores for."""
    from galip.runtime.lmi_native import native_unavailable_reason

    from .interleave import Spec, interleave, start_workers
    from .machine import usable_cores

    cfg, settings, spec = ctx.config, lmi_settings(ctx), ctx.models.diffusion
    device = ctx.device if gpu_reason() is None else "cpu"
    native_why = native_unavailable_reason()

    def lmi_spec(kind: str, threads: int) -> Spec:
        return Spec("galip.bench.workers:lmi", dict(kind=kind, settings=settings, threads=threads, device=device))

    for size in cfg.lmi_sizes:
        source = ctx.slices(size, 1)
        sample = lmi_input(noisy_sample(source, 0.5, cfg.seed))
        base = dict(case="lmi", batch=1, size=f"{size}x{size}")
        entries = []   # (label, backend, device, Spec or skip reason, threads)
        if cfg.baseline:
            entries.append((AUTHORS, AUTHORS, device, lmi_spec("authors", ctx.threads), ctx.threads))
        entries.append((DENSE, DENSE, device, lmi_spec("dense", ctx.threads), ctx.threads))
        extra = [t for t in cfg.lmi_threads if t != ctx.threads and t <= usable_cores()]
        for threads in (ctx.threads, *extra):
            suffix = "" if threads == ctx.threads else f", {threads} threads"
            for label, kind in ((NATIVE, "native"), (PREVIOUS, "native-previous")):
                entries.append((label + suffix, label, "cpu", native_why or lmi_spec(kind, threads), threads))
        if spec is None:
            entries.append((ORT_CPU, ORT_CPU, "cpu", "the bundle has no diffusion model (no lmi.onnx)", ctx.threads))
        else:
            path = str(ctx.models.bundle.path(spec["lmi_graph"]["file"]))
            entries.append((ORT_CPU, ORT_CPU, "cpu", Spec("galip.bench.workers:session",
                                                          dict(path=path, threads=ctx.threads)), ctx.threads))
        live = [e for e in entries if isinstance(e[3], Spec)]
        for label, _, dev, why, _ in entries:
            if not isinstance(why, Spec):
                ctx.add(Row.skipped(why, backend=label, precision="fp32", device=dev, **base))
        workers = start_workers({e[0]: e[3] for e in live}, {e[0]: e[4] for e in live})
        try:
            ctx.log(f"lmi {size}x{size}: {len(live)} workers, interleaved rounds")
            # every round (no time budget): a few rounds are all the authors' algorithm allows
            series = interleave(workers, size, {"x": source, "y": sample}, rounds=cfg.lmi_rounds,
                                warmup=cfg.warmup, min_round_s=cfg.min_round_s)
        finally:
            for worker in workers.values():
                worker.stop()
        outputs = {}
        for label, backend, dev, _, threads in live:
            found = series[label]
            fields = dict(base, backend=label, precision="fp32", device=dev)
            if found.error or not found.seconds:
                ctx.add(Row.failed(found.error or "no round finished", **fields))
                continue
            row = Row.from_series(found, reference=label == DENSE, note=LMI_NOTES[backend], **fields)
            row.extra["threads"] = threads
            outputs[label] = np.asarray(found.output["lmi"])
            ctx.add(row)
        _gpu_lmi_rows(ctx, source, sample, settings, base, outputs)
        _lmi_agreement(ctx, outputs, size)


def _gpu_lmi_rows(ctx: Context, source, sample, settings: dict, base: dict, outputs: dict) -> None:
    """The CUDA kernel through CuPy and the LMI graph on onnxruntime's CUDA provider (GPU runs;
    timed in this process: GPU time hardly depends on the CPU's load)."""
    from galip.runtime.backends.onnxruntime.loader import cuda_providers, provider_really_loads
    from galip.runtime.backends.onnxruntime.runner import onnxrt_factory
    cfg, spec = ctx.config, ctx.models.diffusion
    why_gpu = gpu_lmi.unavailable_reason()
    fields = dict(base, backend="CUDA kernel (CuPy)", precision="fp32", device="cuda")
    if why_gpu is not None:
        ctx.add(Row.skipped(why_gpu, **fields))
    else:
        try:
            call, sync, note = gpu_lmi.kernel_lmi(source, sample, settings, ctx.workdir)
            timing, out = measure(call, warmup=cfg.warmup, repeats=cfg.repeats, budget_s=cfg.case_budget_s, sync=sync)
            outputs[fields["backend"]] = np.asarray(out.get() if hasattr(out, "get") else out)
            ctx.add(Row.timed(timing, note=note, **fields))
        except Exception as error:     # noqa: BLE001 - NVRTC/nvcc build failure
            ctx.add(Row.failed(error, **fields))
    if ctx.device != "cuda" or spec is None:
        return
    fields = dict(base, backend=ORT_CUDA, precision="fp32", device="cuda")
    kept, in_use = provider_really_loads("CUDAExecutionProvider")
    if not kept:
        ctx.add(Row.skipped(f"CUDA provider does not load (a probe session ran on {', '.join(in_use) or 'nothing'})",
                            **fields))
        return
    try:
        path = ctx.models.bundle.path(spec["lmi_graph"]["file"])
        runner = onnxrt_factory(path, cuda_providers(), threads=ctx.threads, name=ORT_CUDA)().activate()
    except Exception as error:     # noqa: BLE001
        ctx.add(Row.skipped(str(error), **fields))
        return
    try:
        feed = {"x": source, "y": sample}
        timing, out = measure(lambda: runner.infer(feed), warmup=cfg.warmup, repeats=cfg.slow_repeats,
                              budget_s=cfg.case_budget_s)
        outputs[ORT_CUDA] = out["lmi"]
        ctx.add(Row.timed(timing, note=LMI_NOTES[ORT_CPU], **fields))
    except Exception as error:     # noqa: BLE001
        ctx.add(Row.failed(error, **fields))
    finally:
        runner.deactivate()


def _lmi_agreement(ctx: Context, outputs: dict, size: int) -> None:
    """Agreement with lmi_dense; speed-ups against the authors' algorithm and the previous
    kernel at the same thread count (medians of per-round ratios)."""
    from .harness import speedup
    reference = outputs.get(DENSE)
    rows = [r for r in ctx.rows if r.case == "lmi" and r.size == f"{size}x{size}" and r.status == "ok"]
    authors = next((r for r in rows if r.backend == AUTHORS), None)
    for row in rows:
        if reference is not None and row.backend in outputs and not row.reference:
            row.with_agreement(outputs[row.backend], reference, 1.0)
        threads = row.extra.get("threads")
        if authors is not None and row is not authors and threads == authors.extra.get("threads"):
            row.extra["speedup_vs_authors"] = speedup(authors, row)
        if row.backend.startswith(NATIVE):
            previous = next((r for r in rows if r.backend.startswith(PREVIOUS) and r.extra.get("threads") == threads), None)
            if previous is not None:
                row.extra["speedup_vs_previous"] = speedup(previous, row)


# ----------------------------------------------------------------------------- one step
def _step_feed(ctx: Context, source: np.ndarray) -> dict:
    """One mid-schedule row of the DDIM-50 table with seeded x_t and noise (η = 1 for σ > 0)."""
    from galip.runtime.lmi_native import lmi_numpy
    from galip.runtime.schedule import NoiseSchedule, step_table
    spec = ctx.models.diffusion
    table = step_table(NoiseSchedule.from_manifest(spec["schedule"]), "ddim",
                       min(ctx.config.ddim_steps, int(spec["schedule"]["timesteps"])), eta=1.0)
    row = list(table.feeds())[len(table) // 2]
    lmi_source = lmi_numpy(source, source, **lmi_settings(ctx))[0]
    noise = np.random.default_rng([ctx.config.seed, 1]).standard_normal(source.shape).astype(np.float32)
    x_t = noisy_sample(source, float(row[STEP_SCALAR_INPUTS[1]][0]), ctx.config.seed)
    return {STEP_X_T: x_t, STEP_SOURCE: source, STEP_LMI_SOURCE: lmi_source, **row, STEP_NOISE: noise,
            STEP_X0_LAST: np.clip(x_t, -1.0, 1.0)}      # any x̂₀ of the step before: the cost is the same


def step_cases(ctx: Context) -> dict[tuple[str, str], float]:
    """One sampler step per backend; returns {(backend, precision): median ms} of the ok rows."""
    from .cases import interleaved_case
    spec = ctx.models.diffusion
    if spec is None:
        ctx.add(Row.skipped("the bundle has no diffusion model", case="diffusion step", backend="all"))
        return {}
    size = ctx.config.step_size
    feeds = {(size, 1): _step_feed(ctx, ctx.slices(size, 1))}
    backends = eager_backends(ctx, "step") + bundle_backends(ctx, "diffusion", spec)
    before = len(ctx.rows)
    interleaved_case(ctx, backends, feeds, STEP_X_PREV, 2.0, case="diffusion step")
    ctx.add(Row.skipped("not measured for the step: its LMI is a native C++ call (a graph break); "
                        "torch.compile is measured on the generator", case="diffusion step",
                        backend="torch-compile", device=ctx.device))
    return {(r.backend, r.precision): r.median_ms for r in ctx.rows[before:] if r.status == "ok"}


# ----------------------------------------------------------------------------- one slice
def _slab(volume: Volume, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The middle slice of ``volume`` along ``axis`` as a one-slice volume (same affine)."""
    index = [slice(None)] * 3
    middle = volume.data.shape[axis] // 2
    index[axis] = slice(middle, middle + 1)
    return np.ascontiguousarray(volume.data[tuple(index)]), volume.affine


def ddim_cases(ctx: Context, step_ms: dict[tuple[str, str], float]) -> None:
    """DDIM-K (every backend) and DDIM-50 (fastest, or all without --quick) on one slice."""
    from galip.runtime.backends.select import Choice
    from galip.runtime.pipeline import Settings, prepare
    spec = ctx.models.diffusion
    if spec is None:
        return
    cfg = ctx.config
    steps_full = min(cfg.ddim_steps, int(spec["schedule"]["timesteps"]))
    eager = [b for b in eager_backends(ctx, "step") if b.available]
    runtime = [b for b in bundle_backends(ctx, "diffusion", spec) if b.available]
    backends = eager + runtime
    volume = ctx.volume(cfg.slice_spacing)
    data, affine = _slab(volume, int(ctx.models.preprocess.get("axis", 2)))
    label = f"{'x'.join(map(str, data.shape))} ({volume.spacing:g} mm, 1 slice)"
    lmi_io = spec.get("lmi_io") or LMI_IO
    lmi_eager = torch_factory(lambda: eager_lmi(lmi_settings(ctx)), lmi_io["inputs"], lmi_io["outputs"],
                              name="torch-lmi", device=ctx.device)

    def run(backend: Backend, steps: int, case: str, reference) -> tuple[Row, np.ndarray | None]:
        fields = dict(case=case, backend=backend.name, precision=backend.precision, device=backend.device,
                      batch=1, size=label)
        try:
            name, precision = backend.settings_backend(ctx.device)
            # the runtime's LMI(source, source) runner follows the step's LMI placement
            translator = prepare(ctx.models.bundle, ctx.models.target,
                                 Settings(model="diffusion", backend=name, precision=precision, steps=steps,
                                          sampler="ddim", batch=1, seed=cfg.seed, threads=ctx.threads,
                                          lmi=backend.lmi or "auto"))
            lmi_factory = lmi_eager if backend.name == EAGER else translator.lmi_factory
            translator = dataclasses.replace(
                translator, factory=backend.factory, lmi_factory=lmi_factory,
                choice=Choice(backend.name, backend.precision, f"galip-bench: {backend.name}", Path("-")))
            timing, result = measure(lambda: translator.translate(data, affine, "mri"), warmup=0,
                                     repeats=1 if steps == steps_full and cfg.quick else cfg.volume_repeats,
                                     budget_s=cfg.case_budget_s, sync=ctx.sync())
        except Exception as error:     # noqa: BLE001
            return Row.failed(error, **fields), None
        row = Row.timed(timing, reference=backend.reference, **fields)
        row.note = f"runtime pipeline, {steps} DDIM steps (eta 0), runner activation included"
        if reference is not None and not backend.reference:
            row.with_agreement(result.data, reference)
        return row, result.data

    # 1. DDIM-K on every backend (agreement against eager DDIM-K).
    few = min(cfg.few_steps, steps_full)
    reference = None
    for backend in backends:
        row, out = run(backend, few, f"diffusion DDIM-{few} slice", reference)
        if backend.reference:
            reference = out
        ctx.add(row)
    # 2. DDIM-50: every backend without --quick, else the fastest by the step case.
    ranked = sorted((b for b in backends if (b.name, b.precision) in step_ms),
                    key=lambda b: step_ms[(b.name, b.precision)])
    chosen = backends if cfg.ddim_all else ranked[:1]
    case = f"diffusion DDIM-{steps_full} slice"
    reference = None
    for backend in chosen:
        row, out = run(backend, steps_full, case, reference)
        if backend.reference:
            reference = out
        if cfg.quick:
            row.note += "; measured on the fastest backend of the step case"
        ctx.add(row)
    # 3. Without a DDIM-50 run on every backend: estimates for all of them (the measured
    #    one included, which shows how far the estimate is off), marked as such.
    if cfg.ddim_all:
        return
    for backend in backends:
        if (backend.name, backend.precision) not in step_ms:
            continue
        ms = step_ms[(backend.name, backend.precision)] * steps_full
        ctx.add(Row(case=f"{case} (estimated)", backend=backend.name, precision=backend.precision,
                    device=backend.device, batch=1, size=label, median_ms=ms, status="estimated",
                    reference=backend.reference,
                    note=f"estimated = {steps_full} x step median (diffusion step case); not measured"))
