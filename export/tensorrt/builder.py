"""ONNX graph → serialized TensorRT engine, with the manifest entry that describes it.

Written against the public ``tensorrt`` Python API (TensorRT 10.x), imported lazily:
``import galip.export.tensorrt.builder`` works anywhere; :func:`build_engine` raises
:class:`TensorRTUnavailable` (a BackendError) where ``tensorrt`` or its builder is missing.

Build sequence (:func:`build_engine`)::

    register_lmi_plugin()                      # diffusion graphs: galip::LMI → CUDA plugin
    builder = Builder(Logger(WARNING))
    network = builder.create_network(flags)    # STRONGLY_TYPED where TensorRT has the flag
    OnnxParser(network, logger).parse_from_file(graph)
    check: one PLUGIN_V3 layer per galip::LMI node of the graph
    config = builder.create_builder_config()
    config.set_flag(BuilderFlag.FP16)          # only weakly typed builds on TensorRT < 11
    config.set_flag(BuilderFlag.VERSION_COMPATIBLE)   # --version-compatible
    profile = builder.create_optimization_profile(); profile.set_shape(input, min, opt, max)
    config.add_optimization_profile(profile)
    config.set_timing_cache(config.create_timing_cache(saved bytes or b""), False)  # checked
    plan = builder.build_serialized_network(network, config)
    engine file ← plan; timing cache file ← config.get_timing_cache().serialize()

Precision. TensorRT deprecated weak typing (BuilderFlag.FP16) in 10.12 and removed it in
11: a strongly typed network takes every tensor's type from the ONNX graph. galip's fp16
graph already is the mixed-precision graph (fp16 compute with fp32 LMI, softmax and
normalisations, see :mod:`galip.export.fp16`), so an fp16 engine is a strongly typed build
of the fp16 graph and an fp32 engine one of the fp32 graph. Only a TensorRT 10 without
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` gets the weakly typed build with the FP16
flag (pass the fp32 graph there); TensorRT >= 11 networks are strongly typed with or
without the flag, and a build that would need a missing flag is a one-line error.

Guards. If the ``galip::LMI`` plugin is not registered when the parser meets an LMI node,
TensorRT silently inlines the node's ONNX function body, a dense (N, 729, H, W) tensor per
offset (tens of GiB at the largest profile): after parsing, the network must hold exactly
one ``PLUGIN_V3`` layer per LMI node. The plugin's PTX is JIT-compiled by the driver, so
its ISA is checked against the driver (:mod:`galip.runtime.backends.tensorrt.compat`) before
building and recorded in the entry (``ptx_isa``, ``min_driver_cuda``). The timing cache is
keyed by TensorRT version and compute capability (:func:`timing_cache_path`); a cache that
TensorRT refuses is replaced by an empty one.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from galip.runtime import device_info
from galip.runtime.atomic import atomic_path
from galip.runtime.backends.tensorrt import compat
from galip.runtime.errors import BackendError

INSTALL = "pip install 'galip[gpu]' on a machine with an NVIDIA GPU"
Shape = Sequence[int]
Profiles = Mapping[str, tuple[Shape, Shape, Shape]]


class TensorRTUnavailable(BackendError):
    """TensorRT (with its builder and ONNX parser) cannot be imported here."""


def import_tensorrt() -> Any:
    """The full ``tensorrt`` module (builder + ONNX parser), or TensorRTUnavailable.

    ``tensorrt-lean`` (runtime only) and a broken install both count as unavailable.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as error:   # ImportError, or OSError from a .so that does not load
        reason = "not installed" if isinstance(error, ImportError) else f"does not load ({error})"
        raise TensorRTUnavailable(f"TensorRT {reason}: {INSTALL}") from None
    missing = [name for name in ("Builder", "OnnxParser") if not hasattr(trt, name)]
    if missing:
        raise TensorRTUnavailable(f"TensorRT {getattr(trt, '__version__', '?')} here has no "
                                  f"{' / '.join(missing)} (a runtime-only install?): {INSTALL}")
    return trt


def unavailable_reason() -> str | None:
    """Why engines cannot be built here (one line), or None when TensorRT can build."""
    try:
        import_tensorrt()
    except TensorRTUnavailable as error:
        return str(error)
    return None


