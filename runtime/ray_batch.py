"""A batch on a Ray cluster (``galip-run ... --ray ADDRESS``): Ray Data over the cases,
``map_batches`` with a fixed pool of :class:`CaseWorker` actors, each holding one
activated :class:`~galip.runtime.api.Session`. The actors read, translate and write (output
and provenance JSON, atomically), so every machine needs the inputs, the output folder and
the bundle at the same paths (a shared file system) and galip installed. The driver only
collects one :class:`~galip.runtime.batch.Outcome` per case, as the local batch does.

``ADDRESS``: ``local`` starts a private instance on this machine; ``auto`` joins the cluster
started here with ``ray start --head`` (or ``$RAY_ADDRESS``); ``HOST:PORT`` or
``ray://HOST:10001`` joins a remote head. When Ray is already initialised in this process
(a notebook, the tests) that instance is used and left running. One GPU per actor where
the cluster has GPUs (unless ``--backend onnxruntime-cpu``), else one CPU per actor, with
onnxruntime's threads set to it unless ``--threads`` says otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

from .api import Session
from .batch import Case, Outcome, process_case
from .errors import BackendError, ConfigError
from .pipeline import Settings

INSTALL_RAY = "pip install 'galip[ray]'"


def import_ray():
    """``ray`` with Ray Data, or ConfigError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--ray needs Ray Data, which does not import here ({exc}); install it: {INSTALL_RAY}") from None
    return ray


class CaseWorker:
    """A Ray Data actor: one Session (bundle checked, runners activated) for all its cases."""

    def __init__(self, to: str, bundle: str, settings: Settings, kind: str, overwrite: bool):
        self.session = Session(to, bundle, settings).activate()
        self.kind, self.overwrite = kind, overwrite

    def __call__(self, batch: dict) -> dict:
        rows: dict[str, list] = {"index": [], "status": [], "error": [], "seconds": [], "notes": []}
        for index, source, output, extra in zip(batch["index"], batch["source"], batch["output"], batch["extra"]):
            case = Case(int(index), Path(str(source)), Path(str(output)), json.loads(str(extra)))
            outcome = process_case(self.session, case, kind=self.kind, overwrite=self.overwrite)
            rows["index"].append(case.index)
            rows["status"].append(outcome.status)
            rows["error"].append(outcome.error)
            rows["seconds"].append(outcome.seconds)
            rows["notes"].append("\n".join(outcome.notes))
        return rows


def _pool(ray, settings: Settings, workers: int | None, n_cases: int) -> tuple[int, dict]:
    """(actor pool size, per-actor resources): one GPU each where the cluster has GPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus > 0 and settings.backend != "onnxruntime-cpu"
    size = workers or (gpus if use_gpu else max(1, int(resources.get("CPU", 1))))
    return max(1, min(size, n_cases)), ({"num_cpus": 1, "num_gpus": 1} if use_gpu else {"num_cpus": 1})


def run_ray(session: Session, cases: Sequence[Case], *, address: str, workers: int | None = None,
            kind: str = "auto", overwrite: bool = False,
            on_done: Callable[[Outcome], None] = lambda outcome: None) -> list[Outcome]:
    """Translate ``cases`` on Ray with ``session``'s bundle, target and settings (the driver's
    session is only checked, never activated). Returns the outcomes in case order."""
    ray = import_ray()
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not cases:
        return []
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False, configure_logging=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise BackendError(f"--ray {address}: could not start or join Ray ({' '.join(str(exc).split())}); "
                               "use --ray local, or start a head with 'ray start --head' and pass its address") from None
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        size, resources = _pool(ray, session.settings, workers, len(cases))
        settings = session.settings
        if settings.threads is None and "num_gpus" not in resources:
            settings = dataclasses.replace(settings, threads=resources["num_cpus"])
        rows = [{"index": c.index, "source": str(c.source.resolve()), "output": str(c.output.resolve()),
                 "extra": json.dumps(c.extra)} for c in cases]
        by_index = {case.index: case for case in cases}
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            CaseWorker, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=size),
            fn_constructor_kwargs={"to": session.translator.target.name, "bundle": str(session.bundle.root.resolve()),
                                   "settings": settings, "kind": kind, "overwrite": overwrite},
            **resources)
        outcomes = {}
        try:
            for row in dataset.iter_rows():
                case = by_index[int(row["index"])]
                notes = [n for n in str(row["notes"]).split("\n") if n]
                outcome = Outcome(case, str(row["status"]), str(row["error"]), float(row["seconds"]), notes)
                outcomes[case.index] = outcome
                on_done(outcome)
        except ray.exceptions.RayError as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise BackendError(f"the Ray workers failed ({first.strip()}); check that every node has galip, "
                               "the bundle, the inputs and the output folder at the same paths") from None
        return [outcomes[case.index] for case in cases if case.index in outcomes]
    finally:
        if started_here:
            ray.shutdown()
