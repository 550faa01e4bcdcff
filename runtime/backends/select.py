"""Pick the backend a bundle's model runs on, and say why in one line.

``auto`` tries, in order:

1. **tensorrt** — only if TensorRT imports, cuda-python finds a GPU, and an engine in the
   manifest matches this GPU's compute capability and the installed TensorRT version
   (major.minor.patch equal; an engine marked ``"version_compatible": true`` runs on the
   same major version at or above the one it was built with; ``"hardware_compatibility":
   "ampere+"`` runs on any compute capability >= 8.0), the driver can JIT its embedded LMI
   PTX (``"min_driver_cuda"``, see :mod:`.tensorrt.compat`), and, where only the lean
   runtime ``tensorrt_lean`` is installed, the engine is version-compatible (the lean
   runtime deserialises nothing else);
2. **onnxruntime-cuda** — only if ``CUDAExecutionProvider`` is listed by
   ``onnxruntime.get_available_providers()`` *and* a probe session really keeps it in
   ``get_providers()`` (onnxruntime-gpu silently falls back to CPU when its libraries do
   not load);
3. **onnxruntime-cpu**.

Precision, unless asked for: fp16 first on GPUs (engine or graph), fp32 on CPU (most
onnxruntime CPU kernels have no fp16 version). An explicit backend that cannot run raises
BackendError naming why and what to install.

LMI on onnxruntime-cpu (diffusion): the step graph's ``galip::LMI`` node runs on the native
CPU kernel (:mod:`galip.runtime.lmi_native`, ~10x faster than the node's ONNX function body)
through :class:`~galip.runtime.backends.onnxruntime.split_lmi.SplitLmiRunner` whenever that
kernel builds and the graph splits; otherwise the plain graph runs. The ``lmi`` argument
(``Settings.lmi``; galip-run's ``--lmi``, whose default is ``$GALIP_LMI``) picks: ``auto``
(default), ``native`` (BackendError when it cannot), ``onnx`` (the plain graph). The choice
is appended to the reason line and kept in ``Choice.lmi``. The graph is parsed once, here,
and the parsed model handed to the split runner.

LMI(source, source) (:func:`select_lmi`, once per slice batch): the bundle's ``lmi`` engine
when the step runs on TensorRT and an engine matches; else the native CPU kernel with the
manifest's LMI parameters when the step's LMI runs there or the step runs on TensorRT; else
``lmi.onnx`` on the step's onnxruntime provider. A TensorRT deployment thus needs neither
``onnx`` nor ``onnxruntime``.

Files are opened through the bundle (:meth:`~galip.runtime.bundle.Bundle.read`,
:meth:`~galip.runtime.bundle.Bundle.graph_source`), which verifies their checksums.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping

from .. import device_info
from ..bundle import Bundle
from ..contract import DiffusionEntry, EngineEntry, ModelEntry
from ..errors import BackendError, ConfigError
from ..settings import LMI_MODES
from .base import RunnerFactory
from .onnxruntime.loader import INSTALL_CPU, INSTALL_GPU, cuda_providers, provider_really_loads
from .tensorrt import compat

Requested = Literal["auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"]
BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
_PRECISION_ORDER = ("fp16", "fp32")


@dataclass(frozen=True)
class Choice:
    """What :func:`select_backend` picked: backend ``name``, ``precision``, the ``file`` it
    runs (engine or graph), and ``reason``, the line the CLI prints. ``lmi``: where the
    diffusion step's LMI runs on onnxruntime-cpu, ``native`` (the native CPU kernel) or
    ``onnx`` (the graph's function body); None otherwise."""

    name: str
    precision: str
    reason: str
    file: Path
    lmi: str | None = None

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class _Option:
    factory: RunnerFactory | None = None
    precision: str | None = None
    file: Path | None = None
    note: str = ""          # why it was picked (when it can run)
    why_not: str = ""       # why it cannot run: "no TensorRT (not installed)"
    fix: str = ""           # what to do about it
    lmi: str | None = None  # diffusion on onnxruntime-cpu: "native" or "onnx"
    lmi_note: str = ""      # why, appended to the reason: "LMI on the native CPU kernel"


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text or ""))[:3])


def _short(text: str | None) -> str:
    return ".".join(map(str, _version(text))) or "none"


