"""Inference backends: one ``<name>/`` package per backend with a loader and a runner.

``onnxruntime/`` (CPU, CUDA provider) and ``tensorrt/`` (engines + cuda-python) import
their optional dependencies only when a loader is called; ``select.py`` picks one for a
bundle and says why. Every runner follows :class:`~galip.runtime.backends.base.Runner`.
"""
from .base import Runner, RunnerFactory, TensorMeta

__all__ = ["Runner", "RunnerFactory", "TensorMeta"]
