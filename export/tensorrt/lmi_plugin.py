"""TensorRT plugin ``galip::LMI``: the CUDA LMI kernel as a quickly deployable AOT plugin.

docs/design.md ("Environment facts"): the kernel of ``runtime/kernels/lmi.cuh`` is compiled by
nvcc to PTX (:func:`galip.export.kernels.compile_lmi_ptx`) and served to TensorRT >= 10.9
through ``tensorrt.plugin``: ``@trtp.register`` describes the outputs, ``@trtp.aot_impl``
returns kernel name, PTX, launch parameters and the extra scalar kernel arguments. The PTX
is embedded in the engine, so running the engine needs neither this module nor a plugin
library.

Mapping from ONNX: the node built by :func:`galip.export.lmi_onnx.lmi_node` has op_type
``LMI``, ``plugin_namespace="galip"``, ``aot=1`` and three outputs; the TensorRT ONNX parser
(>= 10.7 prefers a registered plugin over the model-local function of the same name) creates
this plugin from it, with the node's ``patch``, ``radius``, ``bins``, ``sigma``,
``normalize`` attributes as plugin attributes. Call :func:`register_lmi_plugin` before
parsing. The attributes are typed ``NDArray[np.int32]`` / ``NDArray[np.float32]`` and read
with ``[0]``: the parser passes one-element arrays, and tensorrt.plugin 10.9-11.1 cannot turn
them into ``int`` / ``float`` on NumPy >= 2.4 (fixed upstream in 11.2.1); arrays work on all.

Kernel: lmi.cuh's ``galip_lmi_kernel`` itself, (x, y, N, H, W, patch, radius, bins, sigma,
normalize, lmi, y_at, offset_index). TensorRT's AOT launcher passes input pointers, the
extra args, output pointers in that order, so the plugin has the kernel's three outputs
(lmi, y_at float32, offset_index int32, each like X (N, 1, H, W)). Extra args are int32
symbolic expressions only: sigma travels as the int32 holding its float32 bit pattern
(:func:`sigma_bits`); a kernel parameter is a 4-byte slot that the driver copies verbatim,
so the ``.f32`` parameter receives exactly sigma. :func:`check_kernel_abi` verifies the PTX
signature (2 pointers, 8 four-byte scalars with sigma the 7th, 3 pointers) at registration.
Launch: one thread per pixel, grid (⌈H·W / 128⌉, N), block 128.

Nothing imports ``tensorrt`` at module import. Written against the public ``tensorrt.plugin``
API (TensorRT 10.9+) and tested up to that boundary with a fake module: no engine has been
built with it on the development machines (no GPU, no full TensorRT there).

NOTE: no ``from __future__ import annotations`` here: ``tensorrt.plugin`` inspects the
decorated functions' annotations as live classes.
"""
import os
import struct
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from galip.export import kernels
from galip.runtime.contract.lmi import DEFAULT_LMI, LMI_OP_TYPE as OP_TYPE, LMI_PLUGIN_ID as PLUGIN_ID
from galip.runtime.contract.lmi import LMI_PLUGIN_NAMESPACE as PLUGIN_NAMESPACE, LmiParams
from galip.runtime.errors import BackendError, ConfigError

__all__ = ["PLUGIN_ID", "KERNEL_ABI", "add_lmi_layer", "attribute_arrays", "check_device_params",
           "check_kernel_abi", "kernel_scalar_args", "launch_grid", "register_lmi_plugin", "registered_ptx",
           "sigma_bits"]

DEVICE_MAX_BINS = 32                                # GALIP_LMI_DEVICE_MAX_BINS (lmi.cuh)
DEVICE_MAX_RADIUS = 3                               # GALIP_LMI_DEVICE_MAX_RADIUS (lmi.cuh)
DEVICE_MAX_PATCH = 3                                # GALIP_LMI_DEVICE_MAX_PATCH (lmi.cuh)
INSTALL_TRT = ("pip install 'tensorrt>=10.9' on a GPU machine "
               "(full TensorRT: tensorrt-lean has no plugin builder)")

# PTX parameter types galip_lmi_kernel must have: x, y; N, H, W, patch, radius, bins, sigma,
# normalize; lmi, y_at, offset_index.
KERNEL_ABI = [".u64"] * 2 + [".u32"] * 6 + [".f32", ".u32"] + [".u64"] * 3

_registered: Optional[Path] = None                  # PTX file once registered in this process