def engine_mismatch(engine: EngineEntry | Mapping, capability: str | None, trt_version: str | None,
                    driver: int | None = None, lean: bool = False) -> str | None:
    """Why manifest ``engine`` cannot run on this GPU/TensorRT/driver, or None when it can.

    ``driver``: the driver's CUDA version (``device_info.driver_version()``), checked against
    the engine's ``min_driver_cuda`` when it has one; ``lean``: only ``tensorrt_lean`` here.
    """
    if isinstance(engine, Mapping):
        engine = EngineEntry.from_manifest(engine)
    if lean and not engine.version_compatible:
        return (f"engine {engine.file} is not version-compatible and tensorrt_lean runs only "
                "version-compatible engines; re-export with galip-export --version-compatible")
    if engine.min_driver_cuda is not None:
        why = compat.driver_problem(str(engine.ptx_isa or "?"), int(engine.min_driver_cuda), driver)
        if why is not None:
            return why
    built_cc, built_trt = engine.compute_capability, engine.tensorrt_version
    if engine.hardware_compatibility == "ampere+":
        cc_ok = capability is not None and _version(capability) >= (8, 0)
    else:
        cc_ok = capability is not None and _version(capability) == _version(built_cc)
    have, built = _version(trt_version), _version(built_trt)
    if engine.version_compatible:
        trt_ok = bool(have) and have[:1] == built[:1] and have >= built
    else:
        trt_ok = bool(have) and have == built
    if cc_ok and trt_ok:
        return None
    here = f"this GPU is {device_info.sm(capability)}" if capability else "this machine has no GPU"
    return f"engine built for {device_info.sm(built_cc)} / TRT {_short(built_trt)}, {here} / TRT {_short(trt_version)}"


def _by_precision(items: list, precision: str | None, key: Callable) -> list:
    if precision is not None:
        return [item for item in items if key(item) == precision]
    rank = {p: i for i, p in enumerate(_PRECISION_ORDER)}
    return sorted(items, key=lambda item: rank.get(key(item), len(rank)))


def _matching_engine(engines: list[EngineEntry]) -> tuple[EngineEntry | None, str, list[str]]:
    """(the first engine this machine runs or None, the GPU's capability, why each did not)."""
    capability = device_info.gpu_compute_capability()
    driver, lean = device_info.driver_version(), device_info.tensorrt_is_lean()
    mismatches = []
    for engine in engines:
        why = engine_mismatch(engine, capability, device_info.tensorrt_version(), driver, lean)
        if why is None:
            return engine, capability, mismatches
        mismatches.append(why)
    return None, capability, mismatches


def _trt_factory(bundle: Bundle, engine: EngineEntry, cuda_graph: bool = False) -> RunnerFactory:
    from .tensorrt.runner import trt_factory
    return trt_factory(lambda: bundle.read(engine.file), precision=engine.precision, cuda_graph=cuda_graph,
                       version_compatible=engine.version_compatible)


def _tensorrt(bundle: Bundle, spec: ModelEntry, precision: str | None, cuda_graph: bool) -> _Option:
    trt_version = device_info.tensorrt_version()
    if trt_version is None:
        problem = device_info.tensorrt_problem() or "not installed"
        return _Option(why_not="no TensorRT (not installed)" if problem == "not installed" else problem,
                       fix=f"install TensorRT: {INSTALL_GPU}")
    engines = _by_precision(list(spec.engines), precision, lambda e: e.precision)
    if not engines:
        what = f"no {precision} TensorRT engine" if precision else "no TensorRT engine"
        return _Option(why_not=f"{what} in the bundle", fix="re-export the bundle with engines on this GPU")
    if device_info.import_cudart() is None:
        problem = device_info.cudart_problem() or "no cuda-python"
        return _Option(why_not=f"{problem} (needed for TensorRT device buffers)",
                       fix=f"install cuda-python: {INSTALL_GPU}")
    if device_info.gpu_compute_capability() is None:
        return _Option(why_not=device_info.gpu_problem(), fix="run on a machine with an NVIDIA GPU and a driver "
                       "that supports the installed CUDA wheels (see the README's GPU section)")
    engine, capability, mismatches = _matching_engine(engines)
    if engine is not None:
        return _Option(_trt_factory(bundle, engine, cuda_graph), engine.precision, bundle.path(engine.file),
                       note=f"engine {engine.file} matches {device_info.sm(capability)} / TRT {_short(trt_version)}")
    return _Option(why_not="; ".join(dict.fromkeys(mismatches)),
                   fix="re-export the engine on this GPU (galip-export) or use --backend auto to fall back")


