"""Samplers, inversion and guidance as plain functions over ``model(x, sigma) -> velocity``."""

from appleswap.sampling.guidance import combine_guidance, with_batched_guidance, with_id_guidance, with_image_guidance
from appleswap.sampling.samplers import inversion_sigmas, invert, sample_euler, sample_midpoint
from appleswap.sampling.schedule import compute_mu, get_schedule, shift_sigmas

__all__ = ["combine_guidance", "compute_mu", "get_schedule", "inversion_sigmas", "invert", "sample_euler",
           "sample_midpoint", "shift_sigmas", "with_batched_guidance", "with_id_guidance", "with_image_guidance"]
