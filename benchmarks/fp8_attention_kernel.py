"""fp8 attention for ``probe_fp8_attention.py``: the joint attention's two products in e4m3 on Hopper.

Not adopted (``RESULTS.md``, round 9): on an H100 it is slower than cuDNN's bf16 attention and 20-80x less
accurate. Why it was tried: with fp8 weights the attention is the largest bf16 part of a pass (cuDNN, ~8 ms of
~59 ms on an H100) and torch's SDPA has no fp8 kernel. Scheme (FlashAttention-style online softmax, one Triton program per tile of
queries of one head):

- queries, keys and values are quantised per (token, head) with one fp32 scale each (``s = amax / 448``); the
  query scale carries the softmax scale and log2(e), so ``S = s_q s_k (q8 . k8)`` is in base-2 logits;
- ``P V``: P (<= 1 after the running max) times each key's value scale is re-scaled by the tile's largest value
  scale to span e4m3's range (small probabilities would underflow at their own size), quantised, and multiplied
  with the e4m3 values; the tile factor goes back on the fp32 product. ``pv_fp8=False`` keeps ``P V`` in bf16.

:func:`fp8_attention_reference` is the same arithmetic in torch (the CPU path and the tests' reference).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - a torch build without Triton
    triton = None

from appleswap.model.fp8 import FP8, FP8_MAX, ROUND_UP

LOG2E = 1.4426950408889634


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 to e4m3, rounding to nearest as the GPU does. A check under Triton's interpreter swaps in the interpreter's
    own cast, which can lose the carry into the next power of two."""
    return x.to(FP8)


def quantize_heads(x: torch.Tensor, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values (B, H, N, D), fp32 scales (B, H, N)) of ``x`` (B, N, H, D); ``x ~= values * scale / factor``."""
    values = x.float().transpose(1, 2)
    scale = (values.abs().amax(dim=-1) * (ROUND_UP / FP8_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
    return _to_e4m3(values / scale[..., None]), scale * factor


def fp8_attention_reference(query, key, value, block_n: int = 128, pv_fp8: bool = True) -> torch.Tensor:
    """The kernel's arithmetic in torch, tile by tile over ``block_n`` keys with the running max: (B, N, H, D) in,
    (B, N, H * D) out in the query's dtype."""
    head_dim, tokens = query.shape[-1], key.shape[1]
    q8, q_scale = quantize_heads(query, LOG2E / math.sqrt(head_dim))
    k8, k_scale = quantize_heads(key)
    v8, v_scale = quantize_heads(value) if pv_fp8 else (value.transpose(1, 2), None)
    running_max = torch.full(q8.shape[:-1], -math.inf, device=query.device)
    total = torch.zeros(q8.shape[:-1], device=query.device)
    acc = torch.zeros(q8.shape, device=query.device)
    for start in range(0, tokens, block_n):
        keys = slice(start, min(start + block_n, tokens))
        logits = (q8.float() @ k8[..., keys, :].float().transpose(-1, -2)) * q_scale[..., None]
        logits = logits * k_scale[..., None, keys]
        new_max = torch.maximum(running_max, logits.amax(dim=-1))
        probs = torch.exp2(logits - new_max[..., None])
        alpha = torch.exp2(running_max - new_max)
        total = total * alpha + probs.sum(dim=-1)
        acc = acc * alpha[..., None]
        if pv_fp8:
            top = v_scale[..., keys].amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
            weights = _to_e4m3(probs * (v_scale[..., None, keys] * (FP8_MAX / top[..., None]))).float()
            acc = acc + (weights @ v8[..., keys, :].float()) * (top[..., None] / FP8_MAX)
        else:
            acc = acc + probs.to(value.dtype).float() @ v8[..., keys, :].float()
        running_max = new_max
    out = acc / total[..., None]
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


