"""Fused projections and regional torch.compile must not change the function (tiny fp32 models, CPU)."""

from __future__ import annotations

import pytest
import torch

from appleswap.speed import fusion
from tests.speed.test_speed_options import _call, _full_model, _inputs


@torch.no_grad()
def test_fused_projections_equal_separate_layers_and_share_storage():
    model, inp = _full_model(), _inputs()
    plain = _call(model, inp)
    no_cond = _call(model, dict(inp, condition=None))
    assert model.fuse_projections() == 4
    block = model.flux.single_transformer_blocks[0]
    group = fusion.fused_projection(block, "qkv_mlp")
    assert group.weight.shape[0] == 3 * 32 + 4 * 32  # q, k, v (32 each) and the 4x MLP of the tiny config
    # the layers' weights are views of the stacked buffer: no second copy
    assert block.attn.to_k.base_layer.weight.data_ptr() == group.weight[32:].data_ptr()
    # the rank-4 LoRA of the four members is folded in: 16 extra reduction columns, B matrices are views of them
    assert group.fold_adapter == "default" and group.weight_aug.shape[1] == 32 + 16
    assert block.attn.to_k.lora_B["default"].weight.data_ptr() == group.weight_aug[32:, 32 + 4:].data_ptr()
    assert block.attn.to_k.lora_A["default"].weight.data_ptr() == group.lora_down[4:].data_ptr()
    torch.testing.assert_close(_call(model, inp), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_call(model, dict(inp, condition=None)), no_cond, rtol=1e-5, atol=1e-5)
    modulation = model.condition_modulation(inp["text"])
    torch.testing.assert_close(_call(model, inp, modulation=modulation), plain, rtol=1e-5, atol=1e-5)
    # the LoRA still acts through the fused path: changing one member's B changes the output
    block.attn.to_v.lora_B["default"].weight.mul_(2)
    assert not torch.allclose(_call(model, inp), plain, atol=1e-4)
    block.attn.to_v.lora_B["default"].weight.div_(2)
    model.unfuse_projections()
    assert not hasattr(block, fusion.ATTRIBUTE)
    assert block.attn.to_k.base_layer.weight.data_ptr() != block.attn.to_q.base_layer.weight.data_ptr() + 32 * 32 * 4
    torch.testing.assert_close(_call(model, inp), plain, rtol=1e-5, atol=1e-5)


def test_fused_path_trains_the_same_lora_gradients():
    model, inp = _full_model(), _inputs(batch=1)
    params = model.lora_parameters()
    for param in params:
        param.requires_grad_(True)
    _call(model, inp).square().mean().backward()
    plain = [param.grad.clone() for param in params]
    model.zero_grad(set_to_none=True)
    model.fuse_projections()
    _call(model, inp).square().mean().backward()
    for want, param in zip(plain, params, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-6)


def test_fp8_and_offload_unfuse_first():
    model = _full_model()
    model.fuse_projections()
    model.quantize_fp8()  # quantises the separate layers; fusing again stacks the fp8 ones (test_fp8_fusion.py)
    assert not any(hasattr(block, fusion.ATTRIBUTE) for block in model.flux.single_transformer_blocks)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
@torch.no_grad()
def test_regional_compile_equals_eager_and_reuses_one_graph_per_block_kind():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, inp = _full_model(), _inputs(batch=1)
    eager = _call(model, inp)
    model.fuse_projections()
    model.compile_blocks()
    try:
        compiled = _call(model, inp)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        again = _call(model, dict(inp, latents=inp["latents"] * 0.5, timestep=inp["timestep"] * 0.5))
        torch.testing.assert_close(again, _eager_reference(inp), rtol=1e-4, atol=1e-4)
        # 2 double + 2 single blocks + 3 ID attentions ran: a graph per block kind, and one for the last single
        # block (it returns its image rows alone); a graph per call would give 7 or more
        assert counters["stats"]["unique_graphs"] <= 5
    finally:
        torch._dynamo.reset()


def _eager_reference(inp):
    model = _full_model()
    with torch.no_grad():
        return _call(model, dict(inp, latents=inp["latents"] * 0.5, timestep=inp["timestep"] * 0.5))