def compute_capability() -> str | None:
    """GPU 0's compute capability ``"major.minor"``: cuda-python, else torch.cuda, else None."""
    from galip.runtime import device_info
    found = device_info.gpu_compute_capability()
    if found:
        return found
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:
        pass
    return None


def _check_profiles(profiles: Profiles) -> dict[str, dict[str, list[int]]]:
    """Validate min <= opt <= max per dimension; return the manifest form {input: {min, opt, max}}."""
    out = {}
    for name, shapes in profiles.items():
        low, opt, high = (list(map(int, s)) for s in shapes)
        if not (len(low) == len(opt) == len(high)) or any(
                not (1 <= a <= b <= c) for a, b, c in zip(low, opt, high)):
            raise BackendError(f"optimization profile of {name!r} needs 1 <= min <= opt <= max per "
                               f"dimension, got min {low}, opt {opt}, max {high}")
        out[name] = {"min": low, "opt": opt, "max": high}
    return out


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors or 'no details'}")


def lmi_node_count(onnx_path: Path) -> int:
    """How many ``galip::LMI`` nodes the graph calls (main graph and other local functions)."""
    import onnx

    from galip.export.lmi_onnx import DOMAIN, OP_TYPE
    model = onnx.load(str(onnx_path), load_external_data=False)
    bodies = [model.graph.node] + [f.node for f in model.functions
                                   if (f.domain, f.name) != (DOMAIN, OP_TYPE)]
    return sum(1 for body in bodies for n in body if (n.domain, n.op_type) == (DOMAIN, OP_TYPE))


def check_plugin_layers(trt: Any, network: Any, expected: int, onnx_path: Path) -> None:
    """BackendError unless the parsed network has one PLUGIN_V3 layer per LMI node."""
    found = sum(1 for i in range(network.num_layers)
                if network.get_layer(i).type == trt.LayerType.PLUGIN_V3)
    if found != expected:
        raise BackendError(
            f"TensorRT's parser made {found} PLUGIN_V3 layer(s) for the {expected} galip::LMI node(s) of "
            f"{onnx_path.name}: the LMI plugin was not used, and the dense ONNX function body it would "
            "inline needs tens of GiB; register it first (galip.export.tensorrt.lmi_plugin) on TensorRT >= 10.9")


def ptx_requirement() -> dict:
    """``{"ptx_isa", "min_driver_cuda"}`` of the registered LMI PTX ({} when none is registered);
    BackendError when this machine's driver cannot JIT it (TensorRT does so while building)."""
    from galip.export.tensorrt import lmi_plugin
    path = lmi_plugin.registered_ptx()
    if path is None:
        return {}
    isa = compat.ptx_isa(Path(path).read_text())
    needed, driver = compat.min_driver_cuda(isa), device_info.driver_version()
    if driver is not None:
        why = compat.driver_problem(isa, needed, driver)
        if why is not None:
            raise BackendError(f"{why}: update the driver, or compile the PTX with an nvcc of CUDA "
                               f"{compat.cuda_text(driver)} or older and set GALIP_LMI_PTX to it")
    return {"ptx_isa": isa, "min_driver_cuda": needed}


def timing_cache_path(path: str | Path, trt_version: str, capability: str | None) -> Path:
    """``timing.cache`` → ``timing.trt10.13.0.sm_90.cache``: one cache per TensorRT version and
    GPU, since TensorRT's timings are valid only for the pair that measured them."""
    path = Path(path)
    version = ".".join(str(trt_version).split(".")[:3])
    return path.with_name(f"{path.stem}.trt{version}.{device_info.sm(capability).replace(' ', '_')}{path.suffix}")


def _set_timing_cache(config: Any, saved: bytes, where: Path) -> None:
    """Load ``saved`` into the config; a cache TensorRT refuses is replaced by an empty one."""
    if config.set_timing_cache(config.create_timing_cache(saved), False):
        return
    if not saved or not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise BackendError(f"TensorRT refused the timing cache {where.name}; delete it or build without "
                           "--timing-cache")