if triton is not None:

    @triton.jit
    def _quantize_heads_kernel(x_ptr, x_sb, x_sn, out_ptr, scale_ptr, tokens, n_pad, FACTOR: tl.constexpr,
                               MARGIN: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                               TRANSPOSED: tl.constexpr):
        """BLOCK_T tokens of one head: e4m3 values ((B*H, N, D), or (B*H, D, n_pad) when TRANSPOSED) and the
        scales (B*H, N) times FACTOR (a constexpr: inductor passes floats as fp64, which cannot become e4m3)."""
        head = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        dims = tl.arange(0, DIM)
        mask = rows[:, None] < tokens
        x = tl.load(x_ptr + batch * x_sb + rows[:, None].to(tl.int64) * x_sn + head * DIM + dims[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1) * MARGIN, 1.1754943508222875e-38)  # MARGIN: ROUND_UP / FP8_MAX
        values = (x / scale[:, None]).to(out_ptr.dtype.element_ty)
        bh = batch * HEADS + head
        if TRANSPOSED:
            tl.store(out_ptr + (bh * DIM + dims[None, :]) * n_pad + rows[:, None], values, mask=mask)
        else:
            tl.store(out_ptr + (bh * tokens + rows[:, None]) * DIM + dims[None, :], values, mask=mask)
        tl.store(scale_ptr + bh * tokens + rows, scale * FACTOR, mask=rows < tokens)

    @triton.jit
    def _fp8_attention_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, v_sb, v_sn, o_ptr, tokens, n_pad,
                              HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              PV_FP8: tl.constexpr):
        """BLOCK_M queries of one head against all keys, online softmax in base 2 (see the module docstring)."""
        bh = tl.program_id(1).to(tl.int64)
        batch, head = bh // HEADS, bh % HEADS
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, DIM)
        q = tl.load(q_ptr + (bh * tokens + rows[:, None]) * DIM + dims[None, :], mask=rows[:, None] < tokens, other=0.0)
        q_scale = tl.load(qs_ptr + bh * tokens + rows, mask=rows < tokens, other=0.0)
        running_max = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DIM), tl.float32)
        for start in range(0, tokens, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            valid = cols < tokens
            k = tl.load(k_ptr + (bh * tokens + cols[:, None]) * DIM + dims[None, :], mask=valid[:, None], other=0.0)
            k_scale = tl.load(ks_ptr + bh * tokens + cols, mask=valid, other=0.0)
            logits = tl.dot(q, tl.trans(k)) * q_scale[:, None] * k_scale[None, :]
            logits = tl.where(valid[None, :], logits, -float("inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            probs = tl.exp2(logits - new_max[:, None])
            alpha = tl.exp2(running_max - new_max)
            total = total * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None]
            if PV_FP8:
                v_scale = tl.load(vs_ptr + bh * tokens + cols, mask=valid, other=0.0)
                top = tl.maximum(tl.max(v_scale, axis=0), 1.1754943508222875e-38)
                weights = (probs * (v_scale * (448.0 / top))[None, :]).to(v_ptr.dtype.element_ty)
                v_t = tl.load(v_ptr + (bh * DIM + dims[:, None]) * n_pad + cols[None, :], mask=valid[None, :], other=0.0)
                acc += tl.dot(weights, tl.trans(v_t)) * (top / 448.0)
            else:
                v = tl.load(v_ptr + batch * v_sb + cols[:, None].to(tl.int64) * v_sn + head * DIM + dims[None, :],
                            mask=valid[:, None], other=0.0)
                acc = tl.dot(probs.to(v.dtype), v, acc)
            running_max = new_max
        out = acc / total[:, None]
        dst = o_ptr + (batch * tokens + rows[:, None]) * (HEADS * DIM) + head * DIM + dims[None, :]
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < tokens)

    def quantize_operands(query, key, value, pv_fp8: bool = True, wrap: bool = True) -> list[torch.Tensor]:
        """[q8, q scales, k8, k scales, v8 transposed (B*H, D, n_pad) or the bf16 values, v scales or empty]."""
        batch, tokens, heads, dim = query.shape
        n_pad = -(-tokens // 16) * 16  # 16-byte rows for the transposed values
        quantize = torch.library.wrap_triton(_quantize_heads_kernel) if wrap else _quantize_heads_kernel
        grid = (triton.cdiv(tokens, 32), heads, batch)
        operands = []
        for x, factor, transposed in ((query, LOG2E / math.sqrt(dim), False), (key, 1.0, False),
                                      (value, 1.0, True)):
            if transposed and not pv_fp8:
                operands += [value, value.new_empty(0, dtype=torch.float32)]
                continue
            shape = (batch * heads, dim, n_pad) if transposed else (batch * heads, tokens, dim)
            values = torch.empty(shape, dtype=FP8, device=query.device)
            scales = torch.empty(batch * heads, tokens, dtype=torch.float32, device=query.device)
            quantize[grid](x, x.stride(0), x.stride(1), values, scales, tokens, n_pad, FACTOR=factor,
                           MARGIN=ROUND_UP / FP8_MAX, HEADS=heads,
                           DIM=dim, BLOCK_T=32, TRANSPOSED=transposed)
            operands += [values, scales]
        return operands

    def launch_fp8_attention(query, key, value, pv_fp8: bool = True, block_m: int = 128, block_n: int = 128,
                             num_warps: int = 8, num_stages: int = 2, wrap: bool = True,
                             operands: list | None = None) -> torch.Tensor:
        """(B, N, H * D) in the query's dtype from (B, N, H, D) inputs whose last two dims are contiguous;
        ``operands``: :func:`quantize_operands`' output, when already made (the probe times the parts)."""
        batch, tokens, heads, dim = query.shape
        operands = quantize_operands(query, key, value, pv_fp8, wrap) if operands is None else operands
        attend = torch.library.wrap_triton(_fp8_attention_kernel) if wrap else _fp8_attention_kernel
        out = query.new_empty(batch, tokens, heads * dim)
        attend[(triton.cdiv(tokens, block_m), batch * heads)](
            *operands, value.stride(0), value.stride(1), out, tokens, -(-tokens // 16) * 16, HEADS=heads, DIM=dim,
            BLOCK_M=block_m, BLOCK_N=block_n, PV_FP8=pv_fp8, num_warps=num_warps, num_stages=num_stages)
        return out
