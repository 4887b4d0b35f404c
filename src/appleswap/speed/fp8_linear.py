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

import torch
import torch.nn.functional as F
from torch import nn

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
