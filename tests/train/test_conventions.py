"""Training and sampling agree on the flow-matching conventions (issue 4's train/sample-mismatch checks).

The exact velocity field of a one-point data distribution {x0} is v*(x, s) = (x - x0) / s. Written in the
training convention (x_t = (1 - t) x0 + t eps, target v = eps - x0, t = 1 is noise), that field must give zero
flow-matching loss on the training noisy latents, its one-step estimate must be x0, and the sampler must carry
noise to x0 over the shifted FLUX schedule. A flipped velocity sign, a reversed time direction or a timestep
scale mismatch (t vs 1000 t) between training and sampling fails these tests. The latents are the real tiny-VAE
encodings of a real test photo.
"""

from __future__ import annotations

import pytest
import torch

from appleswap.sampling import get_schedule, sample_euler
from appleswap.train import losses


@pytest.fixture(scope="module")
def photo_latents(faces_dir) -> torch.Tensor:
    from appleswap.files import load_image
    from appleswap.model.latents import encode_images
    from tests.fixtures.tiny_flux import build_tiny_vae

    image = torch.from_numpy(load_image(faces_dir / "obama.jpg")).permute(2, 0, 1).float()[None] / 255
    image = torch.nn.functional.interpolate(image, size=(64, 64), mode="area")
    return encode_images(build_tiny_vae(), image)  # (1, 256, 64), the sampling path's (mode) latents


def _point_field(x0: torch.Tensor):
    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (x - x0) / sigma.view(-1, 1, 1)

    return velocity


def test_point_field_has_zero_training_loss(photo_latents):
    x0 = photo_latents.expand(4, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = losses.sample_timesteps(4, generator=torch.Generator().manual_seed(1))
    x_t = losses.noisy_latents(x0, noise, t)
    velocity = _point_field(x0)(x_t, t)
    assert losses.flow_matching_loss(velocity, noise, x0).item() < 1e-8
    assert torch.allclose(losses.predicted_x0(x_t, t, velocity), x0, atol=1e-5)
    # the opposite sign (v = x0 - eps) is what a direction mismatch would train: clearly non-zero
    assert losses.flow_matching_loss(-velocity, noise, x0).item() > 1.0


@pytest.mark.parametrize("steps", [4, 28])
def test_sampler_carries_noise_to_the_data_point(photo_latents, steps):
    noise = torch.randn(photo_latents.shape, generator=torch.Generator().manual_seed(2))
    sigmas = get_schedule(steps, photo_latents.shape[1])
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0  # starts at the training t = 1 (pure noise)
    out = sample_euler(_point_field(photo_latents), noise, sigmas, disable=True)
    assert torch.allclose(out, photo_latents, atol=1e-4)
    # the training noising at the schedule's first sigma is the start point the sampler assumes
    start = losses.noisy_latents(photo_latents, noise, sigmas[:1])
    assert torch.allclose(start, noise)
