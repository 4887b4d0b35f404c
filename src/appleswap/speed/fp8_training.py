"""fp8 for the frozen base weights while a LoRA trains: both GEMMs that touch a frozen block weight run in e4m3.

A training step multiplies every frozen block weight ``W`` (N, K) twice per forward-and-backward: the forward
``y = x W^T`` and the input gradient ``dx = dy W`` (no weight gradient: ``W`` is frozen; the LoRA that trains sits
beside it, in fp32, untouched). :class:`FrozenFp8Linear` keeps ``W`` twice in e4m3, each copy with row-wise scales
(the scheme of :mod:`appleswap.speed.fp8_linear`): ``W`` (N, K) with one scale per output channel for the forward,
and ``W^T`` (K, N), stored row-major, with one scale per input channel for the backward, so that both products are
Hopper's row-wise ``torch._scaled_mm`` with the second operand column-major. The activations (forward) and the
output gradients (backward) are quantised per row (token) on the fly. Together the two e4m3 copies take the
memory of the bf16 weight they replace, which is dropped. Without the transposed copy (``transposed_copy=False``,
half that memory: 11 GiB less at FLUX size) the backward transposes the forward copy, layer by layer, and folds its
per-output-channel scales into the output gradient before quantising it (``dy W = (dy diag(s)) W_q``).

Where ``torch._scaled_mm`` does not apply (CPU, fp32 activations, fewer than 16 rows, sizes not multiples of 16,
GPUs without fp8 tensor cores) the same function multiplies by the dequantised copies in the activation dtype
(weight-only fp8), so the CPU tests run this module's own code. The forward accumulates like inference's
:class:`~appleswap.speed.fp8_linear.Fp8Linear` (``fast_accum``); the input gradient always uses the precise
accumulation (as torchao's float8 training does for gradients).

The product is a plain ``torch.autograd.Function`` of tensor ops, which dynamo traces into the regional
``torch.compile`` graphs of :func:`~appleswap.speed.transformer.compile_block_functions` (inductor fuses the
per-row quantisation into the kernels that produce the activations and gradients).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from appleswap.speed.fp8_linear import Fp8Linear, dequantize_fp8, quantize_fp8, scaled_matmul, takes_scaled_mm

logger = logging.getLogger(__name__)


def fp8_product(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                scaled: bool, fast_accum: bool) -> torch.Tensor:
    """``x @ W^T (+ b)`` for a 2-D ``x`` (M, K) and e4m3 ``W`` (N, K) with per-row scales (N,): the row-wise fp8
    GEMM when ``scaled`` (the caller checked :func:`~appleswap.speed.fp8_linear.takes_scaled_mm`), else the
    dequantised matmul in ``x.dtype``."""
    if scaled:
        # _scaled_mm wants a row-major first operand: a gradient can arrive with transposed strides
        return scaled_matmul(x.contiguous(), weight_fp8, weight_scale, bias, fast_accum)
    return F.linear(x, dequantize_fp8(weight_fp8, weight_scale, x.dtype), None if bias is None else bias.to(x.dtype))


class FrozenFp8Product(torch.autograd.Function):
    """``y = x W^T + b`` with ``dx = dy W`` through the transposed e4m3 copy; nothing else gets a gradient.

    Whether the fp8 GEMM applies is decided once, in the forward, for both products: ``dy`` has ``y``'s rows,
    device and dtype (``x``'s), and the two products swap the same two sizes."""

    @staticmethod
    def forward(ctx, x, weight_fp8, weight_scale, weight_t_fp8, weight_t_scale, bias, use_scaled_mm, fast_accum):
        out_features, in_features = weight_fp8.shape
        scaled = takes_scaled_mm(use_scaled_mm, x.shape[0], in_features, out_features, x)
        ctx.transposed_copy = weight_t_fp8 is not None
        # buffers: no copy; x is not needed (frozen W)
        ctx.save_for_backward(*((weight_t_fp8, weight_t_scale) if ctx.transposed_copy else (weight_fp8, weight_scale)))
        ctx.scaled = scaled
        return fp8_product(x, weight_fp8, weight_scale, bias, scaled, fast_accum)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            scaled = ctx.scaled and grad_out.dtype in (torch.bfloat16, torch.float16)  # row-wise GEMMs write 16-bit
            if ctx.transposed_copy:
                # dy (M, N) @ W (N, K) = dy @ (W^T)^T: the forward's product with W^T (K, N) as the weight
                grad_x = fp8_product(grad_out, *ctx.saved_tensors, None, scaled, False)
            else:
                grad_x = input_gradient_from_forward_copy(grad_out, *ctx.saved_tensors, scaled)
        return grad_x, None, None, None, None, None, None, None


def input_gradient_from_forward_copy(grad_out: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                                     scaled: bool) -> torch.Tensor:
    """``dy @ W`` from the forward's e4m3 ``W_q`` (N, K) and its per-output-channel scales ``s``: ``(dy diag(s)) @ W_q``,
    the scales folded into ``dy`` (its columns) so the row-wise GEMM needs none on the weight, whose transpose is
    made here (the GEMM wants it row-major) and dropped after use."""
    if not scaled:
        return grad_out @ dequantize_fp8(weight_fp8, weight_scale, grad_out.dtype)
    folded = (grad_out.float() * weight_scale).to(grad_out.dtype)
    ones = torch.ones(weight_fp8.shape[1], device=weight_fp8.device, dtype=torch.float32)
    return scaled_matmul(folded.contiguous(), weight_fp8.t().contiguous(), ones, None, False)


class FrozenFp8Linear(Fp8Linear):
    """A frozen ``nn.Linear`` for training: :class:`~appleswap.speed.fp8_linear.Fp8Linear`'s e4m3 weight (N, K)
    and row scales for the forward, plus ``weight_t_fp8`` (K, N, row-major) and ``weight_t_scale`` (K,) for the
    input gradient. All are buffers (never trained); the bias stays in the model dtype and gets no gradient."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, weight_t: torch.Tensor, scale_t: torch.Tensor,
                 bias: torch.Tensor | None, dtype: torch.dtype, fast_accum: bool = True):
        super().__init__(weight, scale, bias, dtype, "row", fast_accum)
        if tuple(weight_t.shape) != (self.in_features, self.out_features) or scale_t.numel() != self.in_features:
            raise ValueError(f"FrozenFp8Linear: the transposed copy needs shape {(self.in_features, self.out_features)}"
                             f" and {self.in_features} scales, got {tuple(weight_t.shape)} and {scale_t.numel()}")
        self.register_buffer("weight_t_fp8", weight_t.contiguous())
        self.register_buffer("weight_t_scale", scale_t.float().reshape(-1))

    def drop_transposed_copy(self) -> None:
        """Free the backward's e4m3 ``W^T``: the input gradient then transposes the forward copy per call."""
        self.weight_t_fp8 = None
        self.weight_t_scale = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "row", fast_accum: bool = True) -> FrozenFp8Linear:
        if granularity != "row":
            raise ValueError("FrozenFp8Linear uses row-wise scales only (granularity 'row')")
        if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
            raise ValueError("fp8 base weights are for frozen layers: this nn.Linear has trainable weights")
        weight = linear.weight.detach()
        weight_fp8, scale = quantize_fp8(weight, "row")
        weight_t_fp8, scale_t = quantize_fp8(weight.t(), "row")  # one scale per input channel
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight_fp8, scale, weight_t_fp8, scale_t, bias, weight.dtype, fast_accum)

    def dequantized_weight_t(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The backward's copy, ``~W^T`` (K, N), dequantised (for inspection and tests); without the transposed copy
        the forward's, transposed."""
        if self.weight_t_fp8 is None:
            return dequantize_fp8(self.weight_fp8, self.weight_scale, dtype or self.compute_dtype).t()
        return dequantize_fp8(self.weight_t_fp8, self.weight_t_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = FrozenFp8Product.apply(flat, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale,
                                     self.bias, self.use_scaled_mm, self.fast_accum)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen (forward and input gradient in fp8)"


def is_modulation(name: str) -> bool:
    """The AdaLN linears (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``): 1-2 rows per pass, no fp8
    GEMM, and each dequantisation would read the whole weight; they stay in the model dtype."""
    return "norm" in name and f".{name}".endswith(".linear")


def quantize_frozen_fp8(transformer: nn.Module, fast_accum: bool = True, transposed_copy: bool = True) -> int:
    """Replace the frozen linears of every double and single block by :class:`FrozenFp8Linear` (in place); the
    number replaced. ``transformer``: an ``AppleTransformer`` or the diffusers FLUX model itself.
    ``transposed_copy=False``: no second e4m3 copy for the input gradient (see the module's docstring).

    Inside a PEFT LoRA wrapper only the ``base_layer`` is replaced, so ``model.lora.routed_linear`` (one base
    product over all tokens, the LoRA on the condition tokens) runs unchanged. The LoRA matrices, the AdaLN
    linears, the ID cross-attentions and everything outside the blocks keep their dtype. Quantise after the LoRA
    is added and frozen, before ``compile_block_functions``.

    The e4m3 copies are buffers, which DDP would broadcast from rank 0 before every forward (the whole frozen
    model, each step); every rank quantises the same weights the same way, so they are put on DDP's ignore list of
    ``transformer`` (pass the module that DDP / accelerate will wrap)."""
    flux = getattr(transformer, "flux", transformer)
    count = 0
    for blocks in (flux.transformer_blocks, flux.single_transformer_blocks):
        for block in blocks:
            for name, module in list(block.named_modules()):
                if (type(module) is not nn.Linear or ".lora_" in f".{name}"
                        or is_modulation(name.removesuffix(".base_layer"))):
                    continue
                parent_name, _, child_name = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                layer = FrozenFp8Linear.from_linear(module, fast_accum=fast_accum)
                if not transposed_copy:
                    layer.drop_transposed_copy()
                setattr(parent, child_name, layer)
                count += 1
    ignored = {f"{name}.{buffer}" for name, module in transformer.named_modules()
               if isinstance(module, FrozenFp8Linear) for buffer, _ in module.named_buffers(recurse=False)}
    ignored |= set(getattr(transformer, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, sorted(ignored))
    logger.debug("fp8 training: %d frozen block linears in e4m3 (forward and input gradient)", count)
    return count
