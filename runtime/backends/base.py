"""The runner protocol every backend implements (Polygraphy's loader/runner split).

A *loader* stores its arguments and builds the session or engine only when called. A
*runner* wraps what a loader builds::

    with OnnxrtRunner(SessionFromOnnx("generator.onnx")) as runner:   # activate()
        out = runner.infer({"image": x, "domain": d})                # dict[str, ndarray]
        print(runner.last_inference_time)                            # seconds
    # deactivate(): everything activate() made is released

Subclasses implement ``activate_impl``, ``infer_impl``, ``deactivate_impl`` and
``io_metadata_impl``; this base class owns the state checks, input validation and timing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from ..contract.graphs import STEP_CARRY as DIFFUSION_CARRY   # step graph input ← output of the step before
from ..errors import BackendError

Shape = tuple[int | str | None, ...]   # ints are fixed, str/None are dynamic dimensions


@dataclass(frozen=True)
class TensorMeta:
    """Name, numpy dtype and shape (``str``/``None`` for a dynamic dimension) of one tensor."""

    name: str
    dtype: np.dtype
    shape: Shape

    def __str__(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class Runner:
    """Base runner: a context manager with ``infer(feed) -> outputs`` and per-call timing.

    Attributes: ``name`` (backend, e.g. ``onnxruntime-cpu``), ``precision`` (``fp32``,
    ``fp16``), ``last_inference_time`` (seconds of the last :meth:`infer`, ``None`` before),
    ``inference_times`` (every call since activation), ``is_active``.
    """

    def __init__(self, name: str, precision: str = "fp32"):
        self.name = name
        self.precision = precision
        self.is_active = False
        self.last_inference_time: float | None = None
        self.inference_times: list[float] = []
        self._inputs: dict[str, TensorMeta] = {}
        self._outputs: dict[str, TensorMeta] = {}

    # -- to implement ------------------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def io_metadata_impl(self) -> tuple[list[TensorMeta], list[TensorMeta]]:
        """(inputs, outputs) metadata; called once right after ``activate_impl``."""
        raise NotImplementedError

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------
    def activate(self) -> "Runner":
        """Build the session/engine and any buffers; returns ``self``."""
        if self.is_active:
            raise BackendError(f"runner {self.name} is already active; deactivate it before activating again")
        self.activate_impl()
        self.is_active = True
        try:
            inputs, outputs = self.io_metadata_impl()
        except BaseException:
            self.deactivate()
            raise
        self._inputs = {m.name: m for m in inputs}
        self._outputs = {m.name: m for m in outputs}
        self.inference_times = []
        return self

    def deactivate(self) -> None:
        """Release everything :meth:`activate` made. Safe to call twice."""
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- metadata ----------------------------------------------------------------------
    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise BackendError(f"runner {self.name} is not active; use 'with runner:' or call activate() before {what}")

    @property
    def input_metadata(self) -> dict[str, TensorMeta]:
        self._require_active("reading input_metadata")
        return dict(self._inputs)

    @property
    def output_metadata(self) -> dict[str, TensorMeta]:
        self._require_active("reading output_metadata")
        return dict(self._outputs)

    @property
    def input_names(self) -> list[str]:
        return list(self.input_metadata)

    @property
    def output_names(self) -> list[str]:
        return list(self.output_metadata)

    # -- inference ---------------------------------------------------------------------
    def prepare_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names and ranks; cast dtypes of the same kind (float32 -> float16, int32 -> int64).

        Raises BackendError naming the offending input and the fix.
        """
        self._require_active("infer()")
        expected = ", ".join(str(m) for m in self._inputs.values())
        missing = [n for n in self._inputs if n not in feed]
        extra = [n for n in feed if n not in self._inputs]
        if missing or extra:
            what = f"missing {missing}" if missing else f"unknown {extra}"
            raise BackendError(f"{self.name}: feed has {what} inputs; the graph expects {expected}")
        prepared = {}
        for name, meta in self._inputs.items():
            array = np.asarray(feed[name])
            if array.ndim != len(meta.shape):
                raise BackendError(
                    f"{self.name}: input {name!r} has shape {array.shape}, expected rank {len(meta.shape)} ({meta})"
                )
            for got, want in zip(array.shape, meta.shape):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise BackendError(f"{self.name}: input {name!r} has shape {array.shape}, expected {meta}")
            if array.dtype != meta.dtype:
                if not np.can_cast(array.dtype, meta.dtype, casting="same_kind"):
                    raise BackendError(
                        f"{self.name}: input {name!r} is {array.dtype}, expected {meta.dtype}; "
                        f"convert it with .astype(np.{meta.dtype})"
                    )
                array = array.astype(meta.dtype)
            prepared[name] = np.ascontiguousarray(array)
        return prepared

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once: host arrays in, host arrays out (by output name); records the time."""
        prepared = self.prepare_feed(feed)
        start = time.perf_counter()
        outputs = self.infer_impl(prepared)
        self.last_inference_time = time.perf_counter() - start
        self.inference_times.append(self.last_inference_time)
        return outputs

    def run_loop(
        self,
        init: Mapping[str, np.ndarray],
        steps: Iterable[Mapping[str, np.ndarray]],
        carry: Mapping[str, str] = DIFFUSION_CARRY,
    ) -> dict[str, np.ndarray]:
        """Run once per item of ``steps``, feeding each output ``carry[input]`` back as ``input``.

        ``init`` holds every input of the first step; each item of ``steps`` the inputs
        that change at that step (timestep, noise, ...), merged over the previous feed.
        Returns the outputs of the last step. This host-side version is the reference; the
        TensorRT runner overrides it to keep the carried tensors on the device.
        """
        feed = dict(init)
        outputs: dict[str, np.ndarray] = {}
        for index, update in enumerate(steps):
            feed.update(update)
            if index:
                feed.update({name: outputs[out] for name, out in carry.items()})
            outputs = self.infer(feed)
            missing = [out for out in carry.values() if out not in outputs]
            if missing:
                raise BackendError(f"{self.name}: run_loop carries {missing} but the graph outputs {list(outputs)}")
        return outputs


RunnerFactory = Callable[[], Runner]
"""A zero-argument callable that makes a (not yet activated) runner."""


def resolve_dims(meta: TensorMeta, bound: Mapping[str, int]) -> tuple[int, ...] | None:
    """Concrete shape of ``meta`` given dynamic dimension names bound from the inputs, or None."""
    dims = []
    for dim in meta.shape:
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
        elif isinstance(dim, str) and dim in bound:
            dims.append(bound[dim])
        else:
            return None
    return tuple(dims)


def bind_dims(inputs: Iterable[TensorMeta], feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Map each named dynamic input dimension (``N``, ``H``, ...) to its size in ``feed``."""
    bound: dict[str, int] = {}
    for meta in inputs:
        for dim, size in zip(meta.shape, feed[meta.name].shape):
            if isinstance(dim, str):
                bound.setdefault(dim, int(size))
    return bound
