"""onnxruntime backend: :class:`SessionFromOnnx` loader and :class:`OnnxrtRunner` (IO binding)."""
from .loader import SessionFromOnnx, cuda_providers, provider_really_loads
from .runner import OnnxrtRunner, onnxrt_factory

__all__ = ["SessionFromOnnx", "OnnxrtRunner", "cuda_providers", "onnxrt_factory", "provider_really_loads"]