def _network_flags(trt: Any, major: int) -> tuple[int, bool]:
    """(create_network flags, strongly typed?): STRONGLY_TYPED where the flag exists; TensorRT
    >= 11 removed weak typing, so its networks are strongly typed without the flag too."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag), True
    return 0, major >= 11


def _set_flag(trt: Any, config: Any, name: str, why: str) -> None:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise BackendError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}, needed {why}")
    config.set_flag(flag)


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, fp16: bool,
                 profiles: Profiles, timing_cache: str | Path | None = None, plugins: bool = True,
                 register_plugins: Callable[[], Any] | None = None,
                 version_compatible: bool = False, log_level: str = "WARNING") -> dict:
    """Build and write one engine; return its manifest entry.

    Args:
        onnx_path: the graph (for a strongly typed fp16 engine: the fp16 graph).
        engine_path: where the serialized engine goes (written atomically).
        fp16: the engine's precision label; sets BuilderFlag.FP16 on weakly typed builds.
        profiles: {input name: (min, opt, max) shapes} for the dynamic inputs.
        timing_cache: the cache file name; the file used is keyed by TensorRT version and
            compute capability (:func:`timing_cache_path`), read if it exists, then saved.
        plugins: register the ``galip::LMI`` plugin first (graphs with LMI nodes).
        register_plugins: the registration function (default
            :func:`galip.export.tensorrt.lmi_plugin.register_lmi_plugin`).
        version_compatible: set BuilderFlag.VERSION_COMPATIBLE (runs on later TensorRT of the
            same major, and on the lean runtime ``tensorrt_lean``).

    Returns:
        ``{"file": engine file name, "precision": "fp16" | "fp32", "tensorrt_version",
        "compute_capability", "profiles": {input: {"min", "opt", "max"}}, "strongly_typed",
        "version_compatible"}``, plus ``"ptx_isa"`` and ``"min_driver_cuda"`` when the
        engine embeds the LMI kernel (``file`` is the bare name: the caller makes it
        bundle-relative).
    Raises:
        TensorRTUnavailable without TensorRT; BackendError when parsing or building fails,
        when the plugin did not replace every LMI node, or the driver cannot JIT its PTX.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    checked = _check_profiles(profiles)
    trt = import_tensorrt()
    major = int(str(trt.__version__).split(".")[0] or 0)
    capability = compute_capability()
    # 1. the LMI plugin must be registered before the parser meets a galip::LMI node
    lmi_nodes, kernel = (lmi_node_count(onnx_path) if plugins else 0), {}
    if plugins:
        if register_plugins is None:
            from galip.export.tensorrt.lmi_plugin import register_lmi_plugin as register_plugins
        register_plugins()
        kernel = ptx_requirement() if lmi_nodes else {}
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    # 2. network: strongly typed where available (types come from the graph)
    flags, strong = _network_flags(trt, major)
    network = builder.create_network(flags)
    _parse(trt, network, logger, onnx_path)
    if plugins:
        check_plugin_layers(trt, network, lmi_nodes, onnx_path)
    # 3. builder config: precision (weak typing only), compatibility, one optimization profile
    config = builder.create_builder_config()
    if fp16 and not strong:
        _set_flag(trt, config, "FP16", "for a weakly typed fp16 build (pass the fp16 graph to a strongly typed one)")
    if version_compatible:
        _set_flag(trt, config, "VERSION_COMPATIBLE", "for --version-compatible")
    profile = builder.create_optimization_profile()
    for name, shape in checked.items():
        profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
    config.add_optimization_profile(profile)
    # 4. timing cache: reuse what earlier builds measured with this TensorRT on this GPU
    cache_path = timing_cache_path(timing_cache, trt.__version__, capability) if timing_cache is not None else None
    if cache_path is not None:
        _set_timing_cache(config, cache_path.read_bytes() if cache_path.is_file() else b"", cache_path)
    # 5. build, write the plan, save the grown timing cache
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path.name} "
                           "(see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(engine_path, suffix=".tmp") as tmp:
        tmp.write_bytes(bytes(memoryview(plan)))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_path, suffix=".tmp") as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return {"file": engine_path.name, "precision": "fp16" if fp16 else "fp32",
            "tensorrt_version": str(trt.__version__),
            "compute_capability": capability or "unknown",
            "profiles": checked, "strongly_typed": strong,
            "version_compatible": bool(version_compatible), **kernel}
