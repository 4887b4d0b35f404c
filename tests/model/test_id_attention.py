"""PuLID's ID cross-attention against the formula written out in numpy (float64): LayerNorm on each side, one
softmax(Q K^T / sqrt(head_dim)) V per head, heads concatenated, then the output projection; and the layout of
the modules over the blocks (FLUX.1: 10 + 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appleswap.model.id_attention import IDCrossAttention, build_id_attentions, id_attention_layout

DIM, KV_DIM, HEADS, HEAD_DIM = 12, 10, 3, 4


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * weight + bias


def _by_hand(layer: IDCrossAttention, ids: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(B, N, kv_dim), (B, L, dim) -> (B, L, dim), head by head with explicit softmax."""
    p = {name: value.detach().double().numpy() for name, value in layer.state_dict().items()}
    kv = _layer_norm(ids, p["norm1.weight"], p["norm1.bias"]) @ p["to_kv.weight"].T
    inner = HEADS * HEAD_DIM
    keys, values = kv[..., :inner], kv[..., inner:]
    queries = _layer_norm(image, p["norm2.weight"], p["norm2.bias"]) @ p["to_q.weight"].T
    heads = []
    for h in range(HEADS):
        cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        logits = queries[..., cols] @ np.swapaxes(keys[..., cols], -1, -2) / np.sqrt(HEAD_DIM)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads.append(weights @ values[..., cols])
    return np.concatenate(heads, axis=-1) @ p["to_out.weight"].T


def _layer(seed: int = 0) -> IDCrossAttention:
    torch.manual_seed(seed)
    layer = IDCrossAttention(DIM, KV_DIM, HEADS, HEAD_DIM).double()
    with torch.no_grad():  # non-trivial norms, so a swapped norm1 / norm2 shows
        for norm in (layer.norm1, layer.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
        layer.to_q.weight.mul_(3.0)  # peaked attention: a wrong scale or head split changes the result
    return layer


def test_forward_is_the_per_head_attention_formula():
    layer = _layer()
    rng = np.random.default_rng(0)
    ids, image = rng.normal(size=(2, 5, KV_DIM)), rng.normal(size=(2, 7, DIM))
    out = layer(torch.from_numpy(ids), torch.from_numpy(image))
    assert out.shape == (2, 7, DIM)
    np.testing.assert_allclose(out.detach().numpy(), _by_hand(layer, ids, image), rtol=1e-9, atol=1e-10)


def test_precomputed_keys_values_broadcast_over_the_batch():
    """keys_values of one ID (batch 1) serve a batch of image tokens, and id_tokens is then unused."""
    layer = _layer(1)
    rng = np.random.default_rng(1)
    ids, image = rng.normal(size=(1, 6, KV_DIM)), rng.normal(size=(3, 4, DIM))
    kv = layer.keys_values(torch.from_numpy(ids), torch.float64)
    assert kv.shape == (1, 6, 2 * HEADS * HEAD_DIM)
    out = layer(None, torch.from_numpy(image), keys_values=kv)
    expected = _by_hand(layer, np.repeat(ids, 3, axis=0), image)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-9, atol=1e-10)


def test_keys_values_use_the_requested_dtype():
    layer = IDCrossAttention(DIM, KV_DIM, HEADS, HEAD_DIM)
    ids = torch.randn(1, 3, KV_DIM, dtype=torch.float64)
    assert layer.keys_values(ids, torch.float32).dtype == torch.float32


def test_modules_have_the_released_names_and_shapes():
    layers = build_id_attentions(3, DIM, KV_DIM, HEADS, HEAD_DIM)
    assert len(layers) == 3 and layers[0] is not layers[1]
    shapes = {name: tuple(value.shape) for name, value in layers[2].state_dict().items()}
    inner = HEADS * HEAD_DIM
    assert shapes == {"norm1.weight": (KV_DIM,), "norm1.bias": (KV_DIM,), "norm2.weight": (DIM,),
                      "norm2.bias": (DIM,), "to_q.weight": (inner, DIM), "to_kv.weight": (2 * inner, KV_DIM),
                      "to_out.weight": (DIM, inner)}
    assert layers[0].heads == HEADS and layers[0].head_dim == HEAD_DIM


@pytest.mark.parametrize(("double", "single", "want"), [
    (19, 38, (list(range(0, 19, 2)), list(range(0, 38, 4)))),  # FLUX.1: 10 + 10
    (1, 1, ([0], [0])),
    (5, 9, ([0, 2, 4], [0, 4, 8])),
])
def test_layout_every_second_double_and_fourth_single_block(double, single, want):
    assert id_attention_layout(double, single) == want
    if double == 19:
        assert len(want[0]) + len(want[1]) == 20


def test_default_sizes_are_pulid_flux():
    with torch.device("meta"):
        layer = IDCrossAttention()
    shapes = {name: tuple(value.shape) for name, value in layer.state_dict().items()}
    assert shapes == {"norm1.weight": (2048,), "norm1.bias": (2048,), "norm2.weight": (3072,), "norm2.bias": (3072,),
                      "to_q.weight": (2048, 3072), "to_kv.weight": (4096, 2048), "to_out.weight": (3072, 2048)}
    assert layer.heads == 16 and layer.head_dim == 128


def test_id_tokens_are_cast_to_the_image_tokens_dtype():
    layer = _layer(2)  # float64
    rng = np.random.default_rng(2)
    ids, image = rng.normal(size=(1, 4, KV_DIM)).astype(np.float32), rng.normal(size=(1, 3, DIM))
    out = layer(torch.from_numpy(ids), torch.from_numpy(image))  # float32 ID tokens, float64 image tokens
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.detach().numpy(), _by_hand(layer, ids.astype(np.float64), image), rtol=1e-9,
                               atol=1e-10)
