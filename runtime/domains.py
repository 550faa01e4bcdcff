"""The target domains galip knows: name, BiomedCLIP caption, class id, intensity kind.

One table used by data generation, training, export (baked into the manifest) and the
runtime, so the caption a model was trained with is by construction the one it is run
with (the reference code's train/test captions differ; see docs/design.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from .errors import ConfigError

Kind = Literal["mri", "ct"]


@dataclass(frozen=True)
class Domain:
    name: str        # short name used on the command line: T1, T2, PD, CT
    caption: str     # BiomedCLIP caption (I2I-Galip paper)
    class_id: int    # row of the generator's class embedding
    kind: Kind       # intensity normalisation family (runtime/intensity.py)
    suffix: str      # BIDS-like file suffix written by galip-data: T1w, T2w, PDw, ct

    def to_dict(self) -> dict:
        return asdict(self)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("T1", "this MRI is T1-weighted", 0, "mri", "T1w"),
        Domain("T2", "this MRI is T2-weighted", 1, "mri", "T2w"),
        Domain("PD", "this MRI is PD-weighted", 2, "mri", "PDw"),
        Domain("CT", "this is a pelvic CT image", 3, "ct", "ct"),
    )
}

_ALIASES = {d.suffix.lower(): d.name for d in DOMAINS.values()} | {
    "t1-weighted": "T1", "t2-weighted": "T2", "pd-weighted": "PD",
}


def get_domain(name: str, known: dict[str, Domain] | None = None) -> Domain:
    """Look a domain up by name, file suffix or long name, case-insensitively (``t2``, ``T2w``,
    ``t2-weighted``): the one resolver of ``--to`` and every other domain argument.

    ``known`` restricts the choice (for example to a bundle's domains, whose own suffixes
    count); the error lists what is available.
    """
    table = DOMAINS if known is None else known
    key = name.strip().lower()
    by_lower = {d.suffix.lower(): k for k, d in table.items()} | {k.lower(): k for k in table}
    canonical = by_lower.get(key) or _ALIASES.get(key)
    if canonical is None or canonical not in table:
        raise ConfigError(
            f"unknown domain {name!r}; expected one of {', '.join(sorted(table))}"
        )
    return table[canonical]


def parse_domains(spec: str, known: dict[str, Domain] | None = None) -> list[Domain]:
    """Parse a comma-separated list such as ``T1,T2,PD`` into domains (no duplicates)."""
    names = [part for part in (p.strip() for p in spec.split(",")) if part]
    if not names:
        raise ConfigError("no domains given; expected a comma-separated list such as T1,T2,PD")
    domains = [get_domain(n, known) for n in names]
    if len({d.name for d in domains}) != len(domains):
        raise ConfigError(f"domain list {spec!r} names a domain twice")
    return domains
