"""Resource limits checked before anything big is allocated.

One place for every bound that protects ``galip-run`` from hostile or broken inputs: the
memory budget (default: what the machine, or its cgroup, has available), the voxel sizes
galip accepts, the thread count. A header is judged by what it *would* cost, before a
byte of voxel data is read, so a 2 KB file claiming 32767³ voxels is refused in
microseconds instead of ending in a ``MemoryError`` a minute later.
"""
from __future__ import annotations

import os
import re

from .errors import ConfigError, InputError

BUDGET_ENV = "GALIP_MEMORY_BUDGET"
#: Bytes of whole-volume arrays per voxel over a run: the float32 input, float64 scaling
#: scratch while reading, the canonical copy, the raw and output slice stacks, the output
#: volume (galip-run peaks near 30 B/voxel; rounded up).
BYTES_PER_VOXEL = 32
#: Bytes per model-space pixel of one slice in flight: resampled, normalised, padded,
#: model input and output, restored (about 8 float32 copies; diffusion adds state and noise).
BYTES_PER_MODEL_PIXEL = 48
#: Voxel sizes (mm) galip accepts: 10 µm (microscopy-like) to 5 cm (coarser is not an image
#: a translation model was trained on; usually a file in µm or m labelled mm).
VOXEL_MM = (0.01, 50.0)
#: onnxruntime takes an int32 thread count; more threads than this is always a typo.
MAX_THREADS = 1024
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5g"``, ``"1000000"`` → bytes; ConfigError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise ConfigError(f"{BUDGET_ENV} must be a size such as 4G or 512M, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1 << 20:
        raise ConfigError(f"{BUDGET_ENV} must be at least 1M, got {text!r}")
    return value


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_left() -> int | None:
    """Bytes the cgroup v2 memory limit still allows, when one is set."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as handle:
            return max(0, int(limit) - int(handle.read().strip()))
    except (OSError, ValueError):
        return None


def memory_budget() -> int:
    """Bytes one run may allocate: ``$GALIP_MEMORY_BUDGET`` if set, else 80 % of the memory
    available now (the smaller of /proc/meminfo and the cgroup limit), at least 256 MiB."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if text:
        return parse_bytes(text)
    found = [v for v in (_meminfo_available(), _cgroup_left()) if v is not None]
    available = min(found) if found else 8 << 30
    return max(256 << 20, int(available * 0.8))


def human(n: float) -> str:
    """Bytes as ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB"):
        if abs(n) < 1024 or unit == "ZiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} ZiB"


def over_budget(what: str, needed: int, budget: int | None = None) -> str | None:
    """``"<what> that needs about …, more than the memory budget …"`` when ``needed`` bytes do
    not fit the budget, None when they do."""
    budget = memory_budget() if budget is None else budget
    if needed <= budget:
        return None
    return (f"{what} that needs about {human(needed)}, more than the memory budget of {human(budget)} "
            f"(set {BUDGET_ENV}, e.g. {BUDGET_ENV}=16G, if the machine really has it)")


def affordable_batch(batch: int, model_shape: tuple[int, int], budget: int | None = None) -> int:
    """``batch`` lowered (never below 1) so a batch of model-space slices fits the budget.

    Results do not depend on the batch (diffusion noise is seeded per slice), so lowering
    it only costs speed where ``--batch`` asked for more than the memory holds."""
    budget = memory_budget() if budget is None else budget
    per_slice = max(1, model_shape[0] * model_shape[1] * BYTES_PER_MODEL_PIXEL)
    return max(1, min(batch, budget // per_slice))


def check_voxel_sizes(where: str, sizes_mm, unit_note: str = "") -> None:
    """InputError unless every voxel size lies within ``VOXEL_MM`` (mm)."""
    lo, hi = VOXEL_MM
    for axis, size in enumerate(sizes_mm):
        if not lo <= size <= hi:
            raise InputError(
                f"{where}: expected voxel sizes between {lo:g} and {hi:g} mm, found {size:.4g} mm along voxel "
                f"axis {axis}{unit_note}; if the file is in other units set them in its header "
                "(e.g. nibabel header.set_xyzt_units('micron')), or fix its pixdim/sform")


def check_threads(threads: int | None) -> None:
    """ConfigError for a thread count outside 1 … MAX_THREADS."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}; "
                          "omit it to use all cores")
