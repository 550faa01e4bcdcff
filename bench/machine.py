"""What the numbers were measured on: CPU, cores, load, library versions, GPU if any.

Everything is read without side effects (no CUDA initialisation unless torch already
reports a GPU), and every field degrades to ``None`` where the answer is unavailable.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from pathlib import Path

LIBRARIES = ("galip", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "scipy", "nibabel",
             "scikit-image", "matplotlib", "tensorrt", "tensorrt-lean-cu13", "cuda-python", "cupy")


def cpu_model() -> str | None:
    """The ``model name`` of /proc/cpuinfo (first CPU), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_flags() -> list[str]:
    """The SIMD flags that matter for these kernels (avx2, avx512f, fma, amx...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    flags = set(line.split(":", 1)[-1].split())
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "neon", "asimd")
    return [flag for flag in wanted if flag in flags]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    """Installed distribution versions (None where not installed)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu_info() -> dict | None:
    """Name, memory, compute capability, CUDA and driver of GPU 0 per torch; None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def onnxruntime_providers() -> list[str] | None:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return None
    return list(ort.get_available_providers())


def machine_info(threads: int | None = None) -> dict:
    """Everything above as one JSON-ready dict; ``threads``: what the run used per backend."""
    info = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads_per_backend": threads,
        "load_average_1_5_15": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "onnxruntime_providers": onnxruntime_providers(),
        "gpu": gpu_info(),
        "env": {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GALIP_NUM_THREADS")
                if os.environ.get(key) is not None},
    }
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except ImportError:
        pass
    return info


def describe(info: dict) -> str:
    """One line for the report header."""
    gpu = info.get("gpu")
    gpu_text = f"{gpu['name']} (sm {gpu['compute_capability']})" if gpu else "no GPU"
    load = info.get("load_average_1_5_15")
    load_text = f", load average {load[0]:g} at start" if load else ""
    versions = info.get("versions", {})
    libs = ", ".join(f"{name} {versions[name]}" for name in ("torch", "onnxruntime", "onnx", "numpy")
                     if versions.get(name))
    return (f"{info.get('cpu_model') or 'unknown CPU'}, {info.get('usable_cores')} usable cores "
            f"({info.get('threads_per_backend')} thread(s) per backend{load_text}), {gpu_text}; {libs}")
