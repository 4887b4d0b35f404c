"""Merged condition weights for fp8: the condition rows of a fused GEMM multiply ``W' = W + s B A`` directly.

The condition LoRA acts on condition tokens only. In bf16 the fused GEMMs fold it in (:mod:`fusion`): extra
reduction columns ``[x | z] [W | B]^T`` with ``z = s A x`` on the condition rows. In fp8 that fold costs ~2 ms
per pass beyond its GEMM columns: the ``z`` products and the kernels that write their inputs (the condition rows'
GELU and concatenation again). Measured on an H100 (a probe of round 12 in git history), two fp8 GEMMs over
row slices of the same quantised input, ``W`` for the text and image rows and ``W'`` for the condition rows,
take as long as the one folded GEMM plus ``z``: so with a second e4m3 weight for the condition rows the rest of
the LoRA's cost goes. It costs memory: one more e4m3 copy of every LoRA-wrapped block linear (5.3 GiB at FLUX size).

``W'`` is quantised from the full-precision ``W`` when the model is quantised (:func:`attach_condition_weight`),
once; quantising ``dequant(W_fp8) + s B A`` instead would round ``W`` twice and lose most of a small ``s B A``. The
layer keeps a checksum of the LoRA it merged: fusing uses the merged weights only while every member's adapter,
scale and LoRA match it (:class:`ConditionWeights`), else it folds the LoRA in as before; a LoRA changed in place
while fused, or switched off, runs apart (exact).
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from appleswap.model.lora import _active_adapters, is_lora_layer, plain_adapter
from appleswap.speed import kernels
from appleswap.speed.fp8_linear import (
    MIN_ROWS,
    dequantize_fp8,
    quantize_activation_rows,
    quantize_fp8,
    scaled_mm_supported,
)
from appleswap.speed.kernels import ConcatInput

logger = logging.getLogger(__name__)


def lora_checksum(layer: nn.Module, adapter: str) -> tuple[float, ...]:
    """Scale, sums and sums of squares of ``A`` and ``B`` (float64): identifies the LoRA a merged weight holds."""
    a, b = layer.lora_A[adapter].weight.detach().double(), layer.lora_B[adapter].weight.detach().double()
    sums = torch.stack([a.sum(), a.square().sum(), b.sum(), b.square().sum()])
    return (float(layer.scaling[adapter]), *sums.tolist())


def attach_condition_weight(fp8_layer: nn.Module, lora_layer: nn.Module, weight: torch.Tensor) -> bool:
    """Give ``fp8_layer`` (the new base of ``lora_layer``) the row-wise e4m3 ``W + s B A`` of the full-precision
    ``weight``, as buffers ``condition_fp8`` / ``condition_scale``, and the LoRA's checksum. False (nothing
    attached) unless the layer has one active plain adapter."""
    adapter = plain_adapter(lora_layer)
    if adapter is None:
        return False
    a, b = lora_layer.lora_A[adapter].weight, lora_layer.lora_B[adapter].weight
    delta = (b.detach().to(weight.device, torch.float32) @ a.detach().to(weight.device, torch.float32))
    merged, scale = quantize_fp8(weight.detach().float() + delta * lora_layer.scaling[adapter], "row")
    fp8_layer.register_buffer("condition_fp8", merged, persistent=False)
    fp8_layer.register_buffer("condition_scale", scale, persistent=False)
    fp8_layer.condition_lora = (adapter, lora_checksum(lora_layer, adapter))
    return True


class ConditionWeights(nn.Module):
    """The stacked merged weights of one fused fp8 group (members' ``condition_fp8`` become views of it) and the
    check that they still hold the members' LoRA. Build it with :meth:`of`."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, layers: list[nn.Module], adapter: str):
        super().__init__()
        self.register_buffer("weight_fp8", weight, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.adapter, self.stale = adapter, False
        self.lora_layers = [layer for layer in layers if is_lora_layer(layer)]  # plain list: not registered twice
        self.scalings = [layer.scaling[adapter] for layer in self.lora_layers]
        self._seen = self._tensors_seen()

    @classmethod
    def of(cls, layers: list[nn.Module], bases: list[nn.Module]) -> ConditionWeights | None:
        """The group's merged weights if every LoRA member's base holds its current LoRA merged, else None."""
        adapters = {plain_adapter(layer) for layer in layers if is_lora_layer(layer)}
        if len(adapters) != 1 or None in adapters:
            return None
        adapter = adapters.pop()
        for layer, base in zip(layers, bases, strict=True):
            if is_lora_layer(layer) and getattr(base, "condition_lora", None) != (adapter,
                                                                                  lora_checksum(layer, adapter)):
                return None
        weight = torch.cat([getattr(base, "condition_fp8", base.weight_fp8) for base in bases])
        scale = torch.cat([getattr(base, "condition_scale", base.weight_scale) for base in bases])
        row = 0
        for layer, base in zip(layers, bases, strict=True):
            size = base.out_features
            if is_lora_layer(layer):  # same storage: no second copy while fused
                base.condition_fp8, base.condition_scale = weight[row:row + size], scale[row:row + size]
            row += size
        return cls(weight, scale, layers, adapter)

    def _tensors_seen(self) -> list[tuple]:
        return [(w.data_ptr(), w._version) for layer in self.lora_layers
                for w in (layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight)]

    def refresh(self) -> bool:
        """Mark the weights stale if a member's LoRA tensor changed since fusing; True when that just happened."""
        if self.stale or self._tensors_seen() == self._seen:
            return False
        self.stale = True
        logger.warning("the LoRA changed after fp8 quantisation: its condition rows now run the LoRA apart "
                       "(exact, slower); quantise after loading the LoRA to merge it again")
        return True

    def ready(self) -> bool:
        """Whether the merged weights compute what the layers would now: inference, same adapter and scales."""
        if self.stale or torch.is_grad_enabled():
            return False
        return all(_active_adapters(layer) == [self.adapter] and layer.scaling[self.adapter] == scaling
                   for layer, scaling in zip(self.lora_layers, self.scalings, strict=True))

    def matmul(self, fused: nn.Module, x: torch.Tensor | ConcatInput, cond_start: int) -> torch.Tensor:
        """``x @ W^T + b`` on tokens ``:cond_start`` and ``x @ W'^T + b`` on the rest, every row quantised once."""
        batch, tokens, width = x.shape[0], x.shape[1], fused.in_features
        base = fused.weight_fp8  # (N, K): a group with merged weights has no folded LoRA columns
        rows = batch * tokens
        if (fused.use_scaled_mm and scaled_mm_supported(x.parts[0].device if isinstance(x, ConcatInput) else x.device)
                and min(cond_start, tokens - cond_start) >= MIN_ROWS and width % 16 == 0
                and base.shape[0] % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16)):
            if isinstance(x, ConcatInput) and kernels.join_applies(x, width):
                x_fp8, x_scale = kernels.join_rows(x, width, quantize=True)
                x_fp8 = x_fp8.reshape(rows, width)
            else:
                x_fp8, x_scale = quantize_activation_rows(kernels.as_tensor(x).reshape(rows, width))
            bounds = [edge for sample in range(batch) for edge in (sample * tokens, sample * tokens + cond_start)]
            out = torch.ops.appleswap.scaled_mm_rows(
                x_fp8, x_scale, [base, self.weight_fp8],
                [fused.weight_scale, self.weight_scale], fused.bias, [*bounds, rows], fused.fast_accum)
            return out.reshape(batch, tokens, -1).to(x.dtype)
        x = kernels.as_tensor(x)  # weight-only fp8 elsewhere: dequantised weights in the activation dtype
        bias = None if fused.bias is None else fused.bias.to(x.dtype)
        main = F.linear(x[:, :cond_start], dequantize_fp8(base, fused.weight_scale, x.dtype), bias)
        cond = F.linear(x[:, cond_start:], dequantize_fp8(self.weight_fp8, self.weight_scale, x.dtype), bias)
        return torch.cat([main, cond], dim=1)


@torch.library.custom_op("appleswap::scaled_mm_rows", mutates_args=())
def scaled_mm_rows(x_fp8: torch.Tensor, x_scale: torch.Tensor, weights: list[torch.Tensor],
                   scales: list[torch.Tensor], bias: torch.Tensor | None, bounds: list[int],
                   fast_accum: bool) -> torch.Tensor:
    """Row-wise fp8 products of consecutive row ranges ``bounds[i]:bounds[i + 1]`` of ``x_fp8`` (M, K) with
    ``weights[i % 2]`` (N, K), each written straight into its rows of one bf16 output (M, N): one op, so that a
    compiled block does not copy the pieces together."""
    out = x_fp8.new_empty((x_fp8.shape[0], weights[0].shape[0]), dtype=torch.bfloat16)
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        if stop > start:
            weight, scale = weights[index % 2], scales[index % 2]
            torch._scaled_mm(x_fp8[start:stop], weight.t(), scale_a=x_scale[start:stop],
                             scale_b=scale.reshape(1, -1), bias=None if bias is None else bias.to(torch.bfloat16),
                             out_dtype=torch.bfloat16, use_fast_accum=fast_accum, out=out[start:stop])
    return out


@scaled_mm_rows.register_fake
def _scaled_mm_rows_fake(x_fp8, x_scale, weights, scales, bias, bounds, fast_accum):
    return x_fp8.new_empty((x_fp8.shape[0], weights[0].shape[0]), dtype=torch.bfloat16)


def drop_condition_weights(module: nn.Module) -> int:
    """Free the merged condition weights of every unfused fp8 layer under ``module`` (sequential offload runs the
    layers one by one, with the LoRA apart). Returns how many layers had them."""
    count = 0
    for layer in module.modules():
        if getattr(layer, "condition_lora", None) is not None:
            del layer.condition_fp8, layer.condition_scale
            layer.condition_lora = None
            count += 1
    return count
