"""The pseudo-triplet generator runs the swap pipeline: the result is the inversion of docs/method.md written out by
hand."""

from __future__ import annotations

import pytest
import torch

from appleswap.model.latents import decode_tokens, encode_images, image_ids, vae_scale_factor
from appleswap.pipeline import SwapPipeline, derived_seed
from appleswap.sampling import invert, sample_euler
from appleswap.train.pseudo_gen import PseudoGenerator
from tests.fixtures.tiny_flux import make_tiny_weights, one_thread, tiny_id_tokens  # noqa: F401


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


def _by_hand(pipe: SwapPipeline, target, condition, source, null, steps: int) -> torch.Tensor:
    """Invert the target (posterior mode) under its condition latent (posterior sample from seed 0's condition
    stream) and the null ID, then regenerate from that noise with the source ID and the same condition; decode."""
    model, vae = pipe.transformer, pipe.vae
    ids = image_ids(64, 64, vae_scale=vae_scale_factor(vae))
    cond = encode_images(vae, condition, sample=True,
                         generator=torch.Generator().manual_seed(derived_seed(0, "condition")))
    sigmas = pipe.schedule(steps, ids.shape[0])
    guidance = torch.ones(1)

    def velocity(id_tokens):
        return lambda x, sigma: model(x, sigma, text=pipe.text, img_ids=ids, condition=cond, id_tokens=id_tokens,
                                      guidance=guidance)

    noise = invert(velocity(null), encode_images(vae, target), sigmas, disable=True)
    return decode_tokens(vae, sample_euler(velocity(source), noise, sigmas, disable=True), 64, 64)


@torch.no_grad()
def test_pseudo_triplet_is_the_teacher_inversion_swap(weights):
    null, source = tiny_id_tokens(1, seed=9), tiny_id_tokens(1, seed=4)
    teacher = SwapPipeline.from_pretrained(weights, "teacher", dtype=torch.float32, device="cpu", null_id=null)
    generator = PseudoGenerator(teacher, num_steps=3)
    torch.manual_seed(0)
    target, condition = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    out = generator.swap(target, condition, source[0])
    assert out.shape == (1, 3, 64, 64) and out.device.type == "cpu"
    torch.testing.assert_close(out, _by_hand(teacher, target, condition, source, null, 3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(generator.swap(target, condition, source[0]), out, rtol=0, atol=0)  # seeded
    other = generator.swap(target, condition, tiny_id_tokens(1, seed=11)[0])
    assert (other - out).abs().max() > 1e-3  # the source identity reaches the image
    student = SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="teacher"):
        PseudoGenerator(student)
