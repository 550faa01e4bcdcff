"""Timing with warm-up and repeats, and the one row type every case reports.

``measure(fn, warmup=1, repeats=5)`` calls ``fn`` ``warmup`` times untimed, then
``repeats`` times timed with ``time.perf_counter`` (``sync`` runs before each clock read,
e.g. ``torch.cuda.synchronize``), and returns a :class:`Timing` with the median and the
90th percentile. ``budget_s`` stops the repeats early once that much time is spent (at
least one timed call always runs), so a slow backend costs a bounded time in ``--quick``;
the number of calls actually timed is what :class:`Row` records.

Backends compared with each other are timed in interleaved rounds in worker processes
(:mod:`galip.bench.interleave`); :meth:`Row.from_series` keeps every round, so speed-ups are
medians of per-round ratios (:func:`speedup`).

A :class:`Row` is one line of ``results.json`` / ``results.md``: what ran (case, backend,
precision, device, batch, size), how long (median/p90 over ``repeats``), how close to the
eager PyTorch output (max-abs, PSNR), and its status: ``ok``, ``estimated`` (derived, never
measured; the note says from what), ``skipped`` or ``failed`` (the reason says why).
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Timing", "Row", "measure", "agreement", "first_line", "speedup"]


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call (warm-up calls excluded)."""

    seconds: tuple[float, ...]
    warmup: int = 0

    @property
    def repeats(self) -> int:
        return len(self.seconds)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.seconds)) * 1e3

    @property
    def p90_ms(self) -> float:
        """90th percentile (linear interpolation; equals the max for fewer than 10 calls)."""
        return float(np.percentile(self.seconds, 90)) * 1e3


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, budget_s: float | None = None,
            sync: Callable[[], None] | None = None) -> tuple[Timing, Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    Returns the :class:`Timing` and the value of the last call (to check its output).
    ``budget_s``: stop repeating once the timed calls have taken that long (>= 1 call).
    """
    out = None
    for _ in range(warmup):
        out = fn()
    if sync is not None:
        sync()
    seconds: list[float] = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        if sync is not None:
            sync()
        seconds.append(time.perf_counter() - start)
        if budget_s is not None and sum(seconds) >= budget_s:
            break
    return Timing(tuple(seconds), warmup), out


@dataclass
class Row:
    """One measured (or skipped, failed, estimated) configuration; see the module docstring.

    ``size`` is ``"HxW"`` of one slice, or the volume's shape for whole-volume cases.
    ``speedup`` is filled by the report against the reference row of the same case, batch
    and size (eager PyTorch fp32 on the same device; see :func:`galip.bench.report.add_speedups`).
    """

    case: str
    backend: str
    precision: str = "fp32"
    device: str = "cpu"
    batch: int | None = None
    size: str = ""
    median_ms: float | None = None
    p90_ms: float | None = None
    repeats: int = 0
    warmup: int = 0
    max_abs: float | None = None
    psnr: float | None = None
    status: str = "ok"
    reason: str = ""
    note: str = ""
    load: float | None = None        # mean 1-minute load average over the row's timed rounds
    reference: bool = False          # the row speed-ups of its group are measured against
    speedup: float | None = None
    speedup_vs: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def timed(cls, timing: Timing, **fields) -> "Row":
        return cls(median_ms=timing.median_ms, p90_ms=timing.p90_ms, repeats=timing.repeats,
                   warmup=timing.warmup, **fields)

    @classmethod
    def from_series(cls, series, **fields) -> "Row":
        """A row from interleaved rounds (:class:`galip.bench.interleave.Series`): median and p90
        over rounds, the rounds' mean load, every round's ms in ``extra["round_ms"]``."""
        row = cls(median_ms=series.median_ms, p90_ms=series.p90_ms, repeats=len(series.seconds),
                  warmup=series.warmup, load=series.mean_load, **fields)
        row.extra["round_ms"] = [round(s * 1e3, 4) for s in series.seconds]
        row.extra["calls"] = series.calls
        return row

    @classmethod
    def skipped(cls, reason: str, **fields) -> "Row":
        return cls(status="skipped", reason=reason, **fields)

    @classmethod
    def failed(cls, error: BaseException | str, **fields) -> "Row":
        reason = error if isinstance(error, str) else first_line(error)
        return cls(status="failed", reason=reason, **fields)

    @property
    def per_item_ms(self) -> float | None:
        if self.median_ms is None or not self.batch:
            return None
        return self.median_ms / self.batch

    def with_agreement(self, actual, expected, data_range: float | None = None) -> "Row":
        self.max_abs, self.psnr = agreement(actual, expected, data_range)
        return self

    def to_json(self) -> dict:
        data = asdict(self)
        data["per_item_ms"] = self.per_item_ms
        data["throughput_per_s"] = (1e3 / self.per_item_ms) if self.per_item_ms else None
        return {key: _json_number(value) for key, value in data.items()}


def speedup(reference: "Row", row: "Row") -> float | None:
    """How many times faster ``row`` ran than ``reference``: the median over rounds of the
    per-round ratio when both were timed in the same interleaved rounds, else the ratio of
    medians (rows measured apart, e.g. torch.compile's child or estimates)."""
    from .interleave import median_ratio
    a, b = reference.extra.get("round_ms"), row.extra.get("round_ms")
    if a and b:
        return median_ratio(a, b)
    if reference.median_ms and row.median_ms:
        return reference.median_ms / row.median_ms
    return None


def agreement(actual, expected, data_range: float | None = None) -> tuple[float, float]:
    """(max-abs, PSNR dB) of ``actual`` against the reference ``expected`` (equal shapes).

    PSNR uses ``data_range`` (default: the reference's max − min), +inf when equal;
    :func:`galip.export.parity.compare` does the arithmetic.
    """
    from galip.export.parity import compare
    result = compare(actual, expected, data_range=data_range)
    if result.failures:
        raise ValueError(f"cannot compare outputs: {'; '.join(result.failures)}")
    return result.max_abs, result.psnr


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (the reason a skipped or failed row records)."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if not message:
        frames = traceback.extract_tb(error.__traceback__)
        message = f"at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}: {message}"[:300]


def _json_number(value):
    """inf/NaN are not JSON numbers: +inf becomes the string "inf" (identical outputs)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value
