"""Fused fp8 projections (``Fp8FusedProjection``): the stacked fp8 layers compute what the separate fp8 layers
compute, the fp8-folded LoRA stays within e4m3 rounding of the LoRA kept apart, a changed ``lora_B`` is re-read,
and unfusing gives every layer its own storage back (tiny models on the CPU; the GPU path through
``torch._scaled_mm``, which this CPU build runs, with ``scaled_mm_supported`` patched)."""

from __future__ import annotations

import pytest
import torch

import appleswap.speed.fp8_linear as fp8_lib
from appleswap.speed import fp8_condition, fusion
from appleswap.speed.fp8 import Fp8FusedProjection
from appleswap.speed.fp8_linear import FP8, FP8_MAX, quantize_lora_columns
from tests.speed.test_speed_options import _call, _full_model, _inputs


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _bf16(model, inp):
    model.flux.to(torch.bfloat16)
    model.id_attentions.to(torch.bfloat16)
    inp = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
           for k, v in inp.items()}
    inp["text"] = inp["text"].to(dtype=torch.bfloat16)
    return inp


def _strong_lora(model, factor: float = 30.0) -> None:
    """The tiny fixture's LoRA barely moves the output; scale every B up so that the delta is measurable."""
    for name, param in model.flux.named_parameters():
        if "lora_B" in name:
            param.data.mul_(factor)


def test_quantize_lora_columns_bounds_the_error_and_keeps_zero_columns():
    generator = torch.Generator().manual_seed(0)
    lora_b = torch.randn(64, 8, generator=generator) * torch.logspace(-4, 0, 8)  # columns of very different size
    lora_b[:, 3] = 0
    row_scale = torch.rand(64, generator=generator) * 0.01 + 1e-3  # the base weight's row scales
    quantized, column = quantize_lora_columns(lora_b, row_scale)
    assert quantized.dtype == FP8 and column.shape == (8,)
    values = quantized.float()
    assert torch.isfinite(values).all() and values.abs().max() <= FP8_MAX
    assert column[3] == 1 and (values[:, 3] == 0).all()
    back = values * column * row_scale[:, None]
    # each column's largest entry sits near the top of e4m3's range: 3 mantissa bits, so 1/16 per entry
    big = lora_b.abs() >= lora_b.abs().amax(dim=0) / 8
    assert ((back - lora_b).abs() <= lora_b.abs() * 2**-4 * 1.001)[big].all()


@torch.no_grad()
def test_fused_fp8_equals_separate_fp8_layers_and_shares_their_storage():
    model, inp = _full_model(), _inputs()
    model.quantize_fp8()
    separate = _call(model, inp)
    assert model.fuse_projections(fold_lora=False) == 4
    block = model.flux.single_transformer_blocks[0]
    group = fusion.fused_projection(block, "qkv_mlp")
    assert isinstance(group, Fp8FusedProjection) and group.weight_fp8.dtype == FP8
    # the layers' fp8 weights, scales and biases are views of the stacked buffers: no second copy
    assert block.attn.to_k.base_layer.weight_fp8.data_ptr() == group.weight_fp8[32:].data_ptr()
    assert block.attn.to_k.base_layer.weight_scale.data_ptr() == group.weight_scale[32:].data_ptr()
    torch.testing.assert_close(_call(model, inp), separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_call(model, dict(inp, condition=None)),
                               _reference_without_condition(inp), rtol=1e-5, atol=1e-5)
    model.unfuse_projections()
    assert block.attn.to_k.base_layer.weight_fp8.data_ptr() != group.weight_fp8[32:].data_ptr()
    torch.testing.assert_close(_call(model, inp), separate, rtol=1e-5, atol=1e-5)


def _reference_without_condition(inp):
    model = _full_model()
    model.quantize_fp8()
    with torch.no_grad():
        return _call(model, dict(inp, condition=None))


@torch.no_grad()
@pytest.mark.parametrize("gpu_path", [False, True])
def test_fp8_folded_lora_stays_within_e4m3_rounding_of_the_lora_apart(monkeypatch, gpu_path):
    model, inp = _full_model(), _inputs()
    _strong_lora(model)
    if gpu_path:  # activations quantised per token, torch._scaled_mm (runs on this CPU build), bf16
        inp = _bf16(model, inp)
        monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)
    reference = _call(model, inp)
    model.quantize_fp8(merge_condition=False)  # the folded form (merged condition weights: test_fp8_condition)
    calls = []
    original = fp8_lib.scaled_matmul
    monkeypatch.setattr(fp8_lib, "scaled_matmul", lambda *a: calls.append(1) or original(*a))
    try:
        separate = _call(model, inp)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")
    model.flux.disable_adapters()
    no_lora = _call(model, inp)
    model.flux.enable_adapters()
    model.fuse_projections()
    group = fusion.fused_projection(model.flux.single_transformer_blocks[1], "qkv_mlp")
    assert group.fold_ready() and group.weight_fp8.shape[1] == 32 + 16  # 4 members x rank 4 LoRA columns
    calls.clear()
    folded = _call(model, inp)
    assert (len(calls) > 0) == gpu_path
    delta = _relative(separate, no_lora)
    assert delta > 0.02, delta  # the LoRA matters here, so a fold that dropped it would fail below
    if gpu_path:
        # [x | z'] is quantised as one row, so the base product rounds differently too: two fp8 roundings of the
        # same function, each as close to full precision as the other
        assert _relative(folded, separate) < 0.5 * delta, (_relative(folded, separate), delta)
        assert _relative(folded, reference) < 1.1 * _relative(separate, reference)
    else:
        # weight-only (activations unquantised): the difference is B's e4m3 rounding alone (~2^-5 relative)
        assert _relative(folded, separate) < 0.1 * delta, (_relative(folded, separate), delta)


