"""Interleaved timing: every backend in its own worker process, rounds in rotated order.

On a shared machine the load changes over seconds. Timing all repeats of backend A and then
all of B puts that change into the A/B ratio. Here each *round* times every backend once, in
an order rotated by one per round, so the backends of a round ran seconds apart under the same
load; a speed-up is then the median over rounds of the per-round ratio
(:func:`median_ratio`), and each round records the 1-minute load average.

A worker is a spawned interpreter (no library state shared with the parent or other workers)
whose thread count is pinned before any library loads: ``OMP/MKL/OPENBLAS/GALIP_NUM_THREADS``
in its environment and ``torch.set_num_threads`` when the factory imported torch. It builds its
callable from a :class:`Spec` — an importable ``"module:function"`` plus picklable keyword
arguments — which returns ``fn(feed) -> outputs``. A backend too fast for one call to be a
stable sample repeats within a round until ``min_round_s`` is spent (the round's value is the
mean per call).
"""
from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Spec", "Worker", "Series", "interleave", "median_ratio", "start_workers", "THREAD_ENV"]

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GALIP_NUM_THREADS")
CALL_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Spec:
    """What a worker runs: ``target`` = ``"module:function"``, called with ``kwargs`` in the
    worker, returns the callable to time (``fn(feed) -> outputs``)."""

    target: str
    kwargs: dict = field(default_factory=dict)


def _build(target: str, kwargs: dict) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _serve(conn, target: str, kwargs: dict, threads: int) -> None:
    """Worker main loop: build, then answer ``feed``/``time``/``stop`` messages."""
    try:
        started = time.perf_counter()
        fn = _build(target, kwargs)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        conn.send(("ready", time.perf_counter() - started))
    except BaseException as error:     # noqa: BLE001 - reported to the parent as one line
        from .harness import first_line
        conn.send(("error", first_line(error)))
        return
    feeds: dict = {}
    while True:
        message = conn.recv()
        if message[0] == "stop":
            break
        if message[0] == "feed":
            feeds[message[1]] = message[2]
            conn.send(("ok",))
            continue
        _, key, min_s, keep = message
        try:
            calls, out, begin = 0, None, time.perf_counter()
            while True:
                out = fn(feeds[key])
                calls += 1
                spent = time.perf_counter() - begin
                if spent >= min_s:
                    break
            conn.send(("time", spent / calls, calls, out if keep else None))
        except BaseException as error:     # noqa: BLE001
            from .harness import first_line
            conn.send(("error", first_line(error)))
    close = getattr(fn, "close", None)
    if callable(close):
        close()


class Worker:
    """One backend in its own process (see the module docstring); a context manager."""

    def __init__(self, name: str, spec: Spec, threads: int = 1):
        self.name, self.spec, self.threads = name, spec, int(threads)
        self.error: str | None = None
        self.setup_s: float | None = None
        self._process = None
        self._conn = None

    def start(self) -> "Worker":
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        saved = {key: os.environ.get(key) for key in THREAD_ENV}
        os.environ.update({key: str(self.threads) for key in THREAD_ENV})   # inherited at spawn
        try:
            self._process = ctx.Process(target=_serve, args=(child, self.spec.target, self.spec.kwargs,
                                                             self.threads), daemon=True)
            self._process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        child.close()
        self._conn = parent
        return self

    def _recv(self, timeout: float = CALL_TIMEOUT_S):
        if not self._conn.poll(timeout):
            raise TimeoutError(f"worker {self.name} did not answer within {timeout:.0f} s")
        try:
            return self._conn.recv()
        except EOFError:
            raise RuntimeError(f"worker {self.name} exited (exit code {self._process.exitcode})") from None

    def wait_ready(self) -> bool:
        """True once built; False (``error`` says why) when the factory failed."""
        if self.error is not None or self.setup_s is not None:
            return self.error is None
        try:
            answer = self._recv()
        except (TimeoutError, RuntimeError) as error:
            answer = ("error", str(error))
        if answer[0] == "ready":
            self.setup_s = float(answer[1])
        else:
            self.error = answer[1]
            self.stop()
        return self.error is None

    def send_feed(self, key, feed: dict) -> None:
        self._conn.send(("feed", key, feed))
        self._recv()

    def time(self, key, min_s: float = 0.0, keep: bool = False) -> tuple[float, int, Any]:
        """(seconds per call, calls, output or None) of one sample; RuntimeError on failure."""
        self._conn.send(("time", key, float(min_s), bool(keep)))
        answer = self._recv()
        if answer[0] == "error":
            raise RuntimeError(answer[1])
        return answer[1], answer[2], answer[3]

    def stop(self) -> None:
        if self._process is None:
            return
        try:
            if self._process.is_alive():
                self._conn.send(("stop",))
                self._process.join(10)
        except (OSError, BrokenPipeError):
            pass
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        self._process = None

    def __enter__(self) -> "Worker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_workers(named: dict[str, Spec], threads: int | dict[str, int] = 1) -> dict[str, Worker]:
    """Start every worker at once (they build in parallel), then wait for each to be ready."""
    workers = {name: Worker(name, spec, threads[name] if isinstance(threads, dict) else threads).start()
               for name, spec in named.items()}
    for worker in workers.values():
        worker.wait_ready()
    return workers


