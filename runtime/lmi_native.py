"""Native (C++/OpenMP) LMI kernel: built on first use, loaded with ctypes; numpy only.

The kernel computes the local-wise mutual information of the MIDiffusion paper (Sec. 4.2,
Eq. 8 and 11) under the galip contract (docs/design.md, "The LMI operator"); the per-pixel math
lives in ``kernels/lmi.cuh`` and is shared with the CUDA kernel of the TensorRT plugin.

Build: ``$CXX`` (else ``g++``) ``-O3 -march=native -fopenmp -shared -fPIC`` compiles
``kernels/lmi_host.cpp`` into ``$GALIP_CACHE`` (else ``~/.cache/galip/kernels/``); the file
name carries a sha256 of the sources, compiler, flags and CPU, so an edited source or another
machine sharing the home folder gets its own build. The library is compiled to a temporary
file and renamed into place, which is safe when several processes build at once.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from .contract.lmi import DEFAULT_LMI as _D, LmiParams
from .errors import BackendError, ConfigError

__all__ = ["lmi_numpy", "native_available", "check_lmi_args", "support_radius", "needs_float64",
           "native_unavailable_reason", "library_path", "cache_dir", "TIE_TOL"]

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("lmi.cuh", "lmi_host.cpp")
# -fno-trapping-math lets g++ if-convert and vectorise the entropy loops; no -ffast-math (the
# kernel relies on IEEE NaN/ordering semantics).
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
         "-fno-trapping-math", "-fno-math-errno")

# galip_lmi_host's algorithm codes, in order ("rows" has its own entry point).
ALGORITHMS = ("auto", "planes", "rows")
# Two MI values closer than this are a tie; the first offset in row-major order wins
# (GALIP_LMI_TIE_TOL in lmi.cuh).
TIE_TOL = 1e-6
# float32 accumulation only when every local entropy is at least this (nats); mirrors
# GALIP_LMI_FLOAT_MIN_ENTROPY in lmi.cuh.
FLOAT_MIN_ENTROPY = 0.25

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_error: BackendError | None = None


def check_lmi_args(x_shape, y_shape, patch, radius, bins, sigma) -> None:
    """Raise ``ConfigError`` (one line) unless x, y are (N, 1, H, W) alike and the params valid.

    The parameters are checked by :class:`~galip.runtime.contract.LmiParams`.
    """
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    if len(x_shape) != 4 or x_shape[1] != 1:
        raise ConfigError(f"LMI expects x of shape (N, 1, H, W), got {x_shape}; "
                          "add the channel axis")
    if x_shape != y_shape:
        raise ConfigError(f"LMI expects x and y of the same shape, got {x_shape} and {y_shape}")
    if x_shape[2] < 1 or x_shape[3] < 1:
        raise ConfigError(f"LMI expects H, W >= 1, got {x_shape}")
    LmiParams(patch, radius, bins, sigma)


@functools.lru_cache(maxsize=64)
def needs_float64(bins: int, sigma: float) -> bool:
    """True when (bins, sigma) bin almost hard, so float32 rounding would dominate NMI.

    Mirrors ``galip_lmi_needs_double`` in lmi.cuh: the entropy of one sample's weights on the
    edge centre (the smallest any local entropy can be) is below 0.25 nats, e.g. B = 8 at
    sigma = 8/255 (~1e-3 nats). Implementations accumulate in float64 then.
    """
    sigma = float(np.float32(sigma))  # the kernel receives sigma as float32
    c = (1.0 / (bins - 1)) ** 2 / (2.0 * sigma**2)
    energies = [c * a * a for a in range(bins)]
    z = sum(math.exp(-e) for e in energies)
    entropy = sum(math.exp(-e) * e for e in energies) / z + math.log(z)
    return entropy < FLOAT_MIN_ENTROPY


def _compiler() -> list[str]:
    """The C++ compiler command: $CXX (may carry flags) or g++; BackendError when absent."""
    cxx = shlex.split(os.environ.get("CXX", "")) or ["g++"]
    if shutil.which(cxx[0]) is None:
        raise BackendError(
            f"LMI native kernel needs a C++ compiler, found none at {cxx[0]!r} "
            "(set $CXX or install g++)")
    return cxx


def _cpu_tag() -> str:
    """CPU identity for the cache key (-march=native builds must not travel between CPUs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def cache_dir() -> Path:
    """Per-user folder of compiled kernels (``$GALIP_CACHE/kernels`` or ``~/.cache/galip/kernels``)."""
    root = os.environ.get("GALIP_CACHE")
    return Path(root) / "kernels" if root else Path.home() / ".cache" / "galip" / "kernels"


def library_path() -> Path:
    """Where the library for these sources, this compiler, these flags and this CPU lives."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((KERNEL_DIR / name).read_bytes())
    digest.update(" ".join(_compiler() + list(FLAGS)).encode())
    digest.update(_cpu_tag().encode())
    return cache_dir() / f"lmi_host-{digest.hexdigest()[:20]}.so"


def _build(target: Path) -> None:
    """Compile lmi_host.cpp into a temporary file beside ``target``, then rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    cmd = _compiler() + list(FLAGS) + ["-o", tmp, str(KERNEL_DIR / "lmi_host.cpp")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["no output"]
            first = next((ln for ln in lines if "error" in ln), lines[0])
            raise BackendError(f"LMI native kernel failed to compile ({shlex.join(cmd)}): {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    """Build (once per source/compiler/CPU) and load the library; BackendError on failure."""
    global _lib, _build_error
    with _lock:
        if _lib is not None:
            return _lib
        if _build_error is not None:
            raise _build_error
        try:
            path = library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
        except BackendError as error:
            _build_error = error
            raise
        except OSError as error:
            _build_error = BackendError(f"LMI native kernel could not be built or loaded: {error}")
            raise _build_error from error
        f32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
        i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
        cint, cfloat = ctypes.c_int, ctypes.c_float
        lib.galip_lmi_host_algorithm.restype = ctypes.c_int
        lib.galip_lmi_host_algorithm.argtypes = [f32, f32] + [cint] * 6 + [cfloat, cint, cint, cint, f32, f32, i32]
        lib.galip_lmi_support_radius_host.restype = ctypes.c_int
        lib.galip_lmi_support_radius_host.argtypes = [ctypes.c_int, ctypes.c_float]
        lib.galip_lmi_needs_double_host.restype = ctypes.c_int
        lib.galip_lmi_needs_double_host.argtypes = [ctypes.c_int, ctypes.c_float]
        lib.galip_lmi_host_rows.restype = ctypes.c_int
        lib.galip_lmi_host_rows.argtypes = [f32, f32] + [cint] * 6 + [cfloat, cint, f32, f32, i32]
        lib.galip_lmi_device_supported_host.restype = ctypes.c_int
        lib.galip_lmi_device_supported_host.argtypes = [cint] * 3 + [cfloat]
        _lib = lib
        return lib


def native_available() -> bool:
    """True when the native kernel is built (building it now if needed) and loads."""
    try:
        _load()
    except BackendError:
        return False
    return True


def native_unavailable_reason() -> str | None:
    """Why the native kernel cannot be used (one line), or None when it can."""
    try:
        _load()
    except BackendError as error:
        return str(error)
    return None


def support_radius(bins: int = _D.bins, sigma: float = _D.sigma) -> int:
    """Truncation radius K (bins) the kernel keeps around each sample's nearest centre."""
    return int(_load().galip_lmi_support_radius_host(bins, sigma))


def device_supported(patch: int, radius: int, bins: int, sigma: float) -> bool:
    """True when the CUDA kernel's fixed local arrays hold these settings (lmi.cuh,
    ``galip_lmi_device_supported``)."""
    return bool(_load().galip_lmi_device_supported_host(int(patch), int(radius), int(bins), float(sigma)))


def _default_threads() -> int:
    env = os.environ.get("GALIP_NUM_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"GALIP_NUM_THREADS must be a positive integer, got {env!r}")
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def lmi_numpy(x: np.ndarray, y: np.ndarray, patch: int = _D.patch, radius: int = _D.radius, bins: int = _D.bins,
              sigma: float = _D.sigma, normalize: bool = _D.normalize, *, num_threads: int | None = None,
              algorithm: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local-wise (normalised) mutual information of x against y with the native kernel.

    Args:
        x, y: (N, 1, H, W) arrays (cast to float32), values in [0, 1] (values outside soft-bin
            like the nearest edge bin).
        patch, radius, bins, sigma, normalize: :class:`~galip.runtime.contract.LmiParams`
            (patch side p, search radius r, B soft bins with centres linspace(0, 1, B),
            Gaussian width, NMI = 2 MI / (H_X + H_Y); defaults there).
        num_threads: OpenMP threads; default $GALIP_NUM_THREADS or the usable cores (fewer for
            inputs under ~1k pixels per core).
        algorithm: ``auto`` (the host kernel: dense 32-bin windows with joint rows in registers
            where float accumulation and B <= 32 allow, else ``planes``), ``planes`` (sparse
            windows into a zeroed joint: the kernel before issue 14, kept as the bench's
            baseline) or ``rows``: the CUDA kernel's per-pixel path (float, low memory) run on
            the host, to test what the GPU runs (OpenMP default threads).

    Returns:
        lmi_map (N, 1, H, W) float32; y_at (N, 1, H, W) float32, y at the arg-max offset (0
        where it falls outside the image); offset_index (N, 1, H, W) int32, row-major index
        of the arg-max offset, 0 = (-r, -r) (ties, |dMI| <= 1e-6, go to the first offset).
    """
    check_lmi_args(np.shape(x), np.shape(y), patch, radius, bins, sigma)
    lib = _load()
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"LMI native algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    y32 = np.ascontiguousarray(y, dtype=np.float32)
    n, _, h, w = x32.shape
    lmi = np.empty((n, 1, h, w), np.float32)
    y_at = np.empty((n, 1, h, w), np.float32)
    index = np.empty((n, 1, h, w), np.int32)
    if num_threads is None:  # ~1k pixels per thread at least: tiny inputs stay on one core
        threads = max(1, min(_default_threads(), (x32.size + 1023) // 1024))
    else:
        threads = int(num_threads)
    args = (x32, y32, n, h, w, int(patch), int(radius), int(bins), float(sigma), int(bool(normalize)))
    if algorithm == "rows":
        code = lib.galip_lmi_host_rows(*args, lmi, y_at, index)
    else:
        code = lib.galip_lmi_host_algorithm(*args, threads, ALGORITHMS.index(algorithm), lmi, y_at, index)
    if code == -1:
        raise BackendError(f"LMI native kernel ran out of memory for input of shape {x32.shape}")
    if code != 0:
        raise ConfigError(f"LMI native kernel rejected its parameters (code {code})")
    return lmi, y_at, index