@torch.no_grad()
def test_folded_lora_follows_adapter_switches_scaling_and_reloads(tmp_path):
    """The fold is used only while it computes what the layers would: other adapter states fall back."""
    model, inp = _full_model(), _inputs()
    plain = _call(model, inp)
    model.flux.disable_adapters()
    no_lora = _call(model, inp)
    model.flux.enable_adapters()
    layer = model.flux.transformer_blocks[1].ff.net[2]
    layer.scaling["default"] = 20.0  # as PEFT's set_scale does
    scaled = _call(model, inp)
    layer.scaling["default"] = 1.0
    assert (scaled - plain).abs().max() > 1e-3
    path = model.save_lora(tmp_path / "lora.safetensors")
    model.fuse_projections()
    group = fusion.fused_projection(model.flux.transformer_blocks[1], "ff_out")
    assert group.fold_ready()
    model.flux.disable_adapters()
    assert not group.fold_ready()
    torch.testing.assert_close(_call(model, inp), no_lora, rtol=1e-5, atol=1e-5)
    model.flux.enable_adapters()
    layer.scaling["default"] = 20.0
    assert not group.fold_ready()
    torch.testing.assert_close(_call(model, inp), scaled, rtol=1e-5, atol=1e-5)
    layer.scaling["default"] = 1.0
    torch.testing.assert_close(_call(model, inp), plain, rtol=1e-5, atol=1e-5)
    # loading a LoRA into a fused model re-fuses: the new adapter is folded (its Parameters are new objects)
    for param in model.lora_parameters():
        param.data.zero_()
    torch.testing.assert_close(_call(model, inp), no_lora, rtol=1e-5, atol=1e-5)
    model.load_lora(path)
    assert model.is_fused() and fusion.fused_projection(model.flux.transformer_blocks[1], "ff_out").fold_ready()
    torch.testing.assert_close(_call(model, inp), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
@torch.no_grad()
def test_compiled_vae_encodes_and_decodes_as_eager_with_the_same_state_dict():
    from appleswap.benchmark.models import BenchConfig, build_vae
    from appleswap.model.latents import decode_tokens, encode_images
    from appleswap.speed.vae import compile_vae

    torch._dynamo.reset()
    torch.manual_seed(0)
    vae = build_vae(BenchConfig(tiny=True), "cpu", torch.float32)
    images = torch.rand(1, 3, 64, 64)
    tokens = encode_images(vae, images)
    decoded = decode_tokens(vae, tokens, 64, 64)
    keys = list(vae.state_dict())
    try:
        assert compile_vae(vae) is vae
        assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None
        assert list(vae.state_dict()) == keys  # weights load and save under the same names
        torch.testing.assert_close(encode_images(vae, images), tokens, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode_tokens(vae, tokens, 64, 64), decoded, rtol=1e-4, atol=1e-4)
        other = torch.rand(1, 3, 64, 64)  # new inputs: computed, not a replay of the first call
        assert not torch.allclose(encode_images(vae, other), tokens, atol=1e-3)
    finally:
        torch._dynamo.reset()


@torch.no_grad()
def test_graphed_vae_encoder_gives_the_same_latents_through_the_graph_runner():
    """``graph_vae_encoder`` routes encodes (posterior mode and seeded samples) through a CUDA-graph runner that
    returns the posterior's parameters (on the CPU it runs the encoder as it is); switching it off restores the plain
    path."""
    from appleswap.benchmark.models import BenchConfig, build_vae
    from appleswap.model.latents import encode_images
    from appleswap.speed.vae import graph_vae_encoder

    torch.manual_seed(0)
    vae = build_vae(BenchConfig(tiny=True), "cpu", torch.float32)
    images = torch.rand(2, 3, 64, 64)
    mode = encode_images(vae, images)
    sampled = encode_images(vae, images, sample=True, generator=torch.Generator().manual_seed(3))
    graph_vae_encoder(vae)
    calls, run = [], vae.apple_encoder_graph.fn
    vae.apple_encoder_graph.fn = lambda pixels: calls.append(pixels.shape) or run(pixels)
    torch.testing.assert_close(encode_images(vae, images), mode, rtol=0, atol=0)
    torch.testing.assert_close(encode_images(vae, images, sample=True, generator=torch.Generator().manual_seed(3)),
                               sampled, rtol=0, atol=0)
    assert calls == [(2, 3, 64, 64)] * 2
    graph_vae_encoder(vae, False)
    assert not hasattr(vae, "apple_encoder_graph")
    torch.testing.assert_close(encode_images(vae, images), mode, rtol=0, atol=0)


def test_compile_vae_for_training_compiles_the_encoder_only():
    """Training decodes a batch whose size changes every step (the gated samples): only the encoder compiles."""
    from appleswap.benchmark.models import BenchConfig, build_vae
    from appleswap.speed.vae import compile_vae

    vae = build_vae(BenchConfig(tiny=True), "cpu", torch.float32)
    compile_vae(vae, decoder=False)
    assert vae.encoder._compiled_call_impl is not None
    assert vae.decoder._compiled_call_impl is None
