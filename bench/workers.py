"""Factories that run inside benchmark workers (:mod:`galip.bench.interleave`).

Each takes picklable arguments (paths, dicts, numbers) and returns ``fn(feed) -> outputs``,
built in the worker's own process: model weights and sessions load there, never in the
parent. ``fake`` is a backend of known duration, for testing the interleaving itself.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np


def fake(ms: float, busy: bool = True) -> Callable:
    """A backend that takes ``ms`` milliseconds per call (busy-waiting, so CPU contention
    slows it like real work; ``busy=False`` sleeps). Returns ``{"ms": [ms]}``."""
    seconds = ms / 1e3

    def run(feed: dict) -> dict:
        end = time.perf_counter() + seconds
        if not busy:
            time.sleep(seconds)
        while time.perf_counter() < end:
            pass
        return {"ms": np.array([ms])}
    return run


def _active(runner) -> Callable:
    runner.activate()

    def run(feed: dict) -> dict:
        return runner.infer(feed)
    run.close = runner.deactivate        # called by the worker on stop
    return run


def eager(kind: str, checkpoint: str | None, entry: dict | None, io: dict, seed: int = 0,
          device: str = "cpu", precision: str = "fp32") -> Callable:
    """Eager PyTorch ``generator`` or diffusion ``step`` behind the runner protocol."""
    from .workload import eager_generator, eager_step, torch_factory
    make = {"generator": eager_generator, "step": eager_step}[kind]
    path = Path(checkpoint) if checkpoint else None
    factory = torch_factory(lambda: make(path, entry, seed), io["inputs"], io["outputs"],
                            name="torch-eager", precision=precision, device=device)
    return _active(factory())


def runtime(bundle: str, model: str, requested: str, precision: str, domain: str | None = None,
            threads: int | None = None, lmi: str | None = None) -> Callable:
    """The bundle's graph through the runtime's own backend choice (``select_backend``)."""
    from galip.runtime.backends.select import select_backend
    from galip.runtime.bundle import load_bundle
    factory, _ = select_backend(load_bundle(Path(bundle)), model, requested, precision, domain=domain,
                                threads=threads, lmi=lmi)
    return _active(factory())


def session(path: str, threads: int | None = None, options: dict | None = None) -> Callable:
    """One ONNX graph on onnxruntime's CPU provider with explicit session ``options``
    (:class:`galip.runtime.backends.onnxruntime.loader.SessionFromOnnx` keywords);
    ``threads=None``: the runtime's own default, as if no thread count were pinned."""
    import os

    from galip.runtime.backends.onnxruntime.loader import SessionFromOnnx
    if threads is None:
        os.environ.pop("GALIP_NUM_THREADS", None)
    from galip.runtime.backends.onnxruntime.runner import OnnxrtRunner
    return _active(OnnxrtRunner(SessionFromOnnx(path, threads=threads, **(options or {}))))


def lmi(kind: str, settings: dict, threads: int = 1, device: str = "cpu") -> Callable:
    """One LMI implementation: ``authors``, ``dense`` (lmi_dense), ``native`` (lmi_numpy's
    default kernel), ``native-previous`` (the kernel before issue 14, kept to measure against).
    The feed holds ``x`` and ``y`` (1, 1, H, W); returns the LMI map as ``{"lmi": ...}``."""
    if kind in ("native", "native-previous"):
        from galip.runtime.lmi_native import lmi_numpy
        algorithm = "planes" if kind == "native-previous" else "auto"

        def run_native(feed: dict) -> dict:
            return {"lmi": lmi_numpy(feed["x"], feed["y"], **settings, num_threads=threads,
                                     algorithm=algorithm)[0]}
        return run_native
    import torch
    torch.set_num_threads(threads)
    if kind == "authors":
        from .lmi_baseline import lmi_authors
        keys = ("patch", "radius", "bins", "sigma", "normalize")

        def run_authors(feed: dict) -> dict:
            out = lmi_authors(torch.from_numpy(feed["x"]).to(device), torch.from_numpy(feed["y"]).to(device),
                              *(settings[k] for k in keys))[0]
            return {"lmi": out.cpu().numpy()}
        return run_authors
    if kind == "dense":
        from galip.train.lmi import lmi_dense

        def run_dense(feed: dict) -> dict:
            with torch.no_grad():
                x, y = (torch.from_numpy(feed[k]).to(device) for k in "xy")
                return {"lmi": lmi_dense(x, y, **settings)[0].cpu().numpy()}
        return run_dense
    raise ValueError(f"unknown LMI kind {kind!r}")


def failing(after: int = 0) -> Callable:
    """A backend that fails on its call number ``after`` (0: the first), for tests."""
    calls = []

    def run(feed: dict) -> dict:
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError(f"failed on call {len(calls)}")
        return {"ok": np.array([1])}
    return run


def environment() -> Callable:
    """A backend returning its worker's thread environment, for tests."""
    import os

    from .interleave import THREAD_ENV
    return lambda feed: {key: os.environ.get(key) for key in THREAD_ENV}
