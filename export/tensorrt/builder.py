"""ONNX graph → serialized TensorRT engine, with the manifest entry that describes it.

Written against the public ``tensorrt`` Python API (TensorRT 10.x), imported lazily:
``import galip.export.tensorrt.builder`` works anywhere; :func:`build_engine` raises
:class:`TensorRTUnavailable` (a BackendError) where ``tensorrt`` or its builder is missing.

Build sequence (:func:`build_engine`)::

    register_lmi_plugin()                      # diffusion graphs: galip::LMI → CUDA plugin
    builder = Builder(Logger(WARNING))
    network = builder.create_network(flags)    # STRONGLY_TYPED where TensorRT has it
    OnnxParser(network, logger).parse_from_file(graph)
    config = builder.create_builder_config()
    config.set_flag(BuilderFlag.FP16)          # only for weakly typed builds (see below)
    profile = builder.create_optimization_profile(); profile.set_shape(input, min, opt, max)
    config.add_optimization_profile(profile)
    config.set_timing_cache(config.create_timing_cache(saved bytes or b""), False)
    plan = builder.build_serialized_network(network, config)
    engine file ← plan; timing cache file ← config.get_timing_cache().serialize()

Precision. TensorRT deprecated weak typing (BuilderFlag.FP16) in 10.12 and removed it in
11: a strongly typed network takes every tensor's type from the ONNX graph. galip's fp16
graph already is the mixed-precision graph (fp16 compute with fp32 LMI, softmax and
normalisations, see :mod:`galip.export.fp16`), so an fp16 engine is a strongly typed build
of the fp16 graph and an fp32 engine one of the fp32 graph. Only a TensorRT without
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` gets the weakly typed build with the FP16
flag (pass the fp32 graph there).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from galip.runtime.atomic import atomic_path
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


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, fp16: bool,
                 profiles: Profiles, timing_cache: str | Path | None = None, plugins: bool = True,
                 register_plugins: Callable[[], Any] | None = None,
                 log_level: str = "WARNING") -> dict:
    """Build and write one engine; return its manifest entry.

    Args:
        onnx_path: the graph (for a strongly typed fp16 engine: the fp16 graph).
        engine_path: where the serialized engine goes (written atomically).
        fp16: the engine's precision label; sets BuilderFlag.FP16 on weakly typed builds.
        profiles: {input name: (min, opt, max) shapes} for the dynamic inputs.
        timing_cache: file to load the layer-timing cache from (if it exists) and save to.
        plugins: register the ``galip::LMI`` plugin first (graphs with LMI nodes).
        register_plugins: the registration function (default
            :func:`galip.export.tensorrt.lmi_plugin.register_lmi_plugin`).

    Returns:
        ``{"file": engine file name, "precision": "fp16" | "fp32", "tensorrt_version",
        "compute_capability", "profiles": {input: {"min", "opt", "max"}}, "strongly_typed"}``
        (``file`` is the bare name: the caller makes it bundle-relative).
    Raises:
        TensorRTUnavailable without TensorRT; BackendError when parsing or building fails.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    checked = _check_profiles(profiles)
    trt = import_tensorrt()
    # 1. the LMI plugin must be registered before the parser meets a galip::LMI node
    if plugins:
        if register_plugins is None:
            from galip.export.tensorrt.lmi_plugin import register_lmi_plugin as register_plugins
        register_plugins()
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    # 2. network: strongly typed where available (types come from the graph)
    strong = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    _parse(trt, network, logger, onnx_path)
    # 3. builder config: precision (weak typing only), one optimization profile
    config = builder.create_builder_config()
    if fp16 and not strong:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, shape in checked.items():
        profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
    config.add_optimization_profile(profile)
    # 4. timing cache: reuse what earlier builds measured on this GPU / TensorRT
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        saved = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(saved), False)
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
            "compute_capability": compute_capability() or "unknown",
            "profiles": checked, "strongly_typed": strong}