# Plugin attributes are one-element NumPy arrays, read with [0]. The ONNX parser hands every
# attribute over as a one-element PluginField array; tensorrt.plugin 10.9-11.1 converts a field
# of a builtin-typed attribute (int, float) with int(array) / float(array), which NumPy >= 2.4
# rejects ("only 0-dimensional arrays can be converted"), so the plugin could not be created.
# An NDArray-typed attribute is passed through as the array itself on every TensorRT >= 10.9.
Int32Attr = npt.NDArray[np.int32]
Float32Attr = npt.NDArray[np.float32]
ATTRIBUTE_DTYPES = {"patch": np.int32, "radius": np.int32, "bins": np.int32,
                    "sigma": np.float32, "normalize": np.int32}


def _one(value: Any) -> Any:
    """The single element of a plugin attribute (a one-element array, or a plain scalar)."""
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise ConfigError(f"an LMI plugin attribute must hold one value, got {flat.size}: {value!r}")
    return flat[0].item()


def attribute_arrays(params: dict) -> dict:
    """``{name: one-element array}`` of the checked LMI parameters, as ``trtp.op`` needs them
    for NDArray-typed attributes (the dtypes the plugin declares)."""
    return {name: np.array([params[name]], dtype) for name, dtype in ATTRIBUTE_DTYPES.items()}


def _params_from_attributes(patch, radius, bins, sigma, normalize) -> dict:
    return check_device_params(int(_one(patch)), int(_one(radius)), int(_one(bins)),
                               float(_one(sigma)), int(_one(normalize)))


def sigma_bits(sigma: float) -> int:
    """The float32 bit pattern of ``sigma`` as a signed int32: the int32 extra arg that fills
    the kernel's 4-byte ``float sigma`` parameter with exactly float32(sigma)."""
    return struct.unpack("<i", struct.pack("<f", float(sigma)))[0]


def check_device_params(patch: int, radius: int, bins: int, sigma: float, normalize) -> dict:
    """Checked parameters, also within the CUDA kernel's fixed-size local arrays.

    The bounds are lmi.cuh's; the support-width bound (wide Gaussians keep more bins per
    sample) is asked of the header itself through the host build when it is available.
    """
    params = LmiParams(patch, radius, bins, sigma, bool(normalize)).to_manifest()
    fits = (params["bins"] <= DEVICE_MAX_BINS and params["radius"] <= DEVICE_MAX_RADIUS
            and params["patch"] <= DEVICE_MAX_PATCH)
    if fits:
        from galip.runtime import lmi_native
        if lmi_native.native_unavailable_reason() is None:
            fits = lmi_native.device_supported(params["patch"], params["radius"], params["bins"],
                                               params["sigma"])
    if not fits:
        raise ConfigError(
            f"the LMI CUDA kernel supports bins <= {DEVICE_MAX_BINS}, radius <= {DEVICE_MAX_RADIUS}, "
            f"patch <= {DEVICE_MAX_PATCH} and sigma <= ~1.1 / (bins - 1), got bins={params['bins']}, "
            f"radius={params['radius']}, patch={params['patch']}, sigma={params['sigma']:.4g}; use the "
            "onnxruntime backend or rebuild lmi.cuh with larger GALIP_LMI_DEVICE_MAX_*")
    return params


def check_kernel_abi(ptx: str) -> None:
    """BackendError unless the PTX's galip_lmi_kernel has the parameters the plugin passes."""
    got = kernels.ptx_kernel_params(ptx, kernels.KERNEL)
    if got != KERNEL_ABI:
        raise BackendError(f"{kernels.KERNEL} in the PTX takes {got}, the TensorRT plugin passes "
                           f"{KERNEL_ABI} (x, y, 8 scalars, lmi, y_at, offset_index); update "
                           "galip.export.tensorrt.lmi_plugin to the kernel's signature")


