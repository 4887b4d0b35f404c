"""A training step's logged values, left on the GPU until someone reads them.

Reading a GPU value makes the host wait until the GPU has finished everything queued before it; while the host
waits it queues nothing, so the GPU then idles for as long as the host needs to queue the next kernels. A step
that read its losses (and the gradient norm) as floats waited two or three times per step. ``StepLogs`` keeps the
values as tensors and reads all that are still on the device in one transfer, the first time any of them is
read: the training loop reads a step's logs after it has queued the next step, so the GPU always has work.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch


class StepLogs(MutableMapping[str, float]):
    """Name -> float, where a value may still be a (0-d) tensor on the GPU until the first read of one."""

    def __init__(self, values: dict[str, torch.Tensor | float] | None = None) -> None:
        self._values: dict[str, torch.Tensor | float] = dict(values or {})

    @property
    def unread(self) -> list[str]:
        """The names whose values are still tensors (reading one waits for the GPU)."""
        return [name for name, value in self._values.items() if isinstance(value, torch.Tensor)]

    def read(self) -> dict[str, float]:
        """Every value as a float: the values still on the device come over in one transfer."""
        tensors = {name: value for name, value in self._values.items() if isinstance(value, torch.Tensor)}
        if tensors:
            device = next(iter(tensors.values())).device
            floats = torch.stack([value.detach().float().reshape(()).to(device)
                                  for value in tensors.values()]).tolist()
            self._values.update(zip(tensors, floats))
        return dict(self._values)  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> float:
        value = self._values[name]
        return self.read()[name] if isinstance(value, torch.Tensor) else value

    def __setitem__(self, name: str, value: torch.Tensor | float) -> None:
        self._values[name] = value

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StepLogs({self._values!r})"
