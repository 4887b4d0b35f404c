"""fp8 weights for the FLUX blocks: per-tensor scaled ``float8_e4m3fn`` weights, ``torch._scaled_mm`` on GPUs.

Changes numerics (measured and labelled in ``benchmarks/RESULTS.md``): each weight is stored as
``round_e4m3(W / s)`` with one fp32 scale ``s = amax(W) / 448``; on a GPU with fp8 tensor cores (compute
capability >= 8.9) the activations are quantised the same way per call (dynamic per-tensor scale) and the product
runs in fp8 with fp32 accumulation. Elsewhere (CPU, few rows such as the AdaLN modulation, shapes that are not
multiples of 16) the weight is dequantised and multiplied in the activation dtype (weight-only fp8: half the
memory, the same rounding of the weights). The LoRA (``lora_A``/``lora_B``) and the ID cross-attentions stay in
the model dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_ROWS = 16  # fewer activation rows than this: dequantised matmul (the AdaLN linears see 1-2 rows)


def quantize_fp8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 tensor, fp32 scale) with ``tensor ~= fp8.float() * scale``; one scale for the whole tensor."""
    amax = tensor.detach().abs().amax().float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    quantized = (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-call activation quantisation in the activation dtype with three passes over memory (min/max, divide,
    cast) instead of :func:`quantize_fp8`'s six; bf16 keeps 8 mantissa bits, more than e4m3's 3.

    The scale is rounded *up* to a value of ``x.dtype`` (by at most 1/128), so ``|x| / scale <= 448`` holds before
    rounding and, 448 being representable, after it too: no clamp pass is needed.
    """
    low, high = torch.aminmax(x)
    amax = torch.maximum(-low, high).float()
    scale = (amax / FP8_MAX * (1 + 2**-7)).clamp(min=torch.finfo(x.dtype).tiny).to(x.dtype)
    return x.div(scale).to(FP8), scale.float()


def dequantize_fp8(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 values are exact in bf16/fp16/fp32, so cast first and scale in ``dtype`` (no fp32 copy of the weight)."""
    return quantized.to(dtype) * scale.to(dtype)


def scaled_mm_supported(device: torch.device) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_matmul(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + b`` for 2-D ``x`` with the activations quantised per tensor on the fly; fp8 product, fp32
    accumulation, output in ``x.dtype`` (``torch._scaled_mm``; also runs on recent CPU builds)."""
    x_fp8, x_scale = quantize_activation(x)
    return torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale,
                            bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)


class Fp8Linear(nn.Module):
    """Drop-in for a frozen ``nn.Linear``: fp8 weight + fp32 scale as buffers, bias kept in the model dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = dtype
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale.reshape(()).float())
        self.register_buffer("bias", bias)
        self.use_scaled_mm = True  # False: always the dequantised matmul (tests, A/B runs)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        weight, scale = quantize_fp8(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data.detach()
        return cls(weight, scale, bias, linear.weight.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8(self.weight_fp8, self.weight_scale, dtype or self.compute_dtype)

    def _fast_path(self, rows: int, x: torch.Tensor) -> bool:
        return (self.use_scaled_mm and rows >= MIN_ROWS and self.in_features % 16 == 0
                and self.out_features % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16)
                and scaled_mm_supported(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not self._fast_path(flat.shape[0], x):
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        out = scaled_matmul(flat, self.weight_fp8, self.weight_scale, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-tensor"


def _swap(parent: nn.Module, name: str, child: nn.Linear) -> None:
    setattr(parent, name, Fp8Linear.from_linear(child))


def quantize_blocks_fp8(flux: nn.Module, include_modulation: bool = False,
                       device: torch.device | str | None = None) -> int:
    """Replace every frozen ``nn.Linear`` of the double and single blocks by :class:`Fp8Linear` (in place).

    LoRA-wrapped layers keep their adapter; only their ``base_layer`` is quantised. Returns the number of layers.
    ``include_modulation=False`` (default) keeps the AdaLN linears (``norm*.linear``, 27% of the block weights)
    in the model dtype: they see 1-2 rows per pass (memory-bound, no fp8 GEMM) and scale every token. ``device``: each
    block is moved there just before quantising (peak: the fp8 model plus one full-precision block).
    """
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
                    _swap(module, child_name, child)
                    count += 1
    logger.info("fp8: %d block linears quantised (per-tensor e4m3)", count)
    return count
