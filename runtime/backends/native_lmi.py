"""LMI(x, y) on the native CPU kernel as a runner with the LMI graph's inputs and outputs.

Stands in for ``lmi.onnx`` (LMI(source, source), once per slice batch) where the step runs on
the native kernel or on TensorRT without a usable ``lmi`` engine. Its parameters are the
manifest's ``lmi`` entry (the very settings export built ``lmi.onnx`` from), so the graph is
never parsed: neither ``onnx`` nor ``onnxruntime`` is needed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .. import lmi_native
from ..contract import LMI_GRAPH_INPUTS, LMI_GRAPH_OUTPUTS, LMI_X, LMI_Y, LmiParams
from ..errors import BackendError
from .base import Runner, TensorMeta

NAME = "native-cpu"


class NativeLmiRunner(Runner):
    """``infer({x, y}) -> {lmi, y_at}`` with :func:`galip.runtime.lmi_native.lmi_numpy`."""

    def __init__(self, params: LmiParams, *, threads: int | None = None, name: str = NAME):
        super().__init__(name, "fp32")
        self.params, self.threads = params, threads

    def activate_impl(self) -> None:
        why = lmi_native.native_unavailable_reason()   # builds the kernel on first use
        if why is not None:
            raise BackendError(why)

    def io_metadata_impl(self) -> tuple[list[TensorMeta], list[TensorMeta]]:
        meta = lambda names: [TensorMeta(n, np.dtype(np.float32), ("N", 1, "H", "W")) for n in names]  # noqa: E731
        return meta(LMI_GRAPH_INPUTS), meta(LMI_GRAPH_OUTPUTS)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = lmi_native.lmi_numpy(feed[LMI_X], feed[LMI_Y], **self.params.kwargs(), num_threads=self.threads)
        return dict(zip(LMI_GRAPH_OUTPUTS, results))

    def deactivate_impl(self) -> None:
        pass


def native_lmi_factory(params: LmiParams, *, threads: int | None = None) -> Callable[[], NativeLmiRunner]:
    """A zero-argument callable making an (inactive) :class:`NativeLmiRunner`."""
    return lambda: NativeLmiRunner(params, threads=threads)
