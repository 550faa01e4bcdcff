"""What is measured, part 2: MIDiffusion — the LMI operator, one sampler step, one slice.

* ``lmi``: one LMI(source, u(x_t)) call on a phantom slice against a mid-sampling noisy
  sample (what every sampler step computes), by the authors' algorithm
  (:mod:`galip.bench.lmi_baseline`), the dense PyTorch reference (``lmi_dense``, the eager
  PyTorch row), the native C++ kernel (``lmi_numpy``, what ``lmi`` runs on CPU) and the
  bundle's ONNX function in onnxruntime. Agreement is against ``lmi_dense``.
* ``diffusion step``: one call of the step contract (LMI + score network + DDIM update)
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
from .workload import Volume, eager_lmi, eager_step, lmi_input, noisy_sample, torch_factory

LMI_IO = io_entry(LMI_GRAPH_INPUTS, LMI_GRAPH_OUTPUTS)


def lmi_settings(ctx: Context) -> dict:
    spec = ctx.models.diffusion
    return {**DEFAULT_LMI.kwargs(), **(spec or {}).get("lmi", {})}


# ----------------------------------------------------------------------------- LMI operator
def lmi_cases(ctx: Context) -> None:
    import torch

    from galip.runtime.backends.onnxruntime.loader import cuda_providers, provider_really_loads
    from galip.runtime.backends.onnxruntime.runner import onnxrt_factory
    from galip.runtime.lmi_native import lmi_numpy, native_unavailable_reason
    from galip.train.lmi import lmi_dense

    from .lmi_baseline import lmi_authors

    cfg, settings = ctx.config, lmi_settings(ctx)
    spec = ctx.models.diffusion
    device = ctx.device if gpu_reason() is None else "cpu"
    for size in cfg.lmi_sizes:
        source = ctx.slices(size, 1)
        sample = lmi_input(noisy_sample(source, 0.5, cfg.seed))
        base = dict(case="lmi", batch=1, size=f"{size}x{size}")
        tx, ty = torch.from_numpy(source).to(device), torch.from_numpy(sample).to(device)
        sync = ctx.sync() if device == "cuda" else None
        calls = []   # (backend, precision, device, fn or skip reason, repeats, reference, note, sync)
        if cfg.baseline:
            calls.append(("authors' algorithm", "fp32", device,
                          lambda: lmi_authors(tx, ty, settings["patch"], settings["radius"], settings["bins"],
                                              settings["sigma"], settings["normalize"])[0],
                          cfg.slow_repeats, False,
                          "re-implementation: unfold + expand, integer-cast 27-bin dense joints (lmi_baseline.py)",
                          sync))
        calls.append(("torch dense (lmi_dense)", "fp32", device, lambda: lmi_dense(tx, ty, **settings)[0],
                      cfg.slow_repeats, True, "galip's PyTorch reference of the contract, all offsets, vectorised",
                      sync))
        calls.append(("native C++ (lmi_numpy)", "fp32", "cpu",
                      native_unavailable_reason() or
                      (lambda: lmi_numpy(source, sample, **settings, num_threads=ctx.threads)[0]),
                      cfg.repeats, False, "sparse soft-binning kernel, what lmi() runs on CPU", None))
        why_gpu = gpu_lmi.unavailable_reason()
        if why_gpu is None:
            try:
                kernel_call, kernel_sync, kernel_note = gpu_lmi.kernel_lmi(source, sample, settings, ctx.workdir)
                calls.append(("CUDA kernel (CuPy)", "fp32", "cuda", kernel_call, cfg.repeats, False, kernel_note,
                              kernel_sync))
            except Exception as error:     # noqa: BLE001 - NVRTC/nvcc build failure
                ctx.add(Row.failed(error, **base, backend="CUDA kernel (CuPy)", device="cuda"))
        else:
            calls.append(("CUDA kernel (CuPy)", "fp32", "cuda", why_gpu, 0, False, "", None))
        outputs = {}
        for name, precision, dev, fn, repeats, reference, note, call_sync in calls:
            fields = dict(base, backend=name, precision=precision, device=dev)
            if isinstance(fn, str):
                ctx.add(Row.skipped(fn, **fields))
                continue
            try:
                timing, out = measure(fn, warmup=0 if repeats == cfg.slow_repeats else cfg.warmup,
                                      repeats=repeats, budget_s=cfg.case_budget_s, sync=call_sync)
            except Exception as error:     # noqa: BLE001
                ctx.add(Row.failed(error, **fields))
                continue
            if hasattr(out, "detach"):
                out = out.detach().float().cpu().numpy()
            elif hasattr(out, "get"):      # CuPy
                out = out.get()
            outputs[name] = np.asarray(out)
            ctx.add(Row.timed(timing, reference=reference, note=note, **fields))
        # the bundle's ONNX function (onnxruntime CPU; CUDA provider on a GPU run when it loads)
        if spec is None:
            ctx.add(Row.skipped("the bundle has no diffusion model (no lmi.onnx)", backend=ORT_CPU, **base))
        else:
            path = ctx.models.bundle.path(spec["lmi_graph"]["file"])
            providers = [(ORT_CPU, ["CPUExecutionProvider"])]
            if ctx.device == "cuda":
                providers.append((ORT_CUDA, cuda_providers()))
            for name, provider_list in providers:
                fields = dict(base, backend=name, precision="fp32", device="cpu" if name == ORT_CPU else "cuda")
                if name == ORT_CUDA:
                    kept, in_use = provider_really_loads("CUDAExecutionProvider")
                    if not kept:
                        ctx.add(Row.skipped(f"CUDA provider does not load (a probe session ran on "
                                            f"{', '.join(in_use) or 'nothing'})", **fields))
                        continue
                try:
                    runner = onnxrt_factory(path, provider_list, threads=ctx.threads, name=name)().activate()
                except Exception as error:     # noqa: BLE001 - e.g. CUDA provider does not load
                    ctx.add(Row.skipped(str(error), **fields))
                    continue
                try:
                    feed = {"x": source, "y": sample}
                    timing, out = measure(lambda: runner.infer(feed), warmup=cfg.warmup, repeats=cfg.slow_repeats,
                                          budget_s=cfg.case_budget_s)
                    outputs[name] = out["lmi"]
                    ctx.add(Row.timed(timing, note="galip::LMI ONNX function (dense, standard ops)", **fields))
                except Exception as error:     # noqa: BLE001
                    ctx.add(Row.failed(error, **fields))
                finally:
                    runner.deactivate()
        _lmi_agreement(ctx, outputs, size)


def _lmi_agreement(ctx: Context, outputs: dict, size: int) -> None:
    """Agreement with lmi_dense and speed-up against the authors' algorithm, per LMI row."""
    reference = outputs.get("torch dense (lmi_dense)")
    authors = next((r for r in ctx.rows if r.case == "lmi" and r.size == f"{size}x{size}"
                    and r.backend == "authors' algorithm" and r.status == "ok"), None)
    for row in ctx.rows:
        if row.case != "lmi" or row.size != f"{size}x{size}" or row.status != "ok":
            continue
        if reference is not None and row.backend in outputs and not row.reference:
            row.with_agreement(outputs[row.backend], reference, 1.0)
        if authors is not None and row.median_ms:
            row.extra["speedup_vs_authors"] = authors.median_ms / row.median_ms


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


def _step_build(ctx: Context):
    checkpoint, entry = ctx.models.diffusion_checkpoint, ctx.models.diffusion
    return lambda: eager_step(checkpoint, entry, ctx.config.seed)


def step_cases(ctx: Context) -> dict[tuple[str, str], float]:
    """One sampler step per backend; returns {(backend, precision): median ms} of the ok rows."""
    from .cases import _per_call
    spec = ctx.models.diffusion
    if spec is None:
        ctx.add(Row.skipped("the bundle has no diffusion model", case="diffusion step", backend="all"))
        return {}
    size = ctx.config.step_size
    feeds = {(size, 1): _step_feed(ctx, ctx.slices(size, 1))}
    backends = eager_backends(ctx, _step_build(ctx), spec["io"]) + bundle_backends(ctx, "diffusion", spec)
    reference: dict = {}
    before = len(ctx.rows)
    for backend in backends:
        _per_call(ctx, backend, feeds, reference, STEP_X_PREV, 2.0, case="diffusion step")
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
    eager = [b for b in eager_backends(ctx, _step_build(ctx), spec["io"]) if b.available]
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
