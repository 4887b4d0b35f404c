"""Whole-pass CUDA graphs: one transformer pass (compiled regions included) recorded once per input signature and
replayed as a single launch, so the ~2,000 kernels of a pass cost no per-kernel CPU time or launch gaps.

Inputs are copied into the graph's static tensors before each replay; a tensor that is the same object, unchanged
since the last replay (the text embeddings, the condition, the ID tokens and the modulation rows of one swap), is
not copied again. The output is returned as a fresh tensor. CUDA only, no autograd; elsewhere the function runs as
it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside tuples, lists, dicts and dataclasses (in a fixed order)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {field.name: map_tensors(getattr(value, field.name), fn) for field in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value


def signature(args: Any) -> tuple:
    """What a recorded graph depends on: tensor shapes, dtypes, devices and strides, and every other leaf's value."""
    tensors: list = []
    map_tensors(args, lambda t: tensors.append((tuple(t.shape), t.dtype, str(t.device), t.stride())))
    leaves = repr(map_tensors(args, lambda t: None))
    return tuple(tensors), leaves


@dataclasses.dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static input tensors, in map_tensors order
    output: torch.Tensor
    seen: list  # (tensor, version) copied in last time, to skip unchanged inputs


class CudaGraphRunner:
    """Calls ``fn(*args, **kwargs)`` through CUDA graphs recorded per :func:`signature` (all sharing one memory pool).

    Args:
        fn: a function of tensors (and plain values) returning one tensor; no host synchronisation inside.
        warmup: eager calls on a side stream before recording (lets compiled code and cuBLAS settle).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.recordings: dict[tuple, _Recording] = {}
        self.pool = None

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        tensors: list[torch.Tensor] = []
        map_tensors((args, kwargs), tensors.append)
        if torch.is_grad_enabled() or not tensors or not all(t.is_cuda for t in tensors):
            return self.fn(*args, **kwargs)
        key = signature((args, kwargs))
        recording = self.recordings.get(key)
        if recording is None:
            recording = self.recordings[key] = self._record(args, kwargs, tensors)
        for index, (static, tensor) in enumerate(zip(recording.inputs, tensors, strict=True)):
            last, version = recording.seen[index]
            if tensor is not last or tensor._version != version:
                static.copy_(tensor)
                recording.seen[index] = (tensor, tensor._version)
        recording.graph.replay()
        return recording.output.clone()

    def _record(self, args, kwargs, tensors: list[torch.Tensor]) -> _Recording:
        statics = [tensor.clone() for tensor in tensors]
        order = iter(statics)
        static_args, static_kwargs = map_tensors((args, kwargs), lambda _: next(order))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*static_args, **static_kwargs)
        return _Recording(graph, statics, output, [(tensor, tensor._version) for tensor in tensors])
