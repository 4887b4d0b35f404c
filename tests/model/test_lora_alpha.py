"""M5: a LoRA trained with lora_alpha != rank is used at the same scale after saving and loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from appleswap.model import lora as lora_lib
from appleswap.model.latents import image_ids
from appleswap.model.transformer import AppleTransformer
from tests.fixtures.tiny_flux import build_tiny_transformer, one_thread, tiny_text  # noqa: F401

IDS = image_ids(64, 64, vae_scale=2)
RANK, ALPHA = 4, 16.0  # scale 4 (the authors: alpha = rank, scale 1)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 256, 64, generator=generator), torch.randn(1, 256, 64, generator=generator),
            tiny_text(1), torch.tensor([0.6]), torch.tensor([1.0]))


def _trained() -> AppleTransformer:
    """A fresh alpha != rank LoRA as training adds it, with non-zero B (as after some steps)."""
    model = AppleTransformer(build_tiny_transformer())
    model.add_lora(rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.flux.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@torch.no_grad()
def _velocity(model: AppleTransformer) -> torch.Tensor:
    x, cond, text, t, g = _inputs()
    return model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g)


def test_saved_lora_loads_at_the_training_scale(tmp_path):
    trained = _trained()
    assert trained.flux.x_embedder.scaling["default"] == ALPHA / RANK
    path = trained.save_lora(tmp_path / "default.safetensors")
    loaded = AppleTransformer(build_tiny_transformer())
    loaded.load_lora(path)
    assert loaded.flux.x_embedder.scaling["default"] == ALPHA / RANK
    expected = _velocity(trained)
    torch.testing.assert_close(_velocity(loaded), expected, rtol=1e-5, atol=1e-6)
    unit = AppleTransformer(build_tiny_transformer())  # the same weights at scale 1 give another output
    unit.load_lora(_without_metadata(path, tmp_path / "bare.safetensors"))
    assert unit.flux.x_embedder.scaling["default"] == 1.0  # files without alpha: the authors' scale
    assert (_velocity(unit) - expected).abs().max() > 1e-3


def test_alpha_is_stored_the_way_diffusers_reads_it(tmp_path):
    path = _trained().save_lora(tmp_path / "default.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == RANK and meta["transformer.lora_alpha"] == ALPHA
    flux = build_tiny_transformer()  # diffusers' loader, as FluxPipeline.load_lora_weights calls it
    flux.load_lora_adapter(str(path), adapter_name="default", prefix="transformer", use_safetensors=True)
    assert flux.transformer_blocks[0].attn.to_q.scaling["default"] == ALPHA / RANK


def test_resumed_training_keeps_the_scale(tmp_path):
    from appleswap.train.checkpoint import restore_lora

    trained = _trained()
    path = trained.save_lora(tmp_path / "default.safetensors")
    resumed = AppleTransformer(build_tiny_transformer())
    resumed.add_lora(rank=RANK, alpha=ALPHA)
    restore_lora(resumed, path)
    torch.testing.assert_close(_velocity(resumed), _velocity(trained), rtol=1e-5, atol=1e-6)


def test_bad_metadata_is_a_clear_error(tmp_path):
    path = _trained().save_lora(tmp_path / "default.safetensors")
    tensors = lora_lib.read_lora_file(path)
    save_file({"transformer." + k: v for k, v in tensors.items()}, str(tmp_path / "bad.safetensors"),
              metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(ValueError, match="lora_adapter_metadata"):
        AppleTransformer(build_tiny_transformer()).load_lora(tmp_path / "bad.safetensors")


def _without_metadata(path, target):
    tensors = lora_lib.read_lora_file(path)
    save_file({"transformer." + k: v for k, v in tensors.items()}, str(target))
    return target
