"""Loading PuLID- and APPLE-shaped checkpoints from a tiny weights folder; mis-shaped files fail clearly."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from appleswap.model.latents import decode_tokens, encode_images, image_ids, pack_latents, unpack_latents
from appleswap.model.loading import load_apple_transformer, load_vae
from appleswap.model.text import load_text_embeddings
from tests.fixtures.tiny_flux import (
    FLUX_DIR,
    LORA_FILES,
    PULID_FILE,
    TINY_LORA_RANK,
    make_tiny_weights,
    one_thread,  # noqa: F401
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


def test_loads_pulid_ca_and_lora_with_rank_from_file(weights, tmp_path):
    model = load_apple_transformer(weights / FLUX_DIR, pulid_path=weights / PULID_FILE,
                                   lora_path=weights / LORA_FILES["student"], dtype=torch.float32)
    assert len(model.id_attentions) == 2 and model.has_lora()
    lora_a = model.flux.transformer_blocks[0].attn.to_q.lora_A["default"].weight
    assert lora_a.shape[0] == TINY_LORA_RANK and not lora_a.requires_grad
    original = load_file(str(weights / LORA_FILES["student"]))
    saved = load_file(str(model.save_lora(tmp_path / "again.safetensors")))
    assert set(saved) == set(original)  # reference-compatible keys
    for key, value in original.items():
        torch.testing.assert_close(saved[key], value)
    ca = load_file(str(weights / PULID_FILE))
    torch.testing.assert_close(model.id_attentions[1].to_kv.weight, ca["pulid_ca.1.to_kv.weight"])


def test_lora_rank_check_and_reload(weights):
    with pytest.raises(ValueError, match="rank"):
        load_apple_transformer(weights / FLUX_DIR, lora_path=weights / LORA_FILES["student"], lora_rank=64,
                               dtype=torch.float32)
    model = load_apple_transformer(weights / FLUX_DIR, lora_path=weights / LORA_FILES["student"],
                                   dtype=torch.float32)
    before = model.flux.x_embedder.lora_B["default"].weight.clone()
    model.load_lora(weights / LORA_FILES["teacher"])  # swapping adapters replaces the weights
    assert not torch.equal(before, model.flux.x_embedder.lora_B["default"].weight)


def test_mis_shaped_pulid_fails_clearly(weights, tmp_path):
    state = load_file(str(weights / PULID_FILE))
    state["pulid_ca.0.to_q.weight"] = torch.zeros(32, 48)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="pulid_ca.0"):
        load_apple_transformer(weights / FLUX_DIR, pulid_path=tmp_path / "bad.safetensors", dtype=torch.float32)
    del state["pulid_ca.0.to_q.weight"]
    state = {k: v for k, v in state.items() if not k.startswith("pulid_ca.1.")}
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="pulid_ca"):
        load_apple_transformer(weights / FLUX_DIR, pulid_path=tmp_path / "short.safetensors", dtype=torch.float32)
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no 'pulid_ca"):
        load_apple_transformer(weights / FLUX_DIR, pulid_path=tmp_path / "foreign.safetensors", dtype=torch.float32)
    with pytest.raises(FileNotFoundError):
        load_apple_transformer(weights / FLUX_DIR, pulid_path=tmp_path / "absent.safetensors", dtype=torch.float32)


def test_mis_shaped_lora_fails_clearly(weights, tmp_path):
    state = load_file(str(weights / LORA_FILES["teacher"]))
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    state[key] = torch.zeros(TINY_LORA_RANK, 7)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="to_q.lora_A"):
        load_apple_transformer(weights / FLUX_DIR, lora_path=tmp_path / "bad.safetensors", dtype=torch.float32)
    save_file({"transformer.nonexistent.lora_A.weight": torch.zeros(4, 8),
               "transformer.nonexistent.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="does not exist"):
        load_apple_transformer(weights / FLUX_DIR, lora_path=tmp_path / "foreign.safetensors", dtype=torch.float32)
    save_file({"unet.conv.weight": torch.zeros(2)}, str(tmp_path / "notlora.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA"):
        load_apple_transformer(weights / FLUX_DIR, lora_path=tmp_path / "notlora.safetensors", dtype=torch.float32)


def test_text_embeddings_encoded_once_then_cached(weights, tmp_path):
    flux_copy = tmp_path / "flux"
    shutil.copytree(weights / FLUX_DIR, flux_copy)
    first = load_text_embeddings(flux_copy, "a photo of human face", tmp_path / "cache")
    assert first.prompt_embeds.shape == (1, 8, 32) and first.pooled.shape == (1, 32)
    assert first.text_ids.shape == (8, 3) and not first.text_ids.any()
    for sub in ("text_encoder", "text_encoder_2"):
        shutil.rmtree(flux_copy / sub)  # the cache must make the encoders unnecessary
    again = load_text_embeddings(flux_copy, "a photo of human face", tmp_path / "cache")
    torch.testing.assert_close(again.prompt_embeds, first.prompt_embeds)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_text_embeddings(flux_copy, "another prompt", tmp_path / "cache")


def test_latents_round_trip_and_packing(weights):
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    torch.testing.assert_close(unpack_latents(packed, 8, 6), latents)
    ids = image_ids(64, 48, vae_scale=2)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 16, 12, "cpu", torch.float32))
    vae = load_vae(weights / FLUX_DIR, dtype=torch.float32)
    images = torch.rand(2, 3, 64, 64)
    tokens = encode_images(vae, images)
    assert tokens.shape == (2, 256, 64)
    torch.testing.assert_close(encode_images(vae, images), tokens)  # mode: deterministic
    sampled = encode_images(vae, images, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, tokens)
    decoded = decode_tokens(vae, tokens, 64, 64)
    assert decoded.shape == (2, 3, 64, 64) and decoded.min() >= 0 and decoded.max() <= 1
    with pytest.raises(ValueError, match="multiple of"):
        encode_images(vae, torch.rand(1, 3, 66, 64))


def test_flux_path_forms(weights, tmp_path):
    from appleswap.model.loading import load_flux_transformer

    whole = load_flux_transformer(weights / FLUX_DIR, dtype=torch.float32)
    alone = load_flux_transformer(weights / FLUX_DIR / "transformer", dtype=torch.float32)
    torch.testing.assert_close(whole.x_embedder.weight, alone.x_embedder.weight)
    assert not any(p.requires_grad for p in whole.parameters())
    with pytest.raises(FileNotFoundError, match="flux_path"):
        load_flux_transformer(tmp_path, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="vae"):
        load_vae(tmp_path, dtype=torch.float32)
