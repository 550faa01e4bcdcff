"""Which CUDA driver can run an engine's embedded PTX: the PTX ISA ↔ CUDA table and its check.

The LMI plugin embeds nvcc's PTX in the engine, and the driver JIT-compiles it when the
engine is built and again wherever it is deserialised. A driver compiles PTX only up to the
ISA of its own CUDA version (``CUDA_ERROR_UNSUPPORTED_PTX_VERSION`` otherwise): nvcc 13.0
writes ``.version 9.0``, which needs a CUDA 13.0 driver (r580). ``galip-export`` records the
ISA and the driver it needs in each engine's manifest entry (``ptx_isa``, ``min_driver_cuda``)
and refuses to build on a driver that is too old; backend selection refuses such an engine
with one line. Versions are ints as ``cuDriverGetVersion`` reports them (12.8 is 12080).
Table: NVIDIA's PTX ISA release history (PTX ISA documentation, "Release Notes") and the CUDA
toolkit release notes' minimum Linux driver per toolkit.
"""
from __future__ import annotations

import re

# PTX ISA "major.minor" → the first CUDA release whose driver loads it (8.6 came with 12.7).
PTX_ISA_CUDA = {
    "7.0": (11, 0), "7.1": (11, 1), "7.2": (11, 2), "7.3": (11, 3), "7.4": (11, 4),
    "7.5": (11, 5), "7.6": (11, 6), "7.7": (11, 7), "7.8": (11, 8),
    "8.0": (12, 0), "8.1": (12, 1), "8.2": (12, 2), "8.3": (12, 3), "8.4": (12, 4),
    "8.5": (12, 5), "8.6": (12, 7), "8.7": (12, 8), "8.8": (12, 9),
    "9.0": (13, 0), "9.1": (13, 1),
}
# CUDA release → the Linux driver branch it needs (for messages: "r580+").
DRIVER_BRANCH = {
    (11, 0): 450, (11, 1): 455, (11, 2): 460, (11, 3): 465, (11, 4): 470, (11, 5): 495,
    (11, 6): 510, (11, 7): 515, (11, 8): 520, (12, 0): 525, (12, 1): 530, (12, 2): 535,
    (12, 3): 545, (12, 4): 550, (12, 5): 555, (12, 6): 560, (12, 7): 565, (12, 8): 570,
    (12, 9): 575, (13, 0): 580, (13, 1): 590,
}
_VERSION = re.compile(r"^\s*\.version\s+(\d+)\.(\d+)\s*$", re.MULTILINE)


def ptx_isa(ptx_text: str) -> str:
    """The ``.version`` directive of PTX text (``"9.0"``); ValueError when there is none."""
    match = _VERSION.search(ptx_text)
    if match is None:
        raise ValueError("no .version directive in the PTX text")
    return f"{int(match.group(1))}.{int(match.group(2))}"


def min_driver_cuda(isa: str) -> int:
    """The oldest driver CUDA version (``cuDriverGetVersion`` form) that loads PTX ISA ``isa``.

    ISAs newer than the table follow the 9.x ↔ 13.x pattern; ValueError for others.
    """
    found = PTX_ISA_CUDA.get(isa)
    if found is None:
        major, minor = (int(p) for p in isa.split("."))
        if major < 9:
            raise ValueError(f"unknown PTX ISA {isa} (galip knows {', '.join(PTX_ISA_CUDA)})")
        found = (major + 4, minor)
    return found[0] * 1000 + found[1] * 10


def cuda_text(version: int) -> str:
    """12080 → ``"12.8"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_text(version: int) -> str:
    """12080 → ``"CUDA 12.8 (r570+)"``: the release and the Linux driver branch it needs."""
    branch = DRIVER_BRANCH.get((version // 1000, version % 1000 // 10))
    return f"CUDA {cuda_text(version)}" + (f" (r{branch}+)" if branch else "")


def driver_problem(isa: str, needed: int, driver: int | None) -> str | None:
    """One line when a driver of CUDA version ``driver`` cannot JIT PTX ISA ``isa``, else None."""
    if driver is not None and driver >= needed:
        return None
    have = f"this driver supports CUDA {cuda_text(driver)}" if driver else "no CUDA driver found"
    return f"driver too old: the LMI kernel is PTX ISA {isa}, which needs a {driver_text(needed)} driver; {have}"
