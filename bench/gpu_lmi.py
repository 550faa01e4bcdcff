"""The LMI CUDA kernel (``runtime/kernels/lmi.cuh``) launched through CuPy, for the ``lmi`` case.

The same kernel and launch the TensorRT plugin uses (:mod:`galip.export.tensorrt.lmi_plugin`:
grid, block and scalar arguments), so a GPU machine without TensorRT still measures it.
Loaded from the PTX TensorRT embeds (``$GALIP_LMI_PTX``, else nvcc's build by
:func:`galip.export.kernels.compile_lmi_ptx`: compute_80, FTZ off), which the driver
JIT-compiles; only where neither exists is the header compiled by NVRTC (CuPy's own flags,
``-ftz=true`` among them, so the build note says so). CuPy is imported lazily;
:func:`unavailable_reason` says why the row is skipped.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

MATH_SHIM = "#pragma once\n#ifndef NAN\n#define NAN __int_as_float(0x7fc00000)\n#endif\n"


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (one line), or None."""
    try:
        import cupy
    except Exception as error:     # noqa: BLE001 - ImportError or a broken CUDA install
        return f"CuPy does not import ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA GPU visible to CuPy"
    except Exception as error:     # noqa: BLE001 - no driver
        return f"no CUDA GPU visible to CuPy ({type(error).__name__})"
    return None


def ptx_file(workdir: Path | None = None) -> Path | None:
    """The PTX TensorRT would embed: ``$GALIP_LMI_PTX``, else nvcc's build; None without both."""
    from galip.export import kernels
    if os.environ.get("GALIP_LMI_PTX"):
        return Path(os.environ["GALIP_LMI_PTX"])
    return kernels.compile_lmi_ptx(workdir) if kernels.nvcc_available() else None


def load_kernel(workdir: Path | None = None, nvrtc_fallback: bool = True):
    """The compiled ``galip_lmi_kernel`` and how it was built (module docstring).

    RuntimeError when there is no PTX and ``nvrtc_fallback`` is off or NVRTC fails too.
    """
    import cupy

    from galip.export import kernels
    ptx = ptx_file(workdir)
    if ptx is not None:
        return cupy.RawModule(path=str(ptx)).get_function(kernels.KERNEL), f"PTX {ptx.name} (what TensorRT embeds)"
    if not nvrtc_fallback:
        raise RuntimeError("no nvcc and no GALIP_LMI_PTX (a PTX from galip.export.kernels.compile_lmi_ptx)")
    shim = Path(tempfile.mkdtemp(prefix="galip-nvrtc-", dir=workdir))
    (shim / "math.h").write_text(MATH_SHIM)
    options = ("-std=c++17", f"-I{shim}", f"-I{kernels.header_path().parent}")
    module = cupy.RawModule(code=kernels.wrapper_source(), options=options)
    return module.get_function(kernels.KERNEL), "NVRTC (CuPy's flags, not the PTX TensorRT embeds)"


def kernel_lmi(x: np.ndarray, y: np.ndarray, settings: dict, workdir: Path | None = None
               ) -> tuple[Callable[[], object], Callable[[], None], str]:
    """(call → lmi map on the device, synchronise, build note) for inputs x, y (N, 1, H, W)."""
    import cupy

    from galip.export.tensorrt import lmi_plugin
    kernel, built = load_kernel(workdir)
    n, _, h, w = x.shape
    params = lmi_plugin.check_device_params(settings["patch"], settings["radius"], settings["bins"],
                                            settings["sigma"], settings["normalize"])
    grid = lmi_plugin.launch_grid(n, h, w)
    scalars = [np.int32(v) for v in lmi_plugin.kernel_scalar_args(n, h, w, params)]
    dx, dy = cupy.asarray(x, cupy.float32), cupy.asarray(y, cupy.float32)
    lmi = cupy.empty(x.shape, cupy.float32)
    y_at = cupy.empty(x.shape, cupy.float32)
    index = cupy.empty(x.shape, cupy.int32)

    def call():
        kernel((grid["grid_x"], grid["grid_y"]), (grid["block_x"],), (dx, dy, *scalars, lmi, y_at, index))
        return lmi

    return call, cupy.cuda.Device().synchronize, f"lmi.cuh kernel via CuPy ({built}), the TensorRT plugin's launch"
