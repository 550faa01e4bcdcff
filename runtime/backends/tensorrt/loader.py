"""Deserialize TensorRT engines lazily (Polygraphy's ``EngineFromBytes``).

``tensorrt`` (or the lean runtime ``tensorrt_lean``) is imported when the loader is
called, never at module import. Written against the public TensorRT 10 Python API
(``Logger``, ``Runtime.deserialize_cuda_engine``); not runnable on the development
machines (no GPU, no TensorRT), so it is tested with fake ``tensorrt`` / ``tensorrt_lean``
modules.

Version-compatible engines (built with ``BuilderFlag.VERSION_COMPATIBLE``, ``galip-export
--version-compatible``) carry the lean runtime that runs them: the runtime must be allowed
to execute that host code (``Runtime.engine_host_code_allowed = True``). The lean runtime
``tensorrt_lean`` deserialises nothing but such engines, so the loader refuses the others
there with one line instead of a failed deserialisation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Union

from ...errors import BackendError
from ... import device_info

INSTALL_GPU = "pip install 'galip[gpu]'"


def import_tensorrt() -> Any:
    """The TensorRT module, or BackendError saying how to install it."""
    trt = device_info.import_tensorrt()
    if trt is None:
        raise BackendError(
            f"TensorRT is not installed (neither tensorrt nor tensorrt_lean imports); {INSTALL_GPU}, "
            "or use --backend onnxruntime-cpu"
        )
    return trt


class EngineFromBytes:
    """Loader: ``EngineFromBytes(path)()`` -> ``tensorrt.ICudaEngine``.

    Args:
        engine: path of a serialized engine (``.engine``/``.plan``), its bytes, or a
            callable returning either.
        log_level: TensorRT logger severity name (``ERROR``, ``WARNING``, ``INFO``).
        version_compatible: the engine was built version-compatible (manifest
            ``"version_compatible": true``); required where only ``tensorrt_lean`` imports.

    The ``tensorrt.Runtime`` that deserialized the engine is kept on the loader
    (``self.runtime``) because the engine must not outlive it.
    """

    def __init__(self, engine: Union[str, Path, bytes, Callable[[], Union[str, Path, bytes]]],
                 log_level: str = "WARNING", version_compatible: bool = False):
        self.engine = engine
        self.log_level = log_level
        self.version_compatible = version_compatible
        self.runtime = None
        self.logger = None

    def __call__(self) -> Any:
        trt = import_tensorrt()
        if device_info.tensorrt_is_lean(trt) and not self.version_compatible:
            raise BackendError("only tensorrt_lean is installed, which runs version-compatible engines "
                               "only; re-export with galip-export --version-compatible or install full "
                               f"TensorRT ({INSTALL_GPU})")
        source = self.engine() if callable(self.engine) else self.engine
        where = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
        if isinstance(source, (str, Path)):
            try:
                source = Path(source).read_bytes()
            except OSError as error:
                raise BackendError(f"cannot read TensorRT engine {where}: {error.strerror}; check the bundle") from None
        self.logger = trt.Logger(getattr(trt.Logger, self.log_level, trt.Logger.WARNING))
        self.runtime = trt.Runtime(self.logger)
        if self.version_compatible:      # the plan embeds the lean runtime that executes it
            self.runtime.engine_host_code_allowed = True
        engine = self.runtime.deserialize_cuda_engine(bytes(source))
        if engine is None:
            raise BackendError(
                f"TensorRT {getattr(trt, '__version__', '?')} could not deserialize {where} "
                "(built for another TensorRT version or GPU, or a plugin is missing); "
                "re-export the engine on this machine or use --backend onnxruntime-cpu"
            )
        return engine
