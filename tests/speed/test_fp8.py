"""fp8 weights (``appleswap.speed.fp8``): quantisation numerics per tensor and per row, the ``torch._scaled_mm``
path (it runs on this CPU build, so it is exercised here), row-wise vs per-tensor error on data with outliers,
zero rows, and ``torch.compile`` giving the eager output with the activation quantisation fused into one kernel.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import appleswap.speed.fp8_linear as fp8_lib
from appleswap.speed.fp8 import quantize_blocks_fp8
from appleswap.speed.fp8_linear import (
    FP8,
    Fp8Linear,
    dequantize_fp8,
    quantize_activation,
    quantize_activation_rows,
    quantize_fp8,
    scaled_matmul,
)
from tests.fixtures.tiny_flux import build_tiny_transformer, one_thread  # noqa: F401

HALF_ULP = 2**-4  # e4m3: 3 mantissa bits; round to nearest is within 1/16 of a normal value


def _relative_error(back: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|error| / |value|, values below the smallest normal (2^-6 of the scale) measured against that normal."""
    return (back - exact).abs() / exact.abs().clamp(min=1e-30).maximum(scale * 2**-6)


def _scaled_mm_or_skip(*args):
    try:
        return scaled_matmul(*args)
    except (RuntimeError, NotImplementedError) as error:  # a build without fp8 GEMMs on this device
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")


def _outlier_layer(channel_factor: float, seed: int = 0) -> nn.Linear:
    """A 256 -> 128 linear with weights of std 0.02 whose first two output channels are ``channel_factor`` larger."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(256, 128)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=generator)
        linear.weight[:2] *= channel_factor
        linear.bias.normal_(0, 0.1, generator=generator)
    return linear


def _outlier_tokens(token_factor: float, seed: int = 1) -> torch.Tensor:
    """64 tokens of 256 unit-normal features; the first two tokens are ``token_factor`` larger (massive
    activations)."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))
    x[:2] *= token_factor
    return x


def _error_on_ordinary_entries(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative L2 error over the ordinary tokens x ordinary channels (the outliers would dominate a global norm)."""
    return ((out - exact)[2:, 2:].norm() / exact[2:, 2:].norm()).item()


def test_per_tensor_quantise_dequantise_numerics():
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    quantized, scale = quantize_fp8(weight)
    assert quantized.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == pytest.approx(weight.abs().max().item() / 448.0)
    back = dequantize_fp8(quantized, scale, torch.float32)
    assert _relative_error(back, weight, scale).max() <= HALF_ULP + 1e-6
    assert (back - weight).abs().max() > 0  # it does round
    assert back.abs().max().item() == pytest.approx(weight.abs().max().item(), rel=1e-6)  # amax maps to 448


def test_rowwise_weight_scales_bound_the_error_of_every_channel():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 48, generator=generator) * 10 ** (-6 * torch.rand(32, 1, generator=generator))
    weight[5] = 0  # a dead channel
    quantized, scale = quantize_fp8(weight, "row")
    assert quantized.shape == weight.shape and scale.shape == (32,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale[6:], weight[6:].abs().amax(1) / 448.0)
    back = dequantize_fp8(quantized, scale, torch.float32)
    assert torch.isfinite(scale).all() and scale[5] > 0 and (back[5] == 0).all()
    per_channel = _relative_error(back, weight, scale[:, None]).amax(1)
    assert per_channel.max() <= HALF_ULP + 1e-6, per_channel
    torch.testing.assert_close(back.abs().amax(1), weight.abs().amax(1), rtol=1e-6, atol=0)  # each amax -> 448
    # one scale for the tensor: the channels six decades down fall below e4m3's normal range and lose the bound
    q_tensor, s_tensor = quantize_fp8(weight, "tensor")
    tensor_error = _relative_error(dequantize_fp8(q_tensor, s_tensor, torch.float32), weight, scale[:, None])
    assert tensor_error.amax(1).max() > 4 * HALF_ULP
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.ones(4), "row")
    with pytest.raises(ValueError, match="granularity"):
        quantize_fp8(weight, "channel")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rowwise_activation_quantisation(dtype):
    x = _outlier_tokens(1e3).to(dtype)
    x[7] = 0
    quantized, scale = quantize_activation_rows(x)
    assert quantized.dtype == FP8 and scale.shape == (64, 1) and scale.dtype == torch.float32
    values = quantized.float()
    assert torch.isfinite(values).all() and torch.isfinite(scale).all() and (values[7] == 0).all()
    assert values.abs().max() <= 448  # no overflow without a clamp pass
    assert (values.abs().amax(1)[torch.arange(64) != 7] >= 440).all()  # every row uses the range
    exact = x.float()
    error = _relative_error(dequantize_fp8(quantized, scale, torch.float32), exact, scale)
    assert error.max() <= HALF_ULP + 1e-6


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_scaled_matmul_matches_dequantised_product(granularity):
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(40, 64, generator=generator).to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear, granularity)
    assert layer.weight_scale.shape == ((32,) if granularity == "row" else ())
    fast = _scaled_mm_or_skip(x, layer.weight_fp8, layer.weight_scale, layer.bias)
    assert fast.dtype == torch.bfloat16 and fast.shape == (40, 32)
    xq, xs = quantize_activation_rows(x) if granularity == "row" else quantize_activation(x)
    reference = dequantize_fp8(xq, xs, torch.float32) @ layer.dequantized_weight(torch.float32).t()
    torch.testing.assert_close(fast.float(), reference + linear.bias.float(), rtol=2e-2, atol=2e-2)
    exact = linear(x).float()
    assert (fast.float() - exact).abs().max() < 0.1 * exact.abs().max()
    # the dequantised path uses the same weight scales (fp16 goes through a bf16 GEMM output)
    weight_only = nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), linear.bias.float())
    layer.use_scaled_mm = False
    torch.testing.assert_close(layer(x).float(), weight_only, rtol=2e-2, atol=2e-2)
    half = _scaled_mm_or_skip(x.half(), layer.weight_fp8, layer.weight_scale, layer.bias)
    assert half.dtype == torch.float16 and (half.float() - exact).abs().max() < 0.1 * exact.abs().max()


def _errors(channel_factor: float, token_factor: float) -> dict[str, float]:
    """Error of the fp8 GEMM (``scaled_mm``) and of the weight-only path against the fp32 ``nn.Linear``."""
    linear, x = _outlier_layer(channel_factor), _outlier_tokens(token_factor)
    with torch.no_grad():
        exact = linear(x)
    errors = {}
    for granularity in ("row", "tensor"):
        layer = Fp8Linear.from_linear(linear, granularity)
        fast = _scaled_mm_or_skip(x, layer.weight_fp8, layer.weight_scale, layer.bias)
        errors[f"{granularity} gemm"] = _error_on_ordinary_entries(fast, exact)
        errors[f"{granularity} weight-only"] = _error_on_ordinary_entries(layer(x), exact)
    return errors


@pytest.mark.parametrize("channel_factor, token_factor", [(1, 3e4), (3e4, 1), (3e4, 3e4)])
def test_row_scales_beat_a_tensor_scale_on_large_outliers(channel_factor, token_factor):
    """Outliers beyond e4m3's normal range (2^15) push the ordinary entries under one tensor scale into the
    subnormals; per-row scales keep them at the 3-bit-mantissa error. Measured: see the module's report."""
    errors = _errors(channel_factor, token_factor)
    assert errors["row gemm"] < 0.05 and errors["row weight-only"] < 0.04, errors
    assert errors["row gemm"] * 2 < errors["tensor gemm"], errors
    if channel_factor > 1:  # only weight outliers touch the weight-only path
        assert errors["row weight-only"] * 2 < errors["tensor weight-only"], errors


def test_row_scales_are_no_worse_on_moderate_outliers():
    """Within e4m3's exponent range a tensor scale costs little precision: row scales match it (not better)."""
    errors = _errors(100, 1000)
    assert errors["row gemm"] < 1.1 * errors["tensor gemm"] and errors["row gemm"] < 0.05, errors
    assert errors["row weight-only"] < 1.1 * errors["tensor weight-only"], errors


@torch.no_grad()
def test_zero_rows_stay_finite(monkeypatch):
    monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)
    linear = _outlier_layer(1).to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    x = _outlier_tokens(1).to(torch.bfloat16).reshape(4, 16, 256)
    x[1] = 0  # a whole batch item of zeros (padding)
    x[2, 3] = 0
    try:
        out = layer(x)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")
    assert out.shape == (4, 16, 128) and torch.isfinite(out).all()
    torch.testing.assert_close(out[1], linear.bias.expand(16, 128), rtol=0, atol=0)  # 0 @ W + b
    torch.testing.assert_close(out[2, 3], linear.bias, rtol=0, atol=0)


