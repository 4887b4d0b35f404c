"""Memory tiers: sequential block offload of the transformer and model-level offload of the small models.

``BlockOffloader`` keeps the weights of every FLUX block in (pinned) host memory and copies one block to the
device just before it runs, prefetching the next block on a side CUDA stream so the copy overlaps the current
block's compute; after the block the device copy is dropped. Only the blocks' weights move: embedders, norms,
the output head and the ID cross-attentions stay on the device. Outputs are bit-identical to the resident model.
``ModelOffloader`` does the same per whole module (VAE, identity encoder) around each use.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

OFFLOAD_TIERS = ("none", "model", "sequential")


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` (shared ones once)."""
    seen, out = set(), []
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append(tensor)
    return out


class BlockOffloader:
    """Host-resident blocks, loaded to ``device`` one at a time (with ``prefetch`` blocks copied ahead).

    Args:
        blocks: the modules in execution order (double blocks, then single blocks).
        device: where the blocks run.
        pin: page-locked host copies (needed for asynchronous copies; CUDA only).
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, prefetch: int = 1, pin: bool = True):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.prefetch = prefetch
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._host: list[list[torch.Tensor]] = []
        for block in self.blocks:
            host = []
            for tensor in _tensors(block):
                data = tensor.data.to("cpu")
                if cuda and pin:
                    data = data.pin_memory()
                tensor.data = data
                host.append(data)
            self._host.append(host)
        self._pending: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.loads: list[int] = []  # block indices in load order (tests, logging)
        logger.info("sequential offload: %d blocks in host memory%s", len(self.blocks),
                    " (pinned)" if cuda and pin else "")

    def _start_copy(self, index: int) -> None:
        if index >= len(self.blocks) or index in self._pending:
            return
        if self._stream is None:
            self._pending[index] = ([t.to(self.device) for t in self._host[index]], None)
            return
        with torch.cuda.stream(self._stream):
            copies = [t.to(self.device, non_blocking=True) for t in self._host[index]]
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending[index] = (copies, event)

    @contextlib.contextmanager
    def resident(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` on the device for the duration of the ``with`` body (next blocks prefetched)."""
        self._start_copy(index)
        copies, event = self._pending.pop(index)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for copy in copies:
                copy.record_stream(current)  # the allocator must not reuse them before this block has run
        tensors = _tensors(self.blocks[index])
        for tensor, copy in zip(tensors, copies):
            tensor.data = copy
        self.loads.append(index)
        for ahead in range(index + 1, index + 1 + self.prefetch):
            self._start_copy(ahead)
        try:
            yield self.blocks[index]
        finally:
            for tensor, host in zip(tensors, self._host[index]):
                tensor.data = host

    def restore(self) -> None:
        """Undo: every block back on the device for good."""
        self._pending.clear()
        for block, host in zip(self.blocks, self._host):
            for tensor, data in zip(_tensors(block), host):
                tensor.data = data.to(self.device)
        self._host = []


class ModelOffloader:
    """Whole modules kept on the host and moved to ``device`` only around their use (VAE, identity encoder)."""

    def __init__(self, device: torch.device | str, home: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.home = torch.device(home)
        self.moves: list[str] = []  # "in"/"out" per move (tests, logging)

    @contextlib.contextmanager
    def use(self, module: nn.Module | None) -> Iterator[nn.Module | None]:
        if module is None:
            yield module
            return
        module.to(self.device)
        self.moves.append("in")
        try:
            yield module
        finally:
            module.to(self.home)
            self.moves.append("out")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def check_tier(offload: str) -> str:
    if offload not in OFFLOAD_TIERS:
        raise ValueError(f"offload must be one of {OFFLOAD_TIERS}, got {offload!r}")
    return offload