def _graph(bundle: Bundle, spec: ModelEntry, precision: str | None, prefer: tuple[str, ...]) -> tuple[str, Path] | str:
    """(precision, path) of the graph to run, or why there is none."""
    graphs = spec.graphs
    if precision is not None:
        if precision not in graphs:
            return f"no {precision} graph in the bundle (it has {', '.join(graphs)})"
        return precision, bundle.path(graphs[precision].file)
    chosen = next((p for p in prefer if p in graphs), next(iter(graphs)))
    return chosen, bundle.path(graphs[chosen].file)


def _source(bundle: Bundle, spec: ModelEntry, precision: str) -> Callable:
    """What the onnxruntime loader opens: the graph's verified bytes (or path), when activated."""
    return lambda: bundle.graph_source(spec.graphs[precision])


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _onnxruntime_cuda(bundle: Bundle, spec: ModelEntry, precision: str | None, cuda_graph: bool,
                      threads: int | None) -> _Option:
    ort = _import_ort()
    if ort is None:
        return _Option(why_not="no onnxruntime (not installed)", fix=f"install onnxruntime-gpu: {INSTALL_GPU}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return _Option(why_not="no CUDA provider", fix=f"install onnxruntime-gpu: {INSTALL_GPU}")
    kept, in_use = provider_really_loads("CUDAExecutionProvider", ort)
    if not kept:
        return _Option(
            why_not=f"CUDA provider listed but a probe session ran on {', '.join(in_use) or 'nothing'}",
            fix="install the CUDA and cuDNN libraries your onnxruntime-gpu was built for",
        )
    graph = _graph(bundle, spec, precision, ("fp16", "fp32"))
    if isinstance(graph, str):
        return _Option(why_not=graph, fix="pick a precision the bundle has (--precision)")
    from .onnxruntime.runner import onnxrt_factory
    chosen, path = graph
    providers = cuda_providers(cuda_graph=cuda_graph)
    return _Option(onnxrt_factory(_source(bundle, spec, chosen), providers, threads=threads, precision=chosen,
                                  name="onnxruntime-cuda"), chosen, path, note="CUDA provider loads")


def lmi_mode(requested: str | None = None) -> str:
    """``requested`` (default ``auto``); ConfigError for anything but auto/native/onnx."""
    mode = (requested or "").strip().lower() or "auto"
    if mode not in LMI_MODES:
        raise ConfigError(f"--lmi must be one of {', '.join(LMI_MODES)}, got {mode!r}")
    return mode


def _native_lmi(bundle: Bundle, spec: ModelEntry, precision: str, mode: str) -> tuple[object | None, str]:
    """(the parsed step graph when its LMI runs on the native kernel, else None; the note for
    the reason line). The graph is parsed here once and handed on to the split runner."""
    if mode == "onnx":
        return None, "LMI in the ONNX graph (--lmi onnx)"
    from .. import lmi_native
    from .onnxruntime.split_lmi import NATIVE_NOTE, load_model, split_problem
    why = lmi_native.native_unavailable_reason()
    model = None
    if why is None:
        model = load_model(bundle.graph_source(spec.graphs[precision]))
        why = split_problem(model)
    if why is None:
        return model, NATIVE_NOTE
    if mode == "native":
        raise BackendError(f"--lmi native but the LMI cannot run on the native CPU kernel: {why}; "
                           "use --lmi auto or onnx to run the LMI in the ONNX graph")
    return None, f"LMI in the ONNX graph (native CPU kernel unavailable: {why})"


def _onnxruntime_cpu(bundle: Bundle, spec: ModelEntry, precision: str | None, threads: int | None,
                     model: str = "generator", lmi: str = "auto") -> _Option:
    if _import_ort() is None:
        return _Option(why_not="no onnxruntime (not installed)", fix=f"install it: {INSTALL_CPU}")
    graph = _graph(bundle, spec, precision, ("fp32", "fp16"))
    if isinstance(graph, str):
        return _Option(why_not=graph, fix="pick a precision the bundle has (--precision)")
    from .onnxruntime.runner import onnxrt_factory
    chosen, path = graph
    plain = onnxrt_factory(_source(bundle, spec, chosen), ["CPUExecutionProvider"], threads=threads,
                           precision=chosen, name="onnxruntime-cpu")
    if model != "diffusion":
        return _Option(plain, chosen, path)
    parsed, note = _native_lmi(bundle, spec, chosen, lmi)
    if parsed is None:
        return _Option(plain, chosen, path, lmi="onnx", lmi_note=note)
    from .onnxruntime.split_lmi import split_lmi_factory
    factory = split_lmi_factory(parsed, threads=threads, precision=chosen, name="onnxruntime-cpu")
    return _Option(factory, chosen, path, lmi="native", lmi_note=note)


def select_backend(
    bundle: Bundle,
    model: str = "generator",
    requested: Requested = "auto",
    precision: str | None = None,
    *,
    domain: str | None = None,
    cuda_graph: bool = False,
    threads: int | None = None,
    lmi: str | None = None,
) -> tuple[RunnerFactory, Choice]:
    """Choose how to run ``bundle``'s ``model`` (``diffusion`` needs ``domain``).

    ``lmi`` (default ``auto``): where a diffusion step on onnxruntime-cpu runs its LMI
    (module docstring).

    Returns ``(runner_factory, choice)``: call the factory for an inactive runner;
    ``choice.reason`` is the line to print, e.g. ``picked onnxruntime-cpu fp32: no TensorRT
    (not installed), no CUDA provider``. Raises BackendError when ``requested`` cannot
    run (or, for ``auto``, when nothing can), naming why and what to install.
    """
    if requested not in ("auto",) + BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; choose auto, {', '.join(BACKENDS)}")
    spec = bundle.model(model, domain)
    mode = lmi_mode(lmi)
    probes: dict[str, Callable[[], _Option]] = {
        "tensorrt": lambda: _tensorrt(bundle, spec, precision, cuda_graph),
        "onnxruntime-cuda": lambda: _onnxruntime_cuda(bundle, spec, precision, cuda_graph, threads),
        "onnxruntime-cpu": lambda: _onnxruntime_cpu(bundle, spec, precision, threads, model, mode),
    }

    def choice(name: str, option: _Option, reason: str) -> Choice:
        reason += f"; {option.lmi_note}" if option.lmi_note else ""
        return Choice(name, option.precision, reason, option.file, option.lmi)

    if requested != "auto":
        option = probes[requested]()
        if option.factory is None:
            raise BackendError(f"--backend {requested} cannot run the {model}: {option.why_not}; {option.fix}")
        reason = f"picked {requested} {option.precision}: asked for with --backend {requested}"
        return option.factory, choice(requested, option, reason)
    skipped: list[str] = []
    fixes: list[str] = []
    for name, probe in probes.items():
        option = probe()
        if option.factory is not None:
            notes = skipped or ([option.note] if option.note else [])
            reason = f"picked {name} {option.precision}" + (f": {', '.join(notes)}" if notes else "")
            return option.factory, choice(name, option, reason)
        skipped.append(option.why_not)
        fixes.append(option.fix)
    raise BackendError(f"no backend can run the {model}: {', '.join(skipped)}; {fixes[-1]}")


def select_lmi(bundle: Bundle, spec: DiffusionEntry, choice: Choice, threads: int | None = None) -> RunnerFactory:
    """The runner of LMI(source, source) for a diffusion step that runs as ``choice`` (module
    docstring): a matching ``lmi`` engine on TensorRT, the native CPU kernel, or ``lmi.onnx``."""
    from .. import lmi_native
    if choice.name == "tensorrt":
        engine, _, _ = _matching_engine(list(spec.lmi_engines))
        if engine is not None:
            return _trt_factory(bundle, engine)
    if choice.lmi == "native" or (choice.name == "tensorrt" and lmi_native.native_unavailable_reason() is None):
        from .native_lmi import native_lmi_factory
        return native_lmi_factory(spec.lmi, threads=threads)
    from .onnxruntime.runner import onnxrt_factory
    cuda = choice.name == "onnxruntime-cuda"
    providers = cuda_providers() if cuda else ["CPUExecutionProvider"]
    return onnxrt_factory(lambda: bundle.graph_source(spec.lmi_graph), providers, threads=threads, precision="fp32",
                          name="onnxruntime-cuda" if cuda else "onnxruntime-cpu")
