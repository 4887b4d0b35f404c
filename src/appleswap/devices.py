"""Where tensors run: the default device for ``--device`` and host-to-GPU copies that do not stall the host.

Core helpers every stage may use (the model, the pipeline, the identity encoder and the commands)."""

from __future__ import annotations

import torch


def pick_device(requested: str | None) -> str:
    """The torch device string for ``--device`` (cuda when available and nothing was asked)."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def upload(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """``tensor`` (on the host) moved to ``device`` without making the host wait: a copy from pageable memory waits
    for the GPU's queue to drain (the VAE encode at the start of a swap) before the host may prepare the rest.
    Through pinned memory (the caching host allocator keeps it until the copy has run) it is queued instead."""
    if device is None or torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
