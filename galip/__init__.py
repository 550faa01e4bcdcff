"""galip: deployment toolkit for unsupervised medical image translation.

Layers (each a top-level folder of the repository, installed under this namespace):
``galip.runtime`` (numpy/nibabel/onnxruntime, never torch) <- ``galip.train`` (PyTorch)
<- ``galip.export`` (ONNX, TensorRT) <- ``galip.bench``.
"""

__version__ = "0.1.0"
