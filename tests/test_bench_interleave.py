"""The bench's interleaved timing on fake backends of known duration (bench/interleave.py)."""
from __future__ import annotations

import os

import pytest

from galip.bench.interleave import Spec, Worker, interleave, median_ratio, start_workers

FAKE = "galip.bench.workers:fake"


def test_rounds_rotate_and_ratios_match_known_times():
    specs = {"ref": Spec(FAKE, {"ms": 40.0}), "half": Spec(FAKE, {"ms": 20.0}), "quarter": Spec(FAKE, {"ms": 10.0})}
    workers = start_workers(specs, threads=1)
    try:
        series = interleave(workers, "k", {"x": None}, rounds=6, warmup=1)
    finally:
        for worker in workers.values():
            worker.stop()
    assert all(s.error is None and len(s.seconds) == 6 and s.warmup == 1 for s in series.values())
    # every backend ran first, second and third in some round (the order rotates by one)
    assert all(sorted(set(s.slots)) == [0, 1, 2] for s in series.values())
    assert series["ref"].slots[:3] == [0, 2, 1]
    # busy-waits of known wall time: medians and per-round ratios come out as set
    assert series["ref"].median_ms == pytest.approx(40.0, rel=0.25)
    assert median_ratio(series["ref"].seconds, series["half"].seconds) == pytest.approx(2.0, rel=0.15)
    assert median_ratio(series["ref"].seconds, series["quarter"].seconds) == pytest.approx(4.0, rel=0.15)
    assert len(series["ref"].load) == 6 and series["half"].mean_load is not None


def test_threads_are_pinned_in_the_worker_and_failures_stay_local(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    specs = {"ok": Spec(FAKE, {"ms": 1.0, "busy": False}),
             "broken": Spec("galip.bench.workers:failing", {"after": 2}),
             "missing": Spec("galip.bench.workers:no_such_factory")}
    workers = start_workers(specs, threads=3)
    try:
        series = interleave(workers, 0, {}, rounds=4, warmup=1, min_round_s=0.01)
    finally:
        for worker in workers.values():
            worker.stop()
    assert len(series["ok"].seconds) == 4 and series["ok"].calls >= 4 * 5   # repeated to fill 10 ms
    assert series["broken"].error == "RuntimeError: failed on call 3" and not series["broken"].seconds
    assert series["missing"].error.startswith("AttributeError") and not series["missing"].seconds
    assert os.environ["OMP_NUM_THREADS"] == "7"                              # the parent's is restored


def test_worker_environment_has_the_pinned_thread_count():
    with Worker("env", Spec("galip.bench.workers:environment"), threads=2) as worker:
        assert worker.wait_ready()
        worker.send_feed(0, {})
        _, _, out = worker.time(0, keep=True)
    assert out == {key: "2" for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                        "GALIP_NUM_THREADS")}


def test_median_ratio_pairs_rounds():
    assert median_ratio([1.0, 2.0, 9.0], [0.5, 1.0, 1.0]) == 2.0
    assert median_ratio([1.0, 2.0], [1.0]) == 1.0       # a backend that stopped early: its rounds only
    assert median_ratio([], []) is None
