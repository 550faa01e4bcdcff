"""Parity checks between two implementations of one model (ONNX vs PyTorch, fp16 vs fp32).

Polygraphy-style: a comparison returns a result object that is truthy when it passes and
prints its errors, so a test reads ``assert result, result`` and a bench prints ``str(result)``::

    >>> result = compare(onnx_out, torch_out, max_abs=1e-4, name="translated")
    >>> bool(result), str(result)
    (True, 'translated: PASS max-abs 3.1e-06 <= 0.0001, mean-abs 4.2e-07, PSNR 121.3 dB ...')

Metrics, over all elements of arrays of equal shape (float64 accumulation):
max-abs = max |a − e|; mean-abs = mean |a − e|; PSNR = 10 log10(R² / mean (a − e)²) dB with
R the data range (``data_range``; default: max(e) − min(e), or 1 for a constant e), +inf when
the arrays are equal. A shape mismatch or a non-finite value fails every check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

__all__ = ["Comparison", "ParityReport", "compare", "compare_outputs", "psnr"]


def psnr(actual: np.ndarray, expected: np.ndarray, data_range: float | None = None) -> float:
    """PSNR in dB of ``actual`` against ``expected`` (see the module docstring for R)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if data_range is None:
        data_range = float(e.max() - e.min()) if e.size else 1.0
        data_range = data_range or 1.0
    mse = float(np.mean((a - e) ** 2)) if e.size else 0.0
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)


@dataclass(frozen=True)
class Comparison:
    """One output compared against its reference; truthy when every requested bound holds.

    ``limits``: the bounds that were checked, as ``{"max_abs": 1e-4, "min_psnr": 45.0, ...}``.
    ``failures``: one short text per violated bound (empty when it passes).
    """

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    psnr: float
    limits: dict = field(default_factory=dict)
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"

        def bound(key: str, op: str) -> str:
            return f" {op} {self.limits[key]:g}" if key in self.limits else ""

        text = (f"{self.name}: {status} max-abs {self.max_abs:.3g}{bound('max_abs', '<=')}, "
                f"mean-abs {self.mean_abs:.3g}{bound('mean_abs', '<=')}, "
                f"PSNR {self.psnr:.1f} dB{bound('min_psnr', '>=')} over {self.shape}")
        if self.failures:
            text += " (" + "; ".join(self.failures) + ")"
        return text


def compare(actual, expected, *, max_abs: float | None = None, mean_abs: float | None = None,
            min_psnr: float | None = None, data_range: float | None = None,
            name: str = "output") -> Comparison:
    """Compare ``actual`` with the reference ``expected`` (arrays or tensors, equal shape).

    Every bound given is checked: max-abs <= ``max_abs``, mean-abs <= ``mean_abs``,
    PSNR >= ``min_psnr`` dB (with ``data_range``). No bound given: only shape and finiteness.
    """
    a = np.asarray(_numpy(actual), np.float64)
    e = np.asarray(_numpy(expected), np.float64)
    limits = {k: v for k, v in (("max_abs", max_abs), ("mean_abs", mean_abs), ("min_psnr", min_psnr))
              if v is not None}
    if a.shape != e.shape:
        return Comparison(name, tuple(e.shape), math.inf, math.inf, -math.inf, limits,
                          (f"shape {tuple(a.shape)} differs from the reference {tuple(e.shape)}",))
    failures = []
    if not np.isfinite(a).all():
        failures.append(f"{int((~np.isfinite(a)).sum())} non-finite values")
    diff = np.abs(a - e)
    worst = float(diff.max()) if diff.size else 0.0
    mean = float(diff.mean()) if diff.size else 0.0
    db = psnr(a, e, data_range)
    if not np.isfinite(worst):
        worst = mean = math.inf
        db = -math.inf
    if max_abs is not None and not worst <= max_abs:
        failures.append(f"max-abs {worst:.3g} > {max_abs:g}")
    if mean_abs is not None and not mean <= mean_abs:
        failures.append(f"mean-abs {mean:.3g} > {mean_abs:g}")
    if min_psnr is not None and not db >= min_psnr:
        failures.append(f"PSNR {db:.1f} dB < {min_psnr:g} dB")
    return Comparison(name, tuple(e.shape), worst, mean, db, limits, tuple(failures))


@dataclass(frozen=True)
class ParityReport:
    """Several outputs compared at once; truthy when all pass, one line per output."""

    comparisons: tuple[Comparison, ...]

    def __bool__(self) -> bool:
        return all(self.comparisons)

    def __iter__(self):
        return iter(self.comparisons)

    def __getitem__(self, name: str) -> Comparison:
        return next(c for c in self.comparisons if c.name == name)

    def __str__(self) -> str:
        return "\n".join(str(c) for c in self.comparisons)


def compare_outputs(actual: Mapping[str, object], expected: Mapping[str, object],
                    **bounds) -> ParityReport:
    """:func:`compare` every output of ``expected`` (by name) with the same bounds.

    An output missing from ``actual`` fails.
    """
    results = []
    for name, reference in expected.items():
        if name not in actual:
            results.append(Comparison(name, tuple(np.shape(_numpy(reference))), math.inf, math.inf,
                                      -math.inf, {}, (f"missing from the outputs ({', '.join(actual)})",)))
        else:
            results.append(compare(actual[name], reference, name=name, **bounds))
    return ParityReport(tuple(results))


def _numpy(value):
    """A tensor (any device, with grad) or array-like → ndarray, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return value
