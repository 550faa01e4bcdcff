"""What GPU, driver and TensorRT this machine has, asked lazily and without nvidia-smi.

The value functions return ``None`` where the answer is unavailable (no cuda-python, no
driver, no GPU, no TensorRT) instead of raising; :func:`gpu_problem` and
:func:`tensorrt_problem` then say why in one line ("driver too old: …", "TensorRT libraries
do not load: …"), so callers print the cause, never a bare "not installed" for a broken
install. Nothing here is imported at module load: ``import galip.runtime.device_info`` is free.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

TENSORRT_MODULES = ("tensorrt", "tensorrt_lean")
CUDART_MODULES = ("cuda.bindings.runtime", "cuda.cudart")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _import_first(names: tuple[str, ...]) -> tuple[ModuleType | None, str | None]:
    """(the first module of ``names`` that imports, None) or (None, why none did).

    Why: ``"not installed"`` when none is there at all, else the first load error (an
    installed package whose shared libraries do not load raises ImportError or OSError).
    """
    broken = None
    for name in names:
        try:
            return importlib.import_module(name), None
        except ModuleNotFoundError as error:
            if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
                continue                      # the package itself is absent
            broken = broken or _first_line(error)
        except Exception as error:            # OSError from a .so, RuntimeError, ...
            broken = broken or _first_line(error)
    return None, broken or "not installed"


def import_tensorrt() -> ModuleType | None:
    """The ``tensorrt`` module, else the lean runtime ``tensorrt_lean``, else None."""
    return _import_first(TENSORRT_MODULES)[0]


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot be used (``"not installed"`` or ``"TensorRT libraries do not load:
    …"``), or None when it imports."""
    module, why = _import_first(TENSORRT_MODULES)
    if module is not None:
        return None
    return why if why == "not installed" else f"TensorRT libraries do not load: {why}"


def tensorrt_is_lean(trt: ModuleType | None = None) -> bool:
    """True when the TensorRT that imports is the lean runtime (``tensorrt_lean``): it
    deserialises only version-compatible engines."""
    trt = trt if trt is not None else import_tensorrt()
    return trt is not None and trt.__name__.split(".")[0] == "tensorrt_lean"


def import_cudart() -> ModuleType | None:
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (>= 12.6), else ``cuda.cudart``."""
    return _import_first(CUDART_MODULES)[0]


def cudart_problem() -> str | None:
    """Why cuda-python's runtime API does not import (one line), or None."""
    module, why = _import_first(CUDART_MODULES)
    if module is not None:
        return None
    return "no cuda-python (not installed)" if why == "not installed" else f"cuda-python does not load: {why}"


def tensorrt_version() -> str | None:
    """Installed TensorRT version (``"10.13.0.35"``), or None when TensorRT does not import."""
    trt = import_tensorrt()
    version = getattr(trt, "__version__", None) if trt is not None else None
    return str(version) if version else None


def _ok(cudart: ModuleType, result) -> bool:
    error = result[0] if isinstance(result, tuple) else result
    return error == cudart.cudaError_t.cudaSuccess


def _value(module: ModuleType, call: str, success: str) -> int | None:
    """``module.call()``'s value when it returns ``(success, value > 0)``, else None."""
    try:
        result = getattr(module, call)()
        if getattr(result[0], "name", None) == success and int(result[1]) > 0:
            return int(result[1])
    except Exception:   # a binding without the call, no libcuda, ...
        pass
    return None


def driver_version() -> int | None:
    """The CUDA version the driver supports, as ``cuDriverGetVersion`` reports it (12.8 is
    12080), or None without cuda-python or a driver. The driver API is asked first: unlike
    the runtime it does not depend on the version cuda-python was built for."""
    driver, _ = _import_first(("cuda.bindings.driver", "cuda.cuda"))
    found = _value(driver, "cuDriverGetVersion", "CUDA_SUCCESS") if driver is not None else None
    cudart = import_cudart()
    if found is None and cudart is not None:
        found = _value(cudart, "cudaDriverGetVersion", "cudaSuccess")
    return found


def runtime_version() -> int | None:
    """The CUDA version cuda-python's runtime was built for (13000), or None."""
    cudart = import_cudart()
    return None if cudart is None else _value(cudart, "cudaRuntimeGetVersion", "cudaSuccess")


@functools.lru_cache(maxsize=None)
def gpu_compute_capability(device: int = 0) -> str | None:
    """Compute capability of CUDA device ``device`` as ``"major.minor"`` (``"9.0"``), or None.

    Asks the CUDA runtime through cuda-python (``cudaDeviceGetAttribute``), which also
    initialises the driver, so the answer is cached per process
    (``gpu_compute_capability.cache_clear()`` to ask again). :func:`gpu_problem` says why None.
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


def _cuda(version: int | None) -> str:
    return f"{version // 1000}.{version % 1000 // 10}" if version else "?"


def gpu_problem(device: int = 0) -> str:
    """Why :func:`gpu_compute_capability` finds no GPU, in one line.

    ``"driver too old: cuda-python is built for CUDA 13.0, this driver supports CUDA 12.8 …"``
    when the runtime refuses the driver, ``"no CUDA GPU found"`` when there is none, the
    import error when cuda-python does not load.
    """
    why = cudart_problem()
    if why is not None:
        return why
    cudart = import_cudart()
    driver, runtime = driver_version(), runtime_version()
    if driver is None:
        return "no CUDA GPU found (no NVIDIA driver)"
    if runtime is not None and runtime // 1000 > driver // 1000:
        return (f"driver too old: cuda-python is built for CUDA {_cuda(runtime)}, this driver supports "
                f"CUDA {_cuda(driver)}; install galip[gpu-cu{driver // 1000}] or update the driver")
    try:
        count = cudart.cudaGetDeviceCount()
        error = count[0] if isinstance(count, tuple) else count
        name = getattr(error, "name", str(error))
    except Exception as error:   # noqa: BLE001 - a broken binding
        return f"CUDA does not initialise: {_first_line(error)}"
    if name == "cudaErrorInsufficientDriver":
        return (f"driver too old: cuda-python's runtime (CUDA {_cuda(runtime)}) refuses this driver "
                f"(CUDA {_cuda(driver)}); update the driver or install galip[gpu-cu{driver // 1000}]")
    if name not in ("cudaSuccess", "cudaErrorNoDevice") and not _ok(cudart, count):
        return f"CUDA does not initialise: {name}"
    if _ok(cudart, count) and count[1] > device:
        return f"GPU {device} does not report its compute capability"
    return "no CUDA GPU found"


def sm(capability: str | None) -> str:
    """``"9.0"`` -> ``"sm_90"`` for messages; ``None`` -> ``"no GPU"``."""
    if not capability:
        return "no GPU"
    return "sm_" + capability.replace(".", "")


def describe() -> str:
    """One line for ``--info`` style output: GPU, driver and TensorRT."""
    cc = gpu_compute_capability()
    driver = driver_version()
    gpu = f"GPU {sm(cc)}" if cc else gpu_problem()
    if cc and driver:
        gpu += f" (driver CUDA {_cuda(driver)})"
    trt = tensorrt_version()
    if trt:
        return f"{gpu}, TensorRT {trt}" + (" (lean runtime)" if tensorrt_is_lean() else "")
    problem = tensorrt_problem()
    return f"{gpu}, TensorRT {problem}" if problem == "not installed" else f"{gpu}, {problem}"
