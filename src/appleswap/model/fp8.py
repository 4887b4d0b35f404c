"""fp8 weights for the FLUX blocks: scaled ``float8_e4m3fn`` weights, ``torch._scaled_mm`` on GPUs.

Changes numerics (measured and labelled in ``benchmarks/RESULTS.md``). Two scale granularities:

- ``"row"`` (default): one fp32 scale per output channel of the weight, ``s_w[n] = amax_k |W[n, k]| / 448``, and,
  per call, one per activation row (token), ``s_x[m] = amax_k |x[m, k]| / 448``. A channel or token with large
  values no longer coarsens the grid of every other one (lower error), and the per-row reduction is plain torch
  ops that ``torch.compile`` fuses with the cast into one kernel (a global amax cannot be fused that way). The
  product is Hopper's row-wise ``torch._scaled_mm`` (``scale_a`` (M, 1), ``scale_b`` (1, N), bf16 output).
- ``"tensor"``: one scale for the weight and one for the activations (the round-2 scheme).

On a GPU with fp8 tensor cores (compute capability >= 8.9) the product runs in fp8 with fp32 accumulation.
Elsewhere (CPU, few rows such as the AdaLN modulation, shapes that are not multiples of 16, fp32 activations) the
weight is dequantised with the same scales and multiplied in the activation dtype (weight-only fp8: half the
memory, the same rounding of the weights). The LoRA (``lora_A``/``lora_B``) and the ID cross-attentions stay in
the model dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from appleswap.model import kernels
from appleswap.model.fusion import FusedProjection, _base
from appleswap.model.kernels import ConcatInput
from appleswap.model.lora import is_lora_layer

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_ROWS = 16  # fewer activation rows than this: dequantised matmul (the AdaLN linears see 1-2 rows)
GRANULARITIES = ("row", "tensor")
ROUND_UP = 1 + 2**-7  # scale margin: covers the rounding of the scale to bf16, so |x| / scale <= 448 (no clamp)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8 granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def _column(scale: torch.Tensor) -> torch.Tensor:
    """A per-row scale of shape (N,) as (N, 1) so it broadcasts over the columns; () and (M, 1) stay."""
    return scale[:, None] if scale.dim() == 1 else scale


def quantize_fp8(tensor: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 tensor, fp32 scale) with ``tensor ~= fp8.float() * scale``: one scale (shape ()) for ``"tensor"``,
    one per row of a 2-D tensor (shape (rows,), the output channels of a weight) for ``"row"``."""
    check_granularity(granularity)
    values = tensor.detach().float()
    if granularity == "row":
        if values.dim() != 2:
            raise ValueError(f"quantize_fp8: row-wise scales need a 2-D tensor, got shape {tuple(values.shape)}")
        amax = values.abs().amax(dim=1)
    else:
        amax = values.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    quantized = (values / _column(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor activation quantisation in the activation dtype with three passes over memory (min/max, divide,
    cast) instead of :func:`quantize_fp8`'s six; bf16 keeps 8 mantissa bits, more than e4m3's 3.

    The scale is rounded *up* to a value of ``x.dtype`` (by at most 1/128), so ``|x| / scale <= 448`` holds before
    rounding and, 448 being representable, after it too: no clamp pass is needed.
    """
    low, high = torch.aminmax(x)
    amax = torch.maximum(-low, high).float()
    scale = (amax / FP8_MAX * ROUND_UP).clamp(min=torch.finfo(x.dtype).tiny).to(x.dtype)
    return x.div(scale).to(FP8), scale.float()


def quantize_activation_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (per token) quantisation of a 2-D ``x``: fp8 values and fp32 scales of shape (M, 1).

    Plain torch ops so that inductor fuses the row reduction, the divide and the cast into one kernel. The scale
    and the quotient are fp32 (one rounding, straight to e4m3), so eager and compiled runs give the same bits; the
    scale is rounded up by 1/128 so that ``|x| / scale < 448`` (no clamp pass) and is at least fp32's smallest
    normal, so a row of zeros gives zeros, never NaN.
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax * (ROUND_UP / FP8_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).to(FP8), scale


def dequantize_fp8(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 values are exact in bf16/fp16/fp32, so cast first and scale in ``dtype`` (no fp32 copy of the weight).
    ``scale``: () per tensor, (N,) per row of ``quantized`` or (M, 1)."""
    return quantized.to(dtype) * _column(scale).to(dtype)


def scaled_mm_supported(device: torch.device) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper). ``get_device_properties`` is
    constant-folded by ``torch.compile`` (no graph break)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor) >= (8, 9)


def scaled_matmul(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, fast_accum: bool = False) -> torch.Tensor:
    """``x @ W.T + b`` for 2-D ``x`` with the activations quantised on the fly, per row when ``weight_scale`` has
    one value per output channel, else per tensor; fp8 product, output in ``x.dtype`` (``torch._scaled_mm``; also
    runs on recent CPU builds). ``fast_accum``: Hopper's fp8 accumulator throughout (see :class:`Fp8Linear`)."""
    if weight_scale.dim() == 0:
        x_fp8, x_scale = quantize_activation(x)
        return torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale,
                                bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype,
                                use_fast_accum=fast_accum)
    return rowwise_scaled_mm(*quantize_activation_rows(x), weight_fp8, weight_scale, bias, x.dtype, fast_accum)