@torch.no_grad()
def test_fp8_folded_lora_rereads_a_changed_b_and_falls_back_when_switched_off():
    model, inp = _full_model(), _inputs()
    _strong_lora(model)
    model.quantize_fp8(merge_condition=False)
    model.fuse_projections()
    folded = _call(model, inp)
    layer = model.flux.single_transformer_blocks[0].attn.to_v
    layer.lora_B["default"].weight.mul_(-2)  # in place: the fused fp8 copy must follow
    changed = _call(model, inp)
    assert _relative(changed, folded) > 0.01
    model.unfuse_projections()
    torch.testing.assert_close(changed, _call(model, inp), rtol=0.05, atol=0.05)
    separate_changed = _call(model, inp)
    assert _relative(changed, separate_changed) < 0.1 * _relative(separate_changed, folded)
    model.fuse_projections()
    model.flux.disable_adapters()  # not foldable now: the LoRA is left out, as the layers would
    group = fusion.fused_projection(model.flux.transformer_blocks[0], "qkv")
    assert not group.fold_ready()
    no_lora = _call(model, inp)
    model.unfuse_projections()
    torch.testing.assert_close(no_lora, _call(model, inp), rtol=1e-5, atol=1e-5)


def test_fusing_fp8_needs_row_scales():
    model = _full_model()
    model.quantize_fp8(granularity="tensor")
    with pytest.raises(ValueError, match="row-wise scales"):
        model.fuse_projections()


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
@torch.no_grad()
@pytest.mark.parametrize("merge_condition", [False, True])
def test_compiled_fused_fp8_equals_eager(monkeypatch, merge_condition):
    """The GPU path (fp8 GEMMs with the folded LoRA, or the merged condition weights through the
    ``scaled_mm_rows`` op) under regional torch.compile, as the GPU runs it."""
    monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)
    monkeypatch.setattr(fp8_condition, "scaled_mm_supported", lambda device: True)
    model, inp = _full_model(), _inputs(batch=1)
    _strong_lora(model)
    inp = _bf16(model, inp)
    reference = _call(model, inp)  # bf16, unquantised
    model.quantize_fp8(merge_condition=merge_condition)
    model.fuse_projections()
    assert (fusion.fused_projection(model.flux.transformer_blocks[0], "qkv").condition is not None) == merge_condition
    try:
        eager = _call(model, inp)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")
    torch._dynamo.reset()
    model.compile_blocks()
    try:
        compiled = _call(model, inp)
    except Exception as error:  # no C++ compiler / inductor backend for this build
        if "scaled_mm" in str(error) or "fp8" in str(error).lower():
            raise
        pytest.skip(f"torch.compile unavailable here: {str(error)[:200]}")
    finally:
        torch._dynamo.reset()
    # inductor quantises the fused norm output before rounding it to bf16, so many values land on the other side
    # of an e4m3 rounding boundary: the compiled pass is another fp8 rounding of the same function, as close to the
    # unquantised pass as the eager one (a dropped LoRA would be 3x further: see the test above)
    error = _relative(eager, reference)
    assert _relative(compiled, reference) < 1.2 * error, (_relative(compiled, reference), error)
    assert _relative(compiled, eager) < 1.5 * error, (_relative(compiled, eager), error)


@torch.no_grad()
def test_lora_file_loads_into_a_fused_fp8_model(tmp_path):
    """Loading re-creates the adapter around the fp8 layers and folds it again (the shape check takes fp8 bases)."""
    model, inp = _full_model(), _inputs()
    _strong_lora(model)
    path = model.save_lora(tmp_path / "lora.safetensors")
    model.quantize_fp8(merge_condition=False)
    model.fuse_projections()
    want = _call(model, inp)
    for param in model.lora_parameters():
        param.data.zero_()
    assert _relative(_call(model, inp), want) > 0.02  # the zeroed LoRA is folded in: the output moved
    model.load_lora(path)
    assert model.is_fused() and fusion.fused_projection(model.flux.transformer_blocks[0], "qkv").fold_ready()
    torch.testing.assert_close(_call(model, inp), want, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("fast_accum", [True, False])
def test_every_fp8_gemm_gets_the_models_accumulation_setting(monkeypatch, fast_accum):
    """``quantize_fp8(fast_accum=...)`` reaches each ``torch._scaled_mm`` call, separate layers and fused groups
    alike (fast accumulation is the default: it changes which Hopper kernel runs, not the function)."""
    model, inp = _full_model(), _inputs()
    inp = _bf16(model, inp)
    monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)
    seen = []
    original = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: seen.append(k["use_fast_accum"]) or original(*a, **k))
    model.quantize_fp8(**({} if fast_accum else {"fast_accum": False}))
    try:
        _call(model, inp)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")
    separate = len(seen)
    model.fuse_projections()
    _call(model, inp)
    assert separate > 0 and len(seen) > separate
    assert set(seen) == {fast_accum}