def launch_grid(n: Any, h: Any, w: Any, cdiv=None, block: int = kernels.BLOCK) -> dict:
    """Launch dimensions of galip_lmi_kernel: one thread per pixel, blockIdx.y = batch index.

    ``n, h, w`` may be ints or TensorRT symbolic shape expressions (then pass ``trtp.cdiv``).
    """
    cdiv = cdiv or (lambda a, b: -(-a // b))
    return {"grid_x": cdiv(h * w, block), "grid_y": n, "block_x": block}


def kernel_scalar_args(n: Any, h: Any, w: Any, params: dict) -> list:
    """The int32 extra args in kernel order: N, H, W, patch, radius, bins, σ bits, normalize."""
    return [n, h, w, params["patch"], params["radius"], params["bins"],
            sigma_bits(params["sigma"]), int(params["normalize"])]


def _import_trtp():
    """``tensorrt.plugin``, or BackendError saying how to get it."""
    try:
        import tensorrt.plugin as trtp
    except ImportError as error:
        raise BackendError(f"the LMI TensorRT plugin needs tensorrt.plugin (TensorRT >= 10.9), "
                           f"which does not import here ({error}); {INSTALL_TRT}") from None
    return trtp


def registered_ptx() -> Optional[Path]:
    """The PTX file registered in this process (what engines built now embed), or None."""
    return _registered


def register_lmi_plugin(arch: Optional[str] = kernels.DEFAULT_ARCH,
                        ptx_dir: Optional[Path] = None, ptx_file: Optional[Path] = None) -> str:
    """Register ``galip::LMI`` with ``tensorrt.plugin`` (once per process); returns its id.

    The PTX is ``ptx_file`` (else ``$GALIP_LMI_PTX``) when given, for GPU machines without
    nvcc (compile it elsewhere with :func:`galip.export.kernels.compile_lmi_ptx`); otherwise
    nvcc compiles it now (cached in ``ptx_dir``), so a missing nvcc fails here, not
    mid-build. Raises BackendError without tensorrt.plugin, without any PTX source, or when
    the PTX kernel's parameters are not the ones the plugin passes.
    """
    global _registered
    trtp = _import_trtp()
    if _registered is not None:
        return PLUGIN_ID
    ptx_file = ptx_file or os.environ.get("GALIP_LMI_PTX") or None
    ptx_path = Path(ptx_file) if ptx_file else kernels.compile_lmi_ptx(ptx_dir, arch)
    try:
        ptx = ptx_path.read_text()
    except OSError as error:
        raise BackendError(f"cannot read the LMI kernel PTX {ptx_path}: {error.strerror}; "
                           "point GALIP_LMI_PTX at a file from compile_lmi_ptx()") from None
    check_kernel_abi(ptx)
    import tensorrt as trt

    # 1. Outputs: lmi, y_at like X (N, 1, H, W) float32; offset_index the same shape, int32.
    @trtp.register(PLUGIN_ID)
    def lmi_desc(x: trtp.TensorDesc, y: trtp.TensorDesc, patch: Int32Attr, radius: Int32Attr,
                 bins: Int32Attr, sigma: Float32Attr, normalize: Int32Attr
                 ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return x.like(), x.like(), trtp.from_shape_expr(x.shape_expr, dtype=trt.int32)

    # 2. The kernel reads and writes linear float32 (int32 index) only; TensorRT reformats.
    @trtp.autotune(PLUGIN_ID)
    def lmi_autotune(x: trtp.TensorDesc, y: trtp.TensorDesc,
                     outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]
                     ) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, FP32, FP32, INT32", "LINEAR")]

    # 3. AOT: kernel name, PTX, launch grid and the scalars from the symbolic shape.
    @trtp.aot_impl(PLUGIN_ID)
    def lmi_aot_impl(x: trtp.TensorDesc, y: trtp.TensorDesc, patch: Int32Attr, radius: Int32Attr,
                     bins: Int32Attr, sigma: Float32Attr, normalize: Int32Attr,
                     outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc],
                     tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes],
                                           trtp.KernelLaunchParams, trtp.SymExprs]:
        params = _params_from_attributes(patch, radius, bins, sigma, normalize)
        n, h, w = x.shape_expr[0], x.shape_expr[2], x.shape_expr[3]
        launch = trtp.KernelLaunchParams()
        for field, value in launch_grid(n, h, w, cdiv=trtp.cdiv).items():
            setattr(launch, field, value)
        launch.shared_mem = 0
        extra = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(v) for v in kernel_scalar_args(n, h, w, params)])
        return kernels.KERNEL, ptx, launch, extra

    _registered = ptx_path
    return PLUGIN_ID


def add_lmi_layer(network: Any, x: Any, y: Any, **params) -> Any:
    """Add ``galip::LMI`` to a ``tensorrt.INetworkDefinition`` (AOT); returns the layer.

    Outputs: 0 lmi, 1 y_at, like ``x`` (N, 1, H, W) float32; 2 offset_index, int32.
    """
    register_lmi_plugin()
    trtp = _import_trtp()
    p = check_device_params(**{**DEFAULT_LMI.kwargs(), **params})
    call = getattr(getattr(trtp.op, PLUGIN_NAMESPACE), OP_TYPE)
    return network.add_plugin(call(x, y, **attribute_arrays(p)), aot=True)

