"""Condition-only LoRA routing and the ID residual's weight against independent expectations (tiny models):
the hand formula W x + b + (alpha / r) B A x on condition rows and W x + b elsewhere, an equivalent LoRA-free
input, finite-difference gradients, and "weight 0 = no ID" in both the inference and the training (autograd)
path. Written against the public forward so they hold through refactors of the blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from appleswap.model import lora as lora_lib
from appleswap.model.latents import image_ids
from appleswap.model.loading import build_id_attentions_from_weights
from appleswap.model.transformer import AppleTransformer
from tests.fixtures.tiny_flux import build_tiny_transformer, id_attention_state, tiny_id_tokens, tiny_text

IDS = image_ids(64, 64, vae_scale=2)  # (256, 3)
RANK, ALPHA = 4, 8.0  # scaling alpha / r = 2, so a dropped or inverted scaling shows


def _lora_layer(seed=0):
    flux = build_tiny_transformer()
    lora_lib.add_condition_lora(flux, ["transformer_blocks.0.attn.to_q"], RANK, alpha=ALPHA, init=False)
    layer = flux.transformer_blocks[0].attn.to_q
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return layer


def _by_hand(layer, x, start):
    """W x + b on every row, plus (alpha / r) B A x on rows >= start, from the raw weight tensors."""
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = torch.einsum("bni,oi->bno", x, weight) + bias
    delta = (ALPHA / RANK) * torch.einsum("bnr,or->bno", torch.einsum("bni,ri->bnr", x, down), up)
    rows = torch.arange(x.shape[1]) >= (x.shape[1] if start is None else start)
    return out + delta * rows[None, :, None]


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("start", [None, 0, 3, 7, 10, 12])
def test_routed_linear_is_the_hand_formula(grad, start):
    layer = _lora_layer()
    x = torch.randn(2, 10, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):
        routed = lora_lib.routed_linear(layer, x, start)
    torch.testing.assert_close(routed, _by_hand(layer, x, start), rtol=1e-5, atol=1e-5)
    if start is not None and start < 10:
        assert (routed[:, start:] - _by_hand(layer, x, None)[:, start:]).abs().max() > 1e-2  # the LoRA acts


def test_text_rows_and_plain_layers_never_see_the_lora():
    layer = _lora_layer()
    x = torch.randn(1, 5, layer.in_features)
    torch.testing.assert_close(lora_lib.base_linear(layer, x), _by_hand(layer, x, None), rtol=1e-5, atol=1e-5)
    plain = torch.nn.Linear(layer.in_features, 3)
    torch.testing.assert_close(lora_lib.routed_linear(plain, x, 2), plain(x))
    torch.testing.assert_close(lora_lib.base_linear(plain, x), plain(x))
    assert lora_lib.is_lora_layer(layer) and not lora_lib.is_lora_layer(plain)


def test_disabled_adapter_is_the_base_layer():
    layer = _lora_layer()
    x = torch.randn(1, 6, layer.in_features)
    layer.enable_adapters(False)
    torch.testing.assert_close(lora_lib.routed_linear(layer, x, 2), _by_hand(layer, x, None), rtol=1e-5, atol=1e-5)
    assert lora_lib.lora_delta(layer, x) is None


def _inputs(batch=2, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 256, 64, generator=generator, dtype=dtype)
    cond = torch.randn(batch, 256, 64, generator=generator, dtype=dtype)
    return x, cond, tiny_text(batch).to(dtype=dtype), torch.tensor([0.7, 0.3][:batch], dtype=dtype), \
        torch.tensor([1.0, 3.5][:batch], dtype=dtype)


@torch.no_grad()
def test_x_embedder_lora_acts_as_a_changed_condition_only():
    """With a LoRA on x_embedder alone, routing it to condition tokens is the same as feeding the LoRA-free model
    a condition c' whose embedding is W c + s B A c (c' = c + pinv(W) s B A c), with the image tokens untouched."""
    flux = build_tiny_transformer()
    plain = AppleTransformer(copy.deepcopy(flux))
    lora_lib.add_condition_lora(flux, ["x_embedder"], RANK, alpha=ALPHA, init=False)
    embedder = flux.x_embedder
    generator = torch.Generator().manual_seed(3)
    for param in (embedder.lora_A["default"].weight, embedder.lora_B["default"].weight):
        param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    model = AppleTransformer(flux)
    x, cond, text, t, g = _inputs()
    down, up = embedder.lora_A["default"].weight.double(), embedder.lora_B["default"].weight.double()
    delta = (ALPHA / RANK) * cond.double() @ down.T @ up.T  # (B, 256, inner)
    shifted = cond.double() + delta @ torch.linalg.pinv(embedder.base_layer.weight.double()).T
    ours = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g)
    torch.testing.assert_close(ours, plain(x, t, text=text, img_ids=IDS, condition=shifted.float(), guidance=g),
                               rtol=1e-4, atol=1e-4)
    assert (ours - plain(x, t, text=text, img_ids=IDS, condition=cond, guidance=g)).abs().max() > 1e-3
    # without condition tokens the LoRA is never applied: the image tokens alone see the frozen embedder
    torch.testing.assert_close(model(x, t, text=text, img_ids=IDS, guidance=g),
                               plain(x, t, text=text, img_ids=IDS, guidance=g), rtol=0, atol=1e-6)


def _full_lora_model(dtype=torch.float64):
    flux = build_tiny_transformer().to(dtype)
    modules = lora_lib.apple_target_modules(len(flux.transformer_blocks), len(flux.single_transformer_blocks))
    lora_lib.add_condition_lora(flux, modules, RANK, alpha=ALPHA, init=False)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in flux.named_parameters():
            if ".lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator, dtype=dtype))
    model = AppleTransformer(flux)
    model.requires_grad_(False)
    for param in model.lora_parameters():
        param.requires_grad_(True)
    return model


def test_lora_gradients_match_finite_differences_parameter_by_parameter():
    """Every LoRA tensor's autograd gradient, checked along a random direction against a central difference of
    the loss (float64): the ones the condition cannot reach (e.g. what only edits condition outputs of the last
    block) must get exactly zero, all others their true derivative."""
    model = _full_lora_model()
    x, cond, text, t, g = _inputs(dtype=torch.float64)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def loss():
        return ((model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g) - target) ** 2).mean()

    loss().backward()
    generator = torch.Generator().manual_seed(11)
    named = [(n, p) for n, p in model.flux.named_parameters() if ".lora_" in n]
    pairs, eps = {}, 1e-5
    for name, param in named:
        direction = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        analytic = float((param.grad * direction).sum()) if param.grad is not None else 0.0
        with torch.no_grad():
            param.add_(eps * direction)
            up = float(loss())
            param.sub_(2 * eps * direction)
            down = float(loss())
            param.add_(eps * direction)
        pairs[name] = (analytic, (up - down) / (2 * eps))
    largest = max(abs(numeric) for _, numeric in pairs.values())
    for name, (analytic, numeric) in pairs.items():  # parts of the model compute in float32: 1 % + 0.1 % of max
        assert abs(analytic - numeric) <= 1e-2 * abs(numeric) + 1e-3 * largest, (name, analytic, numeric)
    reached = {name for name, (_, numeric) in pairs.items() if abs(numeric) > 1e-2 * largest}
    assert len(reached) >= len(named) // 2  # most of the LoRA is trained through the condition tokens
    assert any("x_embedder" in n for n in reached)


def test_no_condition_keeps_the_lora_out_of_the_graph():
    model = _full_lora_model(torch.float32)
    x, _, text, t, g = _inputs()
    assert not model(x, t, text=text, img_ids=IDS, guidance=g).requires_grad


def _id_model():
    flux = build_tiny_transformer()
    state = id_attention_state(flux)
    layers = build_id_attentions_from_weights(
        {i: {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"pulid_ca.{i}.")} for i in range(2)},
        flux)
    return AppleTransformer(flux, layers)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_id_weight_scales_the_id_residual_in_both_paths(grad):
    """id_weight 0 is exactly "no ID" and 1 is not, with autograd on (training) as well as off (inference)."""
    model = _id_model()
    x, cond, text, t, g = _inputs()
    ids = tiny_id_tokens(2)
    with torch.set_grad_enabled(grad):
        none = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g)
        zero = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g, id_tokens=ids, id_weight=0.0)
        full = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g, id_tokens=ids, id_weight=1.0)
        half = model(x, t, text=text, img_ids=IDS, condition=cond, guidance=g, id_tokens=ids, id_weight=0.5)
    torch.testing.assert_close(zero, none, rtol=0, atol=1e-6)
    assert (full - none).abs().max() > 1e-3
    # the residual grows with the weight: half way is nearer to no ID than the full weight is
    assert 0.2 < float((half - none).detach().norm() / (full - none).detach().norm()) < 0.8
