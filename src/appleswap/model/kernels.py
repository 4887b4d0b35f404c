"""Triton kernels for the memory-bound steps that ``torch.compile`` leaves slow (inference on CUDA only).

``qk_norm_rope``: FLUX's per-head RMSNorm of queries and keys followed by RoPE, read once from the fused
projection's output and written once in attention layout. Inductor splits this into several kernels per block
(a looped reduction plus the rotation and the text/image concatenation: ~1.9 ms of a 75 ms pass on an H100).
One program normalises and rotates a tile of tokens of one head of the query or the key; the text and image
streams of a double block write into the same output at their token offsets (no concatenation).

Same arithmetic as the reference (``torch.nn.RMSNorm`` then diffusers' ``apply_rotary_emb``): fp32 statistics,
one rounding to the activation dtype after the norm, one after the rotation. The kernels are registered with
``torch.library.triton_op`` so that compiled blocks and CUDA graphs call them like any other kernel. Elsewhere
(CPU, autograd, no Triton, unusual shapes) the reference torch code runs; ``set_enabled(False)`` forces it (A/B).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

try:  # Triton ships with PyPI's CUDA builds of torch; the reference path needs nothing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - a torch build without Triton
    triton = None

_ENABLED = True


def set_enabled(enabled: bool) -> None:
    """Use the Triton kernels where they apply (default) or always the reference torch code (A/B runs).
    Compiled blocks keep the choice they were traced with: recompile after switching."""
    global _ENABLED
    _ENABLED = bool(enabled)


def enabled() -> bool:
    return _ENABLED and triton is not None


def qk_norm_rope_reference(q_parts, k_parts, q_norms, k_norms, rotary, head_dim: int):
    """(query, key) as (B, N, H, D): each part (B, N_i, H * D) normalised by its own RMSNorm, parts concatenated
    along the tokens, then diffusers' RoPE over all N tokens. ``q_norms``/``k_norms``: one module (or None) per
    part."""
    def heads(parts, norms):
        out = []
        for part, norm in zip(parts, norms, strict=True):
            part = part.unflatten(-1, (-1, head_dim))
            out.append(part if norm is None else norm(part))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    return (apply_rotary_emb(heads(q_parts, q_norms), rotary, sequence_dim=1),
            apply_rotary_emb(heads(k_parts, k_norms), rotary, sequence_dim=1))


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, q_stride_b, q_stride_n, k_stride_b, k_stride_n, wq_ptr, wk_ptr,
                             cos_ptr, sin_ptr, qo_ptr, ko_ptr, tokens, offset, total, eps,
                             HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_T: tl.constexpr):
        """One tile: BLOCK_T tokens of head ``program_id(1)`` (queries for heads < HEADS, keys above)."""
        head = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        dims = tl.arange(0, DIM)
        mask = rows[:, None] < tokens
        is_query = head < HEADS
        h = head % HEADS
        src = tl.where(is_query, q_ptr + batch * q_stride_b, k_ptr + batch * k_stride_b)
        stride = tl.where(is_query, q_stride_n, k_stride_n)
        x = tl.load(src + rows[:, None].to(tl.int64) * stride + h * DIM + dims[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / DIM + eps)
        weight = tl.load(tl.where(is_query, wq_ptr, wk_ptr) + dims).to(tl.float32)
        out_type = qo_ptr.dtype.element_ty
        y = (x * rstd[:, None] * weight[None, :]).to(out_type).to(tl.float32)  # the norm's rounding
        positions = (offset + rows)[:, None]
        cos = tl.load(cos_ptr + positions * DIM + dims[None, :], mask=mask, other=0.0)
        sin = tl.load(sin_ptr + positions * DIM + dims[None, :], mask=mask, other=0.0)
        real, imag = tl.split(tl.reshape(y, (BLOCK_T, DIM // 2, 2)))
        rotated = tl.reshape(tl.join(-imag, real), (BLOCK_T, DIM))
        out = (y * cos + rotated * sin).to(out_type)
        dst = tl.where(is_query, qo_ptr, ko_ptr) + batch * total * HEADS * DIM
        tl.store(dst + positions.to(tl.int64) * (HEADS * DIM) + h * DIM + dims[None, :], out, mask=mask)

    def launch_qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps: float, head_dim: int,
                            wrap: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Allocate (query, key) (B, N, H, D) and run one kernel per part. ``wrap=False`` calls the kernel
        directly (tests under ``TRITON_INTERPRET=1``); the op wraps it for ``torch.compile``."""
        first = q_parts[0]
        batch, width = first.shape[0], first.shape[-1]
        total = sum(part.shape[1] for part in q_parts)
        query = first.new_empty(batch, total, width // head_dim, head_dim)
        key = torch.empty_like(query)
        kernel = torch.library.wrap_triton(_qk_norm_rope_kernel) if wrap else _qk_norm_rope_kernel
        offset, block = 0, 32
        for q, k, wq, wk in zip(q_parts, k_parts, q_weights, k_weights, strict=True):
            tokens = q.shape[1]
            grid = (triton.cdiv(tokens, block), 2 * (width // head_dim), batch)
            kernel[grid](q, k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), wq, wk, cos, sin, query, key,
                         tokens, offset, total, eps, HEADS=width // head_dim, DIM=head_dim, BLOCK_T=block)
            offset += tokens
        return query, key

    @torch.library.triton_op("appleswap::qk_norm_rope", mutates_args={})
    def _qk_norm_rope_op(q_parts: list[torch.Tensor], k_parts: list[torch.Tensor], q_weights: list[torch.Tensor],
                         k_weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
                         head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, head_dim)


def _norm_eps(norm: nn.Module | None) -> float | None:
    """eps of a ``torch.nn.RMSNorm`` with a weight (None: not one the kernel computes)."""
    if type(norm) is not nn.RMSNorm or norm.weight is None or len(norm.normalized_shape) != 1:
        return None
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps  # as torch's fp32 statistics


def _kernel_applies(q_parts, k_parts, norms, rotary, head_dim: int) -> bool:
    first = q_parts[0]
    if not (enabled() and first.is_cuda and not torch.is_grad_enabled()):
        return False
    if first.dtype not in (torch.bfloat16, torch.float16) or head_dim & (head_dim - 1) or head_dim < 16:
        return False
    epsilons = {_norm_eps(norm) for norm in norms}
    if None in epsilons or len(epsilons) != 1:
        return False
    cos, sin = rotary
    total = sum(part.shape[1] for part in q_parts)
    if cos.dtype != torch.float32 or cos.shape != (total, head_dim) or not (cos.is_contiguous() and sin.is_contiguous()):
        return False
    return all(p.dim() == 3 and p.stride(-1) == 1 and p.shape[-1] == first.shape[-1] and p.shape[0] == first.shape[0]
               and p.dtype == first.dtype for p in (*q_parts, *k_parts))


def qk_norm_rope(q_parts: list[torch.Tensor], k_parts: list[torch.Tensor], q_norms: list, k_norms: list,
                 rotary: tuple[torch.Tensor, torch.Tensor], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised and rotated (query, key), each (B, N, H, D), from projection outputs (B, N_i, H * D) whose
    token ranges follow each other (double blocks: text part, then image part). One Triton kernel per part on
    CUDA inference, else :func:`qk_norm_rope_reference`."""
    norms = [*q_norms, *k_norms]
    if not _kernel_applies(q_parts, k_parts, norms, rotary, head_dim):
        return qk_norm_rope_reference(q_parts, k_parts, q_norms, k_norms, rotary, head_dim)
    eps = _norm_eps(norms[0])
    return torch.ops.appleswap.qk_norm_rope(list(q_parts), list(k_parts), [n.weight for n in q_norms],
                                            [n.weight for n in k_norms], rotary[0], rotary[1], eps, head_dim)
