"""Merged fp8 condition weights (``fp8_condition``): ``W + s B A`` quantised once from full precision, the
condition rows of each fused group multiplied by it (two GEMMs over row slices, one output), the LoRA kept apart
once it changes, and none of it under sequential offload (tiny models on the CPU; the GPU path through
``torch._scaled_mm``, which this CPU build runs, with ``scaled_mm_supported`` patched)."""

from __future__ import annotations

import logging

import pytest
import torch

import appleswap.speed.fp8_linear as fp8_lib
from appleswap.model.lora import routed_linear
from appleswap.speed import fp8_condition, fusion
from appleswap.speed.fp8_linear import FP8_MAX, dequantize_fp8, quantize_fp8
from tests.speed.test_fp8_fusion import _bf16, _relative, _strong_lora
from tests.speed.test_speed_options import _call, _full_model, _inputs


def _exact_merged(layer) -> torch.Tensor:
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    return layer.base_layer.weight.float() + layer.scaling["default"] * b @ a


@torch.no_grad()
def test_merged_weight_is_rounded_once_from_full_precision():
    model = _full_model()
    _strong_lora(model, 3.0)
    layer = model.flux.single_transformer_blocks[0].proj_mlp
    exact = _exact_merged(layer)
    weight = layer.base_layer.weight.detach().clone()
    model.quantize_fp8()
    base = layer.base_layer
    assert base.condition_fp8.shape == base.weight_fp8.shape and base.condition_scale.shape == (exact.shape[0],)
    merged = dequantize_fp8(base.condition_fp8, base.condition_scale, torch.float32)
    # one e4m3 rounding (3 mantissa bits) of W + s B A: within 1/16 of each entry near the top of its row
    big = exact.abs() >= exact.abs().amax(dim=1, keepdim=True) / 8
    assert ((merged - exact).abs() <= exact.abs() * 2**-4 * 1.001)[big].all()
    assert base.condition_scale.max() <= exact.abs().amax() / FP8_MAX * 1.001
    # merging into the already rounded W would round twice: further from W + s B A
    w8, scale = quantize_fp8(weight, "row")
    twice = dequantize_fp8(*quantize_fp8(dequantize_fp8(w8, scale, torch.float32) + exact - weight, "row"),
                           torch.float32)
    assert (merged - exact).norm() < 0.9 * (twice - exact).norm()
    # not merged: layers outside the fused groups (AdaLN), or without the option
    assert getattr(model.flux.transformer_blocks[0].norm1.linear.base_layer, "condition_lora", None) is None
    plain = _full_model()
    plain.quantize_fp8(merge_condition=False)
    assert getattr(plain.flux.single_transformer_blocks[0].proj_mlp.base_layer, "condition_lora", None) is None


