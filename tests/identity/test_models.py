"""EVA-CLIP key conversion against a direct computation on the original keys; IDFormer loading and null ID."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from appleswap.identity.eva_clip import EvaClipVision, EvaConfig, convert_eva_clip_state_dict
from appleswap.identity.idformer import IDFormer, IDFormerConfig
from tests.fixtures.tiny_identity import TINY_EVA, TINY_IDFORMER, eva_original_state, pulid_encoder_state


def _rope_tables(grid: int, head_dim: int, pt_seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-CLIP's VisionRotaryEmbeddingFast tables (interleaved pairs, frequencies interpolated to the grid)."""
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid) / grid * pt_seq
    f = torch.repeat_interleave(torch.outer(t, freqs), 2, dim=-1)  # (grid, half)
    both = torch.cat([f[:, None, :].expand(grid, grid, half), f[None, :, :].expand(grid, grid, half)], dim=-1)
    both = both.reshape(-1, head_dim)
    return both.cos(), both.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _reference_eva(sd: dict, pixels: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EVA02-CLIP vision forward written directly from the ORIGINAL keys (subln attention, SwiGLU, 2D RoPE)."""
    p = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    w, heads = cfg["width"], cfg["heads"]
    hd, grid = w // heads, cfg["image_size"] // cfg["patch_size"]
    ln = lambda x, n: F.layer_norm(x, (x.shape[-1],), p[n + ".weight"], p[n + ".bias"], eps=1e-6)
    x = F.conv2d(pixels, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=cfg["patch_size"])
    x = torch.cat([p["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + p["pos_embed"]
    cos, sin = _rope_tables(grid, hd)
    hidden = []
    for i in range(cfg["depth"]):
        if i in (1, 2, 3, 4, 5):  # depth 6 -> inputs of blocks depth//6 * (1..5)
            hidden.append(x)
        b = f"blocks.{i}."
        h = ln(x, b + "norm1")
        q = F.linear(h, p[b + "attn.q_proj.weight"], p[b + "attn.q_bias"]).unflatten(-1, (heads, hd)).transpose(1, 2)
        k = F.linear(h, p[b + "attn.k_proj.weight"]).unflatten(-1, (heads, hd)).transpose(1, 2)
        v = F.linear(h, p[b + "attn.v_proj.weight"], p[b + "attn.v_bias"]).unflatten(-1, (heads, hd)).transpose(1, 2)
        q = torch.cat([q[:, :, :1], _rotate(q[:, :, 1:], cos, sin)], 2)
        k = torch.cat([k[:, :, :1], _rotate(k[:, :, 1:], cos, sin)], 2)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1) @ v
        attn = ln(attn.transpose(1, 2).flatten(2), b + "attn.inner_attn_ln")
        x = x + F.linear(attn, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        h = ln(x, b + "norm2")
        h = F.silu(F.linear(h, p[b + "mlp.w1.weight"], p[b + "mlp.w1.bias"])) * F.linear(
            h, p[b + "mlp.w2.weight"], p[b + "mlp.w2.bias"])
        x = x + F.linear(ln(h, b + "mlp.ffn_ln"), p[b + "mlp.w3.weight"], p[b + "mlp.w3.bias"])
    cls = F.linear(ln(x, "norm")[:, 0], p["head.weight"], p["head.bias"])
    return F.normalize(cls, dim=-1), hidden


def test_eva_conversion_matches_direct_computation(tmp_path):
    sd = eva_original_state(seed=3)
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save({"state_dict": sd}, path)
    model = EvaClipVision.from_file(path)
    assert model.config == EvaConfig(**TINY_EVA)
    images = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, hidden = model(images)
        want_cls, want_hidden = _reference_eva(sd, model.preprocess(images), TINY_EVA)
    assert cls.shape == (2, TINY_EVA["embed_dim"]) and len(hidden) == 5
    assert hidden[0].shape == (2, (56 // 14) ** 2 + 1, TINY_EVA["width"])
    torch.testing.assert_close(cls, want_cls, atol=1e-4, rtol=1e-4)
    for got, want in zip(hidden, want_hidden):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_eva_conversion_renames_and_drops():
    converted = convert_eva_clip_state_dict(eva_original_state())
    assert "blocks.0.attn.q_proj.bias" in converted and "blocks.0.mlp.fc1_g.weight" in converted
    assert "blocks.0.attn.norm.weight" in converted and "blocks.0.mlp.norm.bias" in converted
    assert not any(k.startswith(("text.", "rope.", "logit")) or "q_bias" in k for k in converted)
    assert EvaConfig().hidden_block_inputs() == (4, 8, 12, 16, 20)


def test_eva_rejects_wrong_checkpoint(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"text.x": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no visual"):
        EvaClipVision.from_file(path)


def test_idformer_loads_strictly_and_null_is_zero_input(tmp_path):
    state = pulid_encoder_state(seed=1)
    path = tmp_path / "pulid.safetensors"
    save_file({**state, "pulid_ca.0.norm1.weight": torch.ones(64)}, str(path))
    model = IDFormer.from_file(path)
    assert model.config == IDFormerConfig(**TINY_IDFORMER)
    null = model.null_tokens(17)
    with torch.no_grad():
        direct = model(torch.zeros(1, model.config.id_dim), [torch.zeros(1, 17, model.config.vit_dim)] * 5)
        other = model(torch.randn(1, model.config.id_dim), [torch.randn(1, 17, model.config.vit_dim)] * 5)
    assert null.shape == (1, 32, TINY_IDFORMER["output_dim"])
    torch.testing.assert_close(null, direct)
    assert not torch.allclose(null, other)


def test_idformer_misshaped_file_fails_clearly(tmp_path):
    state = pulid_encoder_state()
    state["pulid_encoder.mapping_2.3.weight"] = torch.zeros(7, 32)
    path = tmp_path / "pulid.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"pulid\.safetensors.*mapping_2\.3\.weight: file \(7, 32\)"):
        IDFormer.from_file(path)
    save_file({"pulid_ca.0.norm1.weight": torch.ones(4)}, str(path))
    with pytest.raises(ValueError, match="no 'pulid_encoder"):
        IDFormer.from_file(path)
    with pytest.raises(ValueError, match="differs from the expected"):
        save_file(pulid_encoder_state(), str(path))
        IDFormer.from_file(path, expect=IDFormerConfig())
