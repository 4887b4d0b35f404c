"""The three-branch forward against diffusers' own FLUX forward and PEFT's own LoRA forward (tiny models)."""

from __future__ import annotations

import pytest
import torch

from appleswap.model import lora as lora_lib
from appleswap.model.id_attention import IDCrossAttention
from appleswap.model.latents import image_ids
from appleswap.model.loading import build_id_attentions_from_weights
from appleswap.model.transformer import AppleTransformer
from tests.fixtures.tiny_flux import (
    build_tiny_transformer,
    id_attention_state,
    lora_state,
    one_thread,  # noqa: F401
    tiny_id_tokens,
    tiny_text,
)

IDS = image_ids(64, 64, vae_scale=2)  # (256, 3)


def _stock(flux, x, t, text, ids, guidance):
    return flux(hidden_states=x, encoder_hidden_states=text.prompt_embeds, pooled_projections=text.pooled,
                timestep=t, img_ids=ids, txt_ids=text.text_ids, guidance=guidance).sample


def _lora_model(**overrides) -> AppleTransformer:
    flux = build_tiny_transformer(**overrides)
    model = AppleTransformer(flux)
    state = {k.removeprefix("transformer."): v for k, v in lora_state(flux).items()}
    modules, rank = lora_lib.lora_modules_and_rank(state)
    lora_lib.add_condition_lora(flux, modules, rank, init=False)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(flux, state, adapter_name="default")
    return model


def _inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 256, 64, generator=generator), torch.randn(batch, 256, 64, generator=generator),
            tiny_text(batch), torch.tensor([0.7, 0.3][:batch]), torch.tensor([1.0, 3.5][:batch]))


@torch.no_grad()
def test_no_condition_no_id_equals_diffusers_forward():
    flux = build_tiny_transformer()
    x, _, text, t, g = _inputs()
    ours = AppleTransformer(flux)(x, t, text=text, img_ids=IDS, guidance=g)
    torch.testing.assert_close(ours, _stock(flux, x, t, text, IDS, g), rtol=0, atol=1e-6)


@torch.no_grad()
def test_lora_without_condition_is_the_frozen_model():
    model = _lora_model()
    x, _, text, t, g = _inputs()
    base = build_tiny_transformer()
    torch.testing.assert_close(model(x, t, text=text, img_ids=IDS, guidance=g), _stock(base, x, t, text, IDS, g),
                               rtol=0, atol=1e-6)


@torch.no_grad()
def test_condition_branch_equals_joint_forward_at_t0_without_lora():
    # at t = 0 and guidance 1 the condition and image share one modulation, so the three-branch forward must
    # equal diffusers' forward over the concatenated [image; condition] tokens with duplicated position ids
    flux = build_tiny_transformer()
    x, cond, text, _, _ = _inputs()
    zero, one = torch.zeros(2), torch.ones(2)
    ours = AppleTransformer(flux)(x, zero, text=text, img_ids=IDS, condition=cond, guidance=one)
    joint = _stock(flux, torch.cat([x, cond], 1), zero, text, torch.cat([IDS, IDS]), one)[:, :256]
    torch.testing.assert_close(ours, joint, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_routed_linear_matches_peft_forward_on_condition_slice_only():
    model = _lora_model()
    layer = model.flux.transformer_blocks[0].attn.to_q
    x = torch.randn(2, 10, layer.in_features)
    routed = lora_lib.routed_linear(layer, x, 6)
    torch.testing.assert_close(routed[:, 6:], layer(x[:, 6:]), rtol=1e-6, atol=1e-6)  # PEFT's own forward
    torch.testing.assert_close(routed[:, :6], layer.base_layer(x[:, :6]), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(layer(x[:, :6]), layer.base_layer(x[:, :6]))  # the LoRA does something


def _reference_id_attention(module: IDCrossAttention, ids, image):
    """PuLID's formula written out: q*s @ (k*s)^T with s = head_dim^-1/4, float32 softmax."""
    ids, image = module.norm1(ids), module.norm2(image)
    b, n, _ = image.shape
    q = module.to_q(image).view(b, n, module.heads, -1).transpose(1, 2)
    k, v = module.to_kv(ids).chunk(2, dim=-1)
    k = k.view(b, ids.shape[1], module.heads, -1).transpose(1, 2)
    v = v.view(b, ids.shape[1], module.heads, -1).transpose(1, 2)
    scale = module.head_dim ** -0.25
    weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1)
    return module.to_out((weight @ v).transpose(1, 2).reshape(b, n, -1))


@torch.no_grad()
def test_id_attention_matches_pulid_formula():
    flux = build_tiny_transformer()
    attentions = build_id_attentions_from_weights(
        {i: {k.split(".", 2)[2]: v for k, v in id_attention_state(flux).items() if k.startswith(f"pulid_ca.{i}.")}
         for i in range(2)}, flux)
    ids, image = tiny_id_tokens(2), torch.randn(2, 256, flux.inner_dim)
    torch.testing.assert_close(attentions[0](ids, image), _reference_id_attention(attentions[0], ids, image),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_id_attention_layout_scales_with_depth_and_acts_on_image_only():
    flux = build_tiny_transformer(num_layers=3, num_single_layers=5)
    state = id_attention_state(flux)
    modules = {}
    for key, value in state.items():
        _, index, name = key.split(".", 2)
        modules.setdefault(int(index), {})[name] = value
    model = AppleTransformer(flux, build_id_attentions_from_weights(modules, flux))
    assert len(model.id_attentions) == 4 and model._ca_double == {0: 0, 2: 1} and model._ca_single == {0: 2, 4: 3}
    x, cond, text, t, g = _inputs()
    ids = tiny_id_tokens(1)
    base = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g)
    with_id = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g, id_tokens=ids)
    zero_weight = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g, id_tokens=ids, id_weight=0.0)
    assert (with_id - base).abs().max() > 1e-4
    torch.testing.assert_close(zero_weight, base, rtol=0, atol=1e-6)
    # the last single block's ID-CA (index 3, after single block 4) is the final one applied: perturbing it
    # must change the output; an ID-CA index not in the layout does not exist
    model.id_attentions[3].to_out.weight.mul_(2)
    assert not torch.allclose(model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g, id_tokens=ids),
                              with_id)


def test_gradient_checkpointing_gives_same_gradients():
    x, cond, text, t, g = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = _lora_model()
        model.requires_grad_(False)
        for param in model.lora_parameters():
            param.requires_grad_(True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.lora_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_condition_shape_mismatch_is_rejected():
    model = AppleTransformer(build_tiny_transformer())
    x, _, text, t, g = _inputs()
    with pytest.raises(ValueError, match="condition"):
        model(x, t, text=text, img_ids=IDS, condition=torch.zeros(2, 10, 64), guidance=g)