@torch.no_grad()
@pytest.mark.parametrize("gpu_path", [False, True])
def test_merged_condition_weights_compute_the_lora_on_condition_rows_only(monkeypatch, gpu_path):
    model, inp = _full_model(), _inputs(batch=2)  # two samples: four row ranges, two per weight
    _strong_lora(model)
    if gpu_path:
        inp = _bf16(model, inp)
        monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)
        monkeypatch.setattr(fp8_condition, "scaled_mm_supported", lambda device: True)
    reference = _call(model, inp)
    model.flux.disable_adapters()
    reference_off = _call(model, inp)
    model.flux.enable_adapters()
    model.quantize_fp8()
    try:
        separate = _call(model, inp)  # fp8 base layers, the LoRA apart in the model dtype
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")
    model.fuse_projections()
    group = fusion.fused_projection(model.flux.single_transformer_blocks[1], "qkv_mlp")
    assert group.condition is not None and group.condition.ready() and not group.fold_ready()
    assert group.weight_fp8.shape[1] == 32  # no folded LoRA columns
    member = model.flux.single_transformer_blocks[1].attn.to_k.base_layer
    assert member.condition_fp8.data_ptr() == group.condition.weight_fp8[32:].data_ptr()  # a view: no copy
    ranges = []
    original = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm",
                        lambda *a, **k: ("out" in k and ranges.append(a[0].shape[0])) or original(*a, **k))
    merged = _call(model, inp)
    lora_effect = _relative(reference, reference_off)
    assert lora_effect > 0.02, lora_effect  # the LoRA matters here, so dropping it would fail below
    # another fp8 rounding of the same function: as close to full precision as the separate fp8 layers
    assert _relative(merged, reference) < 1.2 * _relative(separate, reference) < 0.5 * lora_effect
    if gpu_path:  # per sample, two row ranges in each of 3 groups per double block and 2 per single block, but
        # the last single block's proj_out runs on its image rows alone (one plain GEMM, no condition rows)
        doubles, singles = 2 * 3 * 2 * 2, 2 * 2 * 2 * 2 - 2 * 2  # the image / condition rows are 256 each
        assert len(ranges) == doubles + singles and ranges.count(256) == doubles + singles // 2
    else:
        assert ranges == []
    # the condition rows only: a pass without condition tokens is the base product
    model.unfuse_projections()
    without = _call(model, dict(inp, condition=None))
    model.fuse_projections()
    torch.testing.assert_close(_call(model, dict(inp, condition=None)), without, rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_changed_lora_runs_apart_and_reload_merges_again(tmp_path, caplog):
    model, inp = _full_model(), _inputs()
    _strong_lora(model)
    path = model.save_lora(tmp_path / "lora.safetensors")
    model.quantize_fp8()
    model.fuse_projections()
    model.enable_cuda_graphs()  # falls back to eager on the CPU; a stale group must record anew
    merged = _call(model, inp)
    runner = model.graph_runner
    layer = model.flux.single_transformer_blocks[0].attn.to_v
    layer.lora_B["default"].weight.mul_(-2)  # in place: the merged copy no longer holds this LoRA
    with caplog.at_level(logging.WARNING):
        changed = _call(model, inp)
    assert "LoRA changed after fp8 quantisation" in caplog.text and model.graph_runner is not runner
    group = fusion.fused_projection(model.flux.single_transformer_blocks[0], "qkv_mlp")
    assert group.condition.stale and not group.condition.ready()
    assert _relative(changed, merged) > 0.01
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(1))  # the stale group: the LoRA apart
    for got, layer in zip(fusion.routed_fused(group, x, 24), group.layers, strict=True):
        torch.testing.assert_close(got, routed_linear(layer, x, 24), rtol=1e-5, atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model.fuse_projections()  # fused again with a LoRA that the merged weights do not hold: folded instead
    assert "1 fused fp8 groups fold the LoRA in" in caplog.text
    group = fusion.fused_projection(model.flux.single_transformer_blocks[0], "qkv_mlp")
    assert group.condition is None and group.fold_ready()
    model.load_lora(path)  # the LoRA they were merged with: merged again, the first output exactly
    group = fusion.fused_projection(model.flux.single_transformer_blocks[0], "qkv_mlp")
    assert group.condition is not None and group.condition.ready()
    torch.testing.assert_close(_call(model, inp), merged, rtol=0, atol=0)
    model.flux.disable_adapters()  # switched off: the base product on every row, as the layers would
    assert not group.condition.ready()
    off = _call(model, inp)
    model.unfuse_projections()
    torch.testing.assert_close(off, _call(model, inp), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sequential_offload_frees_the_merged_weights():
    model = _full_model()
    model.quantize_fp8()
    layers = [m for m in model.flux.modules() if getattr(m, "condition_lora", None) is not None]
    assert len(layers) == 2 * 5 + 2 * 5  # double: q, k, v, to_out, ff.net.2; single: q, k, v, proj_mlp, proj_out
    model.enable_sequential_offload("cpu")
    assert all(not hasattr(m, "condition_fp8") and m.condition_lora is None for m in layers)