@dataclass
class Series:
    """One backend on one feed: seconds per call in each round, the load in each round."""

    name: str
    seconds: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)     # its position in each round's order
    calls: int = 0
    warmup: int = 0
    output: Any = None
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return float(np.median(self.seconds)) * 1e3 if self.seconds else None

    @property
    def p90_ms(self) -> float | None:
        return float(np.percentile(self.seconds, 90)) * 1e3 if self.seconds else None

    @property
    def mean_load(self) -> float | None:
        return round(float(np.mean(self.load)), 2) if self.load else None


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def interleave(workers: dict[str, Worker], key, feed: dict | None, *, rounds: int, warmup: int = 1,
               budget_s: float | None = None, min_round_s: float = 0.0, keep_output: bool = True,
               log: Callable[[str], None] | None = None) -> dict[str, Series]:
    """Time every ready worker on ``feed`` in ``rounds`` interleaved rounds.

    ``warmup`` untimed calls per worker first (the last one's output kept); round ``r`` runs
    the workers in their order rotated by ``r``. ``budget_s``: stop after the round in which
    that many seconds were spent (at least one round). A worker that fails is dropped with
    its error; the others go on.
    """
    series = {name: Series(name) for name in workers}
    live = []
    for name, worker in workers.items():
        if not worker.wait_ready():
            series[name].error = worker.error
            continue
        try:
            if feed is not None:
                worker.send_feed(key, feed)
            for i in range(warmup):
                _, _, out = worker.time(key, 0.0, keep_output and i == warmup - 1)
                series[name].output = out
            series[name].warmup = warmup
            live.append(name)
        except (RuntimeError, TimeoutError) as error:
            series[name].error = str(error)
    started = time.perf_counter()
    for r in range(max(1, rounds)):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for slot, name in enumerate(order):
            if series[name].error:
                continue
            try:
                keep = keep_output and series[name].output is None
                seconds, calls, out = workers[name].time(key, min_round_s, keep)
            except (RuntimeError, TimeoutError) as error:
                series[name].error = str(error)
                continue
            if keep:
                series[name].output = out
            series[name].seconds.append(seconds)
            series[name].calls += calls
            series[name].load.append(_load1())
            series[name].slots.append(slot)
        if log is not None:
            log(f"  round {r + 1}: " + ", ".join(f"{n} {series[n].seconds[-1] * 1e3:.0f} ms"
                                                  for n in order if series[n].seconds))
        if budget_s is not None and time.perf_counter() - started >= budget_s:
            break
    return series


def median_ratio(numerator: list[float], denominator: list[float]) -> float | None:
    """Median over rounds of numerator[r] / denominator[r] (the speed-up of the denominator's
    backend over the numerator's); rounds missing on either side are left out."""
    pairs = [a / b for a, b in zip(numerator, denominator) if b > 0]
    return float(np.median(pairs)) if pairs else None
