"""Samplers on a linear toy field with a closed form, guidance formulas, and parity with FluxPipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from appleswap.sampling import (
    combine_guidance,
    get_schedule,
    inversion_sigmas,
    invert,
    sample_euler,
    sample_midpoint,
    with_batched_guidance,
    with_id_guidance,
    with_image_guidance,
)
from tests.fixtures.tiny_flux import one_thread  # noqa: F401

RATE = 1.3


def linear_field(x, sigma):
    """dx/dsigma = RATE * x: exact flow x(s1) = x(s0) * exp(RATE (s1 - s0))."""
    return RATE * x


def test_schedule_matches_spec_and_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = get_schedule(28, 1024)
    assert sigmas.shape == (29,) and sigmas[0] == 1 and sigmas[-1] == 0
    expected = [1.0, 0.981, 0.961, 0.940, 0.919, 0.896, 0.873, 0.849, 0.824, 0.799, 0.772, 0.744, 0.715, 0.684]
    assert np.allclose(sigmas[:14].numpy(), expected, atol=1.5e-3)
    assert abs(float(sigmas[-2]) - 0.065) < 1e-3
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=0.63)
    torch.testing.assert_close(scheduler.sigmas, sigmas, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(0, 1024)


def test_euler_and_midpoint_converge_at_their_order():
    x1 = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    exact = x1 * math.exp(-RATE)
    errors = {}
    for steps in (8, 16):
        sigmas = get_schedule(steps, 256, shift=False)
        errors[("euler", steps)] = (sample_euler(linear_field, x1, sigmas, disable=True) - exact).abs().max()
        errors[("mid", steps)] = (sample_midpoint(linear_field, x1, sigmas, disable=True) - exact).abs().max()
    assert 1.7 < errors[("euler", 8)] / errors[("euler", 16)] < 2.3  # first order
    assert 3.4 < errors[("mid", 8)] / errors[("mid", 16)] < 4.6  # second order
    assert errors[("mid", 16)] < errors[("euler", 16)] / 10


def test_inversion_then_regeneration_reconstructs_and_improves_with_steps_and_order():
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))

    def round_trip(steps, order):
        sigmas = get_schedule(steps, 1024)
        noise = invert(linear_field, x0, sigmas, order=order, disable=True)
        sampler = sample_euler if order == 1 else sample_midpoint
        return (sampler(linear_field, noise, sigmas, disable=True) - x0).abs().max()

    first = [round_trip(steps, 1) for steps in (7, 14, 28)]
    second = [round_trip(steps, 2) for steps in (7, 14, 28)]
    assert first[0] > first[1] > first[2] and second[0] > second[1] > second[2]
    assert second[2] < first[2] / 10
    # the inverted endpoint itself against the closed form
    sigmas = get_schedule(28, 1024)
    exact = x0 * math.exp(RATE)
    err1 = (invert(linear_field, x0, sigmas, disable=True) - exact).abs().max()
    err2 = (invert(linear_field, x0, sigmas, order=2, disable=True) - exact).abs().max()
    assert err2 < err1 / 10


def test_parity_wrong_midpoint_is_the_reference_update():
    seen = []

    def field(x, sigma):
        seen.append((x.clone(), float(sigma[0])))
        return x * sigma[:, None] + 1

    x0 = torch.ones(1, 2)
    sigmas = torch.tensor([0.5, 0.0])
    out = invert(field, x0, sigmas, order=2, parity_wrong_midpoint=True, disable=True)
    # the second evaluation is at the ORIGINAL latent with the midpoint time: x + h v(x, s + h/2)
    assert torch.equal(seen[1][0], x0) and seen[1][1] == pytest.approx(0.25)
    torch.testing.assert_close(out, x0 + 0.5 * (x0 * 0.25 + 1))
    seen.clear()
    invert(field, x0, sigmas, order=2, disable=True)
    assert not torch.equal(seen[1][0], x0)  # the true midpoint moves the latent
    with pytest.raises(ValueError, match="order"):
        invert(field, x0, sigmas, order=3)
    with pytest.raises(ValueError, match="parity_wrong_midpoint"):
        invert(field, x0, sigmas, parity_wrong_midpoint=True)


def test_partial_inversion_resumes_at_the_reached_noise_level():
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    sigmas = get_schedule(28, 1024)
    tail = inversion_sigmas(sigmas, 10)
    assert tail.shape == (11,) and tail[-1] == 0 and tail[0] == sigmas[18]
    noisy = invert(linear_field, x0, tail, disable=True)
    torch.testing.assert_close(noisy, x0 * math.exp(RATE * float(tail[0])), rtol=0.05, atol=0)
    rebuilt = sample_euler(linear_field, noisy, tail, disable=True)
    error = (rebuilt - x0).abs().max() / x0.abs().max()
    assert error < 0.06
    # the reference's bug (regenerating from sigma = 1 over the full schedule) lands far away
    wrong = sample_euler(linear_field, noisy, sigmas, disable=True)
    assert (wrong - x0).abs().max() / x0.abs().max() > 5 * error
    with pytest.raises(ValueError, match="inverse_steps"):
        inversion_sigmas(sigmas, 29)


def test_guidance_formulas():
    x, s = torch.randn(2, 3), torch.ones(2)
    full = lambda x, s: x + 1.0
    black = lambda x, s: x - 2.0
    null_id = lambda x, s: 0.5 * x
    v, vb, vn = full(x, s), black(x, s), null_id(x, s)
    torch.testing.assert_close(with_image_guidance(full, black, 2.5)(x, s), vb + 2.5 * (v - vb))
    torch.testing.assert_close(with_id_guidance(full, null_id, 1.7)(x, s), vn + 1.7 * (v - vn))
    assert with_image_guidance(full, black, 1.0) is full
    both = with_batched_guidance(lambda x, s: (full(x, s), black(x, s), null_id(x, s)), 2.5, 1.7)(x, s)
    torch.testing.assert_close(both, v + 1.5 * (v - vb) + 0.7 * (v - vn))
    only_id = with_batched_guidance(lambda x, s: (full(x, s), null_id(x, s)), 1.0, 1.7)(x, s)
    torch.testing.assert_close(only_id, vn + 1.7 * (v - vn))
    with pytest.raises(ValueError, match="black"):
        combine_guidance(v, image_scale=2.0)


@torch.no_grad()
def test_sampler_equals_flux_pipeline_latents():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from appleswap.model.latents import image_ids, prepare_noise
    from appleswap.model.transformer import AppleTransformer
    from tests.fixtures.tiny_flux import SCHEDULER, build_tiny_transformer, build_tiny_vae, tiny_text

    flux, text = build_tiny_transformer(), tiny_text(1)
    config = {k: v for k, v in SCHEDULER.items() if not k.startswith("_")}
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**config), vae=build_tiny_vae(),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=flux)
    reference = pipe(prompt_embeds=text.prompt_embeds, pooled_prompt_embeds=text.pooled, height=64, width=64,
                     num_inference_steps=4, guidance_scale=3.5, generator=torch.Generator().manual_seed(0),
                     output_type="latent").images
    model = AppleTransformer(flux)
    ids = image_ids(64, 64, vae_scale=2)
    noise = prepare_noise(1, 64, 64, generator=torch.Generator().manual_seed(0), vae_scale=2)
    ours = sample_euler(lambda x, s: model(x, s, text=text, img_ids=ids, guidance=torch.full_like(s, 3.5)),
                        noise, get_schedule(4, 256), disable=True)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
