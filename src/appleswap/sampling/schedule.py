"""FLUX's flow-matching sigma schedule with the resolution-dependent ("dynamic") shift."""

from __future__ import annotations

import math

import torch


def compute_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
               max_shift: float = 1.15) -> float:
    """Shift exponent mu, linear in the image token count (0.63 for 1024 tokens = 512x512)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """sigma' = e^mu / (e^mu + 1/sigma - 1) (the exponential time shift of FLUX)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def get_schedule(num_steps: int, image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
                 base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True) -> torch.Tensor:
    """Sigmas (num_steps + 1,) float32 from 1 down to a terminal 0, as diffusers' FluxPipeline builds them.

    Args:
        num_steps: Euler steps (28 in APPLE).
        image_seq_len: image tokens (1024 at 512x512).
        shift: apply the dynamic shift (FLUX.1-dev/Krea-dev); False gives the plain linear schedule.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if shift:
        sigmas = shift_sigmas(sigmas, compute_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))
    return torch.cat([sigmas.float(), torch.zeros(1)])


def schedule_from_scheduler_config(config: dict, num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The same schedule with the shift constants read from a diffusers scheduler config."""
    return get_schedule(num_steps, image_seq_len, base_seq_len=config.get("base_image_seq_len", 256),
                        max_seq_len=config.get("max_image_seq_len", 4096), base_shift=config.get("base_shift", 0.5),
                        max_shift=config.get("max_shift", 1.15), shift=config.get("use_dynamic_shifting", True))
