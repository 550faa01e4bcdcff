"""TensorRT backend: :class:`EngineFromBytes` loader and :class:`TrtRunner` (cuda-python buffers).

``tensorrt`` and ``cuda-python`` are imported only when a loader or runner is used, so this
package imports on machines without them.
"""
from .loader import EngineFromBytes
from .runner import TrtRunner, trt_factory

__all__ = ["EngineFromBytes", "TrtRunner", "trt_factory"]