def _compile_or_skip(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    try:
        out, code = run_and_get_code(torch.compile(module, fullgraph=True), x)
    except Exception as error:  # no C++ compiler, no inductor backend for this build
        if "scaled_mm" in str(error):
            raise
        pytest.skip(f"torch.compile unavailable here: {str(error)[:200]}")
    return out, "\n".join(code)


@torch.no_grad()
def test_compiled_fp8_linear_equals_eager_and_fuses_the_quantisation(monkeypatch):
    monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)  # the GPU path, on the CPU
    layer = Fp8Linear.from_linear(_outlier_layer(10).to(torch.bfloat16))
    x = _outlier_tokens(100).to(torch.bfloat16).reshape(2, 32, 256)
    x[1, 5] = 0
    try:
        eager = layer(x)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")
    compiled, code = _compile_or_skip(layer, x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    # abs + row amax + divide + cast in one generated kernel
    kernels = set(re.findall(r"\b(?:cpp|triton)_\w*amax\w*", code))
    assert len(kernels) == 1 and all(op in next(iter(kernels)) for op in ("abs", "div", "to_copy")), kernels
    # the dequantised (weight-only) path compiles to the eager function as well
    layer.use_scaled_mm = False
    compiled, _ = _compile_or_skip(layer, x.float())
    torch.testing.assert_close(compiled, layer(x.float()), rtol=1e-5, atol=1e-5)


def test_quantize_blocks_granularity():
    flux = build_tiny_transformer(num_layers=1, num_single_layers=1)
    count = quantize_blocks_fp8(flux, granularity="tensor")
    layers = [m for m in flux.modules() if isinstance(m, Fp8Linear)]
    assert count == len(layers) > 0 and all(m.weight_scale.shape == () for m in layers)
    assert "per-tensor" in repr(layers[0])
    flux = build_tiny_transformer(num_layers=1, num_single_layers=1)
    quantize_blocks_fp8(flux)
    layer = flux.single_transformer_blocks[0].proj_out
    assert isinstance(layer, Fp8Linear) and layer.granularity == "row"
    assert layer.state_dict()["weight_scale"].shape == (layer.out_features,)
    assert layer.state_dict()["weight_fp8"].dtype == FP8
    with pytest.raises(ValueError, match="granularity"):
        quantize_blocks_fp8(flux, granularity="block")
    with pytest.raises(ValueError, match="scale needs"):
        Fp8Linear(layer.weight_fp8, torch.ones(()), None, torch.float32, "row")