def rowwise_scaled_mm(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor,
                      weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                      fast_accum: bool = False) -> torch.Tensor:
    """The row-wise fp8 product of already quantised activations (M, K) with scales (M, 1), output in ``dtype``."""
    # row-wise GEMMs on CUDA write bf16 only (fp32 only through cuBLAS >= 12.9 on sm90): fp16 goes through bf16
    out_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    out = torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale.reshape(1, -1),
                           bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                           use_fast_accum=fast_accum)
    return out.to(dtype)


def takes_scaled_mm(enabled: bool, rows: int, in_features: int, out_features: int, x: torch.Tensor) -> bool:
    """Whether a product takes the fp8 GEMM: enabled, enough rows, 16-aligned sizes, a 16-bit input, fp8 cores."""
    return (enabled and rows >= MIN_ROWS and in_features % 16 == 0 and out_features % 16 == 0
            and x.dtype in (torch.bfloat16, torch.float16) and scaled_mm_supported(x.device))


class Fp8Linear(nn.Module):
    """Drop-in for a frozen ``nn.Linear``: fp8 weight (N, K) + fp32 scale (``(N,)`` row-wise, ``()`` per tensor)
    as buffers, bias kept in the model dtype.

    ``fast_accum`` (default True): ``torch._scaled_mm``'s ``use_fast_accum``. Without it Hopper's fp8 GEMMs move
    the tensor cores' partial sums into fp32 registers every few K steps; with it they accumulate in the tensor
    cores' own (narrower) accumulator throughout. Measured on an H100 (``benchmarks/RESULTS.md``, round 10): the
    pass's fp8 GEMMs 31.8 -> 26.9 ms, the output's rel. L2 to the unquantised model 0.060 -> 0.064.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 granularity: str = "row", fast_accum: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = dtype
        self.granularity = check_granularity(granularity)
        expected = self.out_features if granularity == "row" else 1
        if scale.numel() != expected:
            raise ValueError(f"Fp8Linear: {granularity} scale needs {expected} values, got shape {tuple(scale.shape)}")
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale.float().reshape((-1,) if granularity == "row" else ()))
        self.register_buffer("bias", bias)
        self.use_scaled_mm = True  # False: always the dequantised matmul (tests, A/B runs)
        self.fast_accum = fast_accum

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "row", fast_accum: bool = True) -> Fp8Linear:
        weight, scale = quantize_fp8(linear.weight.data, granularity)
        bias = None if linear.bias is None else linear.bias.data.detach()
        return cls(weight, scale, bias, linear.weight.dtype, granularity, fast_accum)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8(self.weight_fp8, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not takes_scaled_mm(self.use_scaled_mm, flat.shape[0], self.in_features, self.out_features, x):
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        out = scaled_matmul(flat, self.weight_fp8, self.weight_scale, self.bias, self.fast_accum)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-{self.granularity}"


def quantize_lora_columns(lora_b: torch.Tensor, row_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 ``B'``, fp32 ``c``) with ``B[n, j] ~= B'[n, j] * c[j] * row_scale[n]``: a LoRA ``B`` (N, r) stored in
    weight rows whose scales belong to the base weight; ``c`` (the smallest that keeps ``B'`` in e4m3's range,
    rounded up by 1/128 like the activation scales) moves to the LoRA input. An all-zero column gets ``c = 1``."""
    ratio = lora_b.detach().float() / row_scale.float()[:, None]
    column = ratio.abs().amax(dim=0) * (ROUND_UP / FP8_MAX)
    column = torch.where(column > 0, column, torch.ones_like(column))
    return (ratio / column).to(FP8), column


class Fp8FusedProjection(FusedProjection):
    """:class:`~appleswap.model.fusion.FusedProjection` for fp8 layers (row-wise scales): the members' e4m3
    weights and row scales stacked as they are (the base product is the one the separate layers compute, with each
    token quantised once instead of once per member), and the folded condition LoRA in fp8 too.

    Folding in fp8: ``B`` is stored in the fused weight's extra columns with the base row scales through
    :func:`quantize_lora_columns`; its column factors ``c`` join the LoRA scale, ``z' = c s A x``; ``[x | z']`` is
    quantised per token as one row. The delta then carries e4m3 rounding like the base product (the separate fp8
    layers keep it in the model dtype: the difference is measured in ``benchmarks/RESULTS.md``). ``B`` is read
    when fusing; :meth:`refresh_lora` (called by ``AppleTransformer.forward``) quantises it again after an
    in-place change.

    Where the members hold merged condition weights (:mod:`~appleswap.model.fp8_condition`, stored by
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
        from appleswap.model.fp8_condition import ConditionWeights  # builds on this module

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
        A :class:`~appleswap.model.kernels.ConcatInput` is joined and quantised per row by one Triton kernel."""
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
            out = scaled_matmul(flat, self.weight_fp8, self.weight_scale, self.bias, self.fast_accum)
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
    e4m3 for the condition rows (:mod:`~appleswap.model.fp8_condition`; faster, one more e4m3 copy of them).
    """
    from appleswap.model.fp8_condition import attach_condition_weight
    from appleswap.model.fusion import DOUBLE_GROUPS, SINGLE_GROUPS

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
