"""What GPU and TensorRT this machine has, asked lazily and without nvidia-smi.

Every function returns ``None`` where the answer is unavailable (no cuda-python, no
driver, no GPU, no TensorRT) instead of raising, so callers can print why they fell back.
Nothing here is imported at module load: ``import galip.runtime.device_info`` is free.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType


def import_tensorrt() -> ModuleType | None:
    """The ``tensorrt`` module, else the lean runtime ``tensorrt_lean``, else None."""
    for name in ("tensorrt", "tensorrt_lean"):
        try:
            return importlib.import_module(name)
        except Exception:   # ImportError, or a broken install raising OSError on its .so
            continue
    return None


def import_cudart() -> ModuleType | None:
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (>= 12.6), else ``cuda.cudart``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return None


def tensorrt_version() -> str | None:
    """Installed TensorRT version (``"10.13.0.35"``), or None when TensorRT does not import."""
    trt = import_tensorrt()
    version = getattr(trt, "__version__", None) if trt is not None else None
    return str(version) if version else None


def _ok(cudart: ModuleType, result) -> bool:
    error = result[0] if isinstance(result, tuple) else result
    return error == cudart.cudaError_t.cudaSuccess


@functools.lru_cache(maxsize=None)
def gpu_compute_capability(device: int = 0) -> str | None:
    """Compute capability of CUDA device ``device`` as ``"major.minor"`` (``"9.0"``), or None.

    Asks the CUDA runtime through cuda-python (``cudaDeviceGetAttribute``), which also
    initialises the driver, so the answer is cached per process
    (``gpu_compute_capability.cache_clear()`` to ask again).
    """
    cudart = import_cudart()
    if cudart is None:
        return None
    try:
        count = cudart.cudaGetDeviceCount()
        if not _ok(cudart, count) or count[1] <= device:
            return None
        attr = cudart.cudaDeviceAttr
        major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device)
        minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device)
        if not (_ok(cudart, major) and _ok(cudart, minor)):
            return None
        return f"{int(major[1])}.{int(minor[1])}"
    except Exception:   # no driver, driver too old, ...: "unavailable", never a crash
        return None


def sm(capability: str | None) -> str:
    """``"9.0"`` -> ``"sm_90"`` for messages; ``None`` -> ``"no GPU"``."""
    if not capability:
        return "no GPU"
    return "sm_" + capability.replace(".", "")


def describe() -> str:
    """One line for ``--info`` style output: GPU compute capability and TensorRT version."""
    cc = gpu_compute_capability()
    trt = tensorrt_version()
    gpu = f"GPU {sm(cc)}" if cc else ("no GPU found" if import_cudart() else "no GPU query (cuda-python not installed)")
    return f"{gpu}, TensorRT {trt or 'not installed'}"
