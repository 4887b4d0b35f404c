"""fp8 for the fused projections and the whole model: :class:`Fp8FusedProjection` stacks the e4m3 layers of
:mod:`~appleswap.speed.fp8_linear` (the scheme and its numerics are described there) and
:func:`quantize_blocks_fp8` quantises every block linear of a FLUX transformer in place.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from appleswap.model.lora import is_lora_layer
from appleswap.speed import fp8_linear, kernels
from appleswap.speed.fp8_condition import ConditionWeights, attach_condition_weight
from appleswap.speed.fp8_linear import (
    FP8,
    Fp8Linear,
    check_granularity,
    dequantize_fp8,
    quantize_lora_columns,
    rowwise_scaled_mm,
    takes_scaled_mm,
)
from appleswap.speed.fusion import DOUBLE_GROUPS, SINGLE_GROUPS, FusedProjection, _base
from appleswap.speed.kernels import ConcatInput

logger = logging.getLogger(__name__)


class Fp8FusedProjection(FusedProjection):
    """:class:`~appleswap.speed.fusion.FusedProjection` for fp8 layers (row-wise scales): the members' e4m3
    weights and row scales stacked as they are (the base product is the one the separate layers compute, with each
    token quantised once instead of once per member), and the folded condition LoRA in fp8 too.

    Folding in fp8: ``B`` is stored in the fused weight's extra columns with the base row scales through
    :func:`quantize_lora_columns`; its column factors ``c`` join the LoRA scale, ``z' = c s A x``; ``[x | z']`` is
    quantised per token as one row. The delta then carries e4m3 rounding like the base product (the separate fp8
    layers keep it in the model dtype: the difference is measured in ``benchmarks/RESULTS.md``). ``B`` is read
    when fusing; :meth:`refresh_lora` (called by ``AppleTransformer.forward``) quantises it again after an
    in-place change.

    Where the members hold merged condition weights (:mod:`~appleswap.speed.fp8_condition`, stored by
    :func:`quantize_blocks_fp8`) and ``condition_weights`` is True, the group uses them instead of the fold: no LoRA
    columns, the condition rows multiplied by ``W + s B A``.
    """

    def __init__(self, layers: list[nn.Module], fold_lora: bool = True, condition_weights: bool = True):
        nn.Module.__init__(self)
        bases = [_base(layer) for layer in layers]
        if any(not isinstance(base, Fp8Linear) or base.granularity != "row" for base in bases):
            raise ValueError("fused fp8 projections need Fp8Linear layers with row-wise scales (granularity 'row')")
        self.compute_dtype, self.use_scaled_mm = bases[0].compute_dtype, True
        self.fast_accum = all(base.fast_accum for base in bases)
        device = bases[0].weight_fp8.device
        condition = ConditionWeights.of(layers, bases) if fold_lora and condition_weights else None
        extra = self._members(layers, bases, fold_lora and condition is None, self.compute_dtype, device, 16)
        weight = torch.zeros(sum(self.sizes), self.in_features + extra, dtype=FP8, device=device)
        weight[:, :self.in_features] = torch.cat([base.weight_fp8 for base in bases])
        self.register_buffer("weight_fp8", weight, persistent=False)
        self.register_buffer("weight_scale", torch.cat([base.weight_scale for base in bases]), persistent=False)
        self._folded_b: list[tuple] = []  # (lora_B weight, first row, rows, first extra column, rank, scaling)
        self._b_seen: list[tuple] | None = None
        self.condition = condition  # merged condition weights (fp8_condition), or None
        self._share_storage(bases)

    @property
    def weight(self) -> torch.Tensor:
        """The stacked base weight, dequantised (for inspection; the products use the fp8 buffer)."""
        return dequantize_fp8(self.weight_fp8[:, :self.in_features], self.weight_scale, self.compute_dtype)

    def _share_storage(self, bases: list[nn.Module]) -> None:
        row, offset = 0, 0
        for layer, base, size, rank, scaling in zip(self.layers, bases, self.sizes, self.ranks, self.fold_scaling,
                                                    strict=True):
            base.weight_fp8 = self.weight_fp8[row:row + size, :self.in_features]
            base.weight_scale = self.weight_scale[row:row + size]
            if self.bias is not None:
                base.bias = self.bias[row:row + size]
            if rank:
                a = layer.lora_A[self.fold_adapter].weight
                self.lora_down[offset:offset + rank] = a.detach()
                a.data = self.lora_down[offset:offset + rank]
                self._folded_b.append((layer.lora_B[self.fold_adapter].weight, row, size, offset, rank, scaling))
            row, offset = row + size, offset + rank
        self.refresh_lora()

    def refresh_lora(self) -> bool:
        """Quantise the folded ``B`` columns again if a ``lora_B`` weight changed since (in place or replaced).
        With merged condition weights: mark them stale if the LoRA changed; True when that just happened."""
        if self.condition is not None:
            return self.condition.refresh()
        seen = [(weight.data_ptr(), weight._version) for weight, *_ in self._folded_b]
        if seen == self._b_seen:
            return False
        with torch.no_grad():
            for weight, row, size, offset, rank, scaling in self._folded_b:
                quantized, column = quantize_lora_columns(weight, self.weight_scale[row:row + size])
                start = self.in_features + offset
                self.weight_fp8[row:row + size, start:start + rank] = quantized
                self.lora_scale[offset:offset + rank] = column * scaling
        self._b_seen = seen
        return True

    def matmul(self, x: torch.Tensor | ConcatInput, lora_columns: bool = False) -> torch.Tensor:
        """Like :meth:`FusedProjection.matmul`; ``x`` without the LoRA columns is padded with zeros (same product).
        A :class:`~appleswap.speed.kernels.ConcatInput` is joined and quantised per row by one Triton kernel."""
        width = self.weight_fp8.shape[1]
        if isinstance(x, ConcatInput):
            rows = x.shape[0] * x.shape[1]
            if (takes_scaled_mm(self.use_scaled_mm, rows, width, self.weight_fp8.shape[0], x.parts[0])
                    and kernels.join_applies(x, width)):
                x_fp8, x_scale = kernels.join_rows(x, width, quantize=True)
                out = rowwise_scaled_mm(x_fp8.reshape(rows, width), x_scale, self.weight_fp8, self.weight_scale,
                                        self.bias, x.dtype, self.fast_accum)
                return out.reshape(*x.shape[:-1], -1)
            x = x.join()
        missing = width - x.shape[-1]
        if missing:
            x = F.pad(x, (0, missing))
        flat = x.reshape(-1, x.shape[-1])
        if takes_scaled_mm(self.use_scaled_mm, flat.shape[0], flat.shape[1], self.weight_fp8.shape[0], x):
            out = fp8_linear.scaled_matmul(flat, self.weight_fp8, self.weight_scale, self.bias, self.fast_accum)
        else:
            weight = dequantize_fp8(self.weight_fp8, self.weight_scale, x.dtype)
            out = F.linear(flat, weight, None if self.bias is None else self.bias.to(x.dtype))
        return out.reshape(*x.shape[:-1], -1)

    def release(self) -> None:
        """Every member layer gets its own fp8 weight, scales and bias (and LoRA ``A``) storage again."""
        for layer in self.layers:
            base = _base(layer)
            for name in ("weight_fp8", "weight_scale", "bias", "condition_fp8", "condition_scale"):
                if getattr(base, name, None) is not None:
                    setattr(base, name, getattr(base, name).clone())
            if is_lora_layer(layer):
                for name in layer.lora_A:
                    layer.lora_A[name].weight.data = layer.lora_A[name].weight.data.clone()


def quantize_blocks_fp8(flux: nn.Module, include_modulation: bool = False,
                       device: torch.device | str | None = None, granularity: str = "row",
                       fast_accum: bool = True, merge_condition: bool = True) -> int:
    """Replace every frozen ``nn.Linear`` of the double and single blocks by :class:`Fp8Linear` (in place).

    LoRA-wrapped layers keep their adapter; only their ``base_layer`` is quantised. Returns the number of layers.
    ``include_modulation=False`` (default) keeps the AdaLN linears (``norm*.linear``, 27% of the block weights)
    in the model dtype: they see 1-2 rows per pass (memory-bound, no fp8 GEMM) and scale every token. ``device``: each
    block is moved there just before quantising (peak: the fp8 model plus one full-precision block). ``granularity``:
    ``"row"`` (per output channel and per token) or ``"tensor"``. ``fast_accum``: see :class:`Fp8Linear`.
    ``merge_condition`` (row-wise only): the LoRA-wrapped linears that fused groups stack also get ``W + s B A`` in
    e4m3 for the condition rows (:mod:`~appleswap.speed.fp8_condition`; faster, one more e4m3 copy of them).
    """
    check_granularity(granularity)
    stacked = {member for groups in (DOUBLE_GROUPS, SINGLE_GROUPS) for members in groups.values()
               for member in members}
    count = 0
    for blocks in (flux.transformer_blocks, flux.single_transformer_blocks):
        for block in blocks:
            if device is not None:
                block.to(device)
            for module_name, module in list(block.named_modules()):
                for child_name, child in list(module.named_children()):
                    if "lora_" in module_name or child_name.startswith("lora_") or type(child) is not nn.Linear:
                        continue
                    full = f"{module_name}.{child_name}".lstrip(".")
                    if not include_modulation and ".linear" in f".{full}" and "norm" in full:
                        continue
                    quantized = Fp8Linear.from_linear(child, granularity, fast_accum)
                    if (merge_condition and granularity == "row" and child_name == "base_layer"
                            and module_name in stacked and is_lora_layer(module)):
                        attach_condition_weight(quantized, module, child.weight)
                    setattr(module, child_name, quantized)
                    count += 1
    logger.info("fp8: %d block linears quantised (per-%s e4m3)", count, granularity)
    return count


def fused_projection_for(layers: list[nn.Module], fold_lora: bool, condition_weights: bool) -> FusedProjection:
    """The fused group for ``layers``: :class:`Fp8FusedProjection` over fp8 layers, else the bf16 one."""
    if any(isinstance(_base(layer), Fp8Linear) for layer in layers):
        return Fp8FusedProjection(layers, fold_lora, condition_weights)
    return FusedProjection(layers, fold_lora)
