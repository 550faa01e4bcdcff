"""Early warnings for the two ways a multi-domain cycle GAN fails on these phantoms.

1. **Identity lost**: G(x, source domain) should return x; a generator that flips
   brightness for every target (output ≈ 1 − input keeps the cycle loss low, since
   flipping twice returns the input) shows a correlation near −1 here.
2. **Target-blind**: the outputs for different targets of one source should differ as
   much as the true contrasts do (T2 vs PD of one subject correlate at ~0.2–0.5 in the
   brain); a generator that ignores its condition gives correlations near 1.

Both are measured on a fixed probe batch with the EMA generator, inside the foreground,
every few steps, and reported in the progress line and the run's log.
"""
from __future__ import annotations

import numpy as np
import torch

IDENTITY_FLOOR = 0.9      # corr(G(x, source), x) below this: identity is being lost
SEPARATION_CEILING = 0.9  # mean corr between outputs for different targets above this: target-blind


def probe_batch(slices_by_domain: dict[str, np.ndarray], n: int = 4) -> dict[str, torch.Tensor]:
    """The ``n`` slices with the most foreground per domain, ``(n, 1, S, S)``: fixed probes."""
    probes = {}
    for name, stack in slices_by_domain.items():
        stack = stack[:, 0] if stack.ndim == 4 else stack     # channel 0: the slice (then pseudo-targets)
        foreground = (stack > 0.05).mean(axis=(1, 2))
        rows = np.sort(np.argsort(foreground)[-n:])
        probes[name] = torch.from_numpy(np.ascontiguousarray(stack[rows][:, None]))
    return probes


def _corr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    a, b = a[mask].double(), b[mask].double()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


@torch.no_grad()
def condition_check(generator: torch.nn.Module, probes: dict[str, torch.Tensor],
                    domain_names: list[str]) -> dict[str, float]:
    """``idt_r``: worst corr(G(x, d), x) over source domains d; ``sep_r``: mean corr
    between G(x, t) and G(x, t') over sources and target pairs t ≠ t'."""
    identity, separation = [], []
    was_training = generator.training
    generator.eval()
    for d, name in enumerate(domain_names):
        x = probes[name]
        mask = x > 0.05
        targets = torch.arange(len(domain_names)).repeat_interleave(len(x))
        outs = generator(x.repeat(len(domain_names), 1, 1, 1), targets).chunk(len(domain_names))
        identity.append(_corr(outs[d], x, mask))
        separation += [_corr(outs[t], outs[u], mask)
                       for t in range(len(outs)) for u in range(t + 1, len(outs))]
    generator.train(was_training)
    return {"idt_r": min(identity), "sep_r": float(np.mean(separation))}


def warning(stats: dict[str, float]) -> str:
    """A short flag for the progress line, empty while training looks healthy."""
    flags = []
    if stats["idt_r"] < IDENTITY_FLOOR:
        flags.append("IDENTITY LOST")
    if stats["sep_r"] > SEPARATION_CEILING:
        flags.append("TARGET-BLIND")
    return " ".join(flags)
