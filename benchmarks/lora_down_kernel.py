"""The folded LoRA's down-projection ``z = s A x`` on the condition rows as one Triton kernel, for
``probe_lora_down_kernel.py``. Not adopted (``RESULTS.md``, round 11): tuned, it takes 27 / 21 us per call where the
pass's inductor + cuBLAS path takes 51 / 40 us (``proj_out`` / ``ff.net.2``), but ~34 us against ~28 us for the
q/k/v inputs, and in a whole pass (with the partial sums added up by ``join_rows``) the fp8 pass went from 50.15 to
51.94-52.91 ms on an H100.

Why it was tried: a fused projection with the LoRA folded in needs ``z`` on the condition rows of its input before
the GEMM. For a single block's ``proj_out`` that input is ``[attention | GELU(MLP)]`` (15,360 columns), for a double
block's ``ff.net.2`` ``GELU(h)``, for the q/k/v projections ``AdaLN(LayerNorm(x))``. The pass writes those rows out
once more (inductor) and multiplies them with cuBLAS's split-K GEMMs. Here one kernel reads the pieces, applies the
GELU or the norm on the fly (rounded to the activation dtype where the reference rounds) and multiplies on the
tensor cores; long reductions are split into fp32 partial sums (``out[split, batch, row, n]``).
"""

from __future__ import annotations

import torch

from appleswap.model.kernels import triton

if triton is not None:
    import triton.language as tl

    from appleswap.model.kernels import _gelu_tanh

    @triton.jit
    def _row_statistics(a_ptr, rows_a, mask_m, KA: tl.constexpr, EPS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK: tl.constexpr):
        """Mean and 1 / std of each row's KA columns (two passes: the centred variance, as the join kernel)."""
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, KA, BLOCK):
            cols = k + tl.arange(0, BLOCK)
            x = tl.load(a_ptr + rows_a[:, None] + cols[None, :], mask=mask_m[:, None] & (cols[None, :] < KA), other=0.0)
            total += tl.sum(x.to(tl.float32), axis=1)
        mean = total / KA
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, KA, BLOCK):
            cols = k + tl.arange(0, BLOCK)
            valid = mask_m[:, None] & (cols[None, :] < KA)
            x = tl.load(a_ptr + rows_a[:, None] + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            centred = tl.where(valid, x - mean[:, None], 0.0)
            squares += tl.sum(centred * centred, axis=1)
        return mean, tl.rsqrt(squares / KA + EPS)

    @triton.jit
    def _accumulate(acc, x_ptr, x_rows, mask_m, w_ptr, offs_n, rank, lo, hi, offset, mean, rstd, shift_ptr,
                    adaln_scale_ptr, m_base, dtype, GELU: tl.constexpr, NORM: tl.constexpr, WIDTH: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        """acc + piece[:, lo - offset : hi - offset] @ A[:, lo:hi]^T, GELU / LayerNorm + AdaLN applied on the way."""
        for k in range(lo, hi, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            valid = cols < hi
            x = tl.load(x_ptr + x_rows[:, None] + (cols - offset)[None, :], mask=mask_m[:, None] & valid[None, :],
                        other=0.0)
            if GELU:
                x = _gelu_tanh(x.to(tl.float32)).to(dtype)
            if NORM:
                y = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None]).to(dtype).to(tl.float32)
                shift = tl.load(shift_ptr + m_base + cols, mask=valid, other=0.0).to(tl.float32)
                scale = tl.load(adaln_scale_ptr + m_base + cols, mask=valid, other=0.0).to(tl.float32)
                x = (y * (1.0 + scale).to(dtype).to(tl.float32)[None, :] + shift[None, :]).to(dtype)
            w = tl.load(w_ptr + offs_n[:, None] * WIDTH + cols[None, :], mask=(offs_n[:, None] < rank) & valid[None, :],
                        other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        return acc

    @triton.jit
    def _lora_down_kernel(a_ptr, a_sb, a_sn, b_ptr, b_sb, b_sn, w_ptr, ls_ptr, out_ptr, rows, start, rank,
                          shift_ptr, adaln_scale_ptr, m_sb, m_row, KA: tl.constexpr, KB: tl.constexpr,
                          GELU_A: tl.constexpr, GELU_B: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr,
                          K_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (row tile, rank tile + split, batch): ``lora_scale * (x_rows @ A^T)`` over the split's columns,
        written as fp32 partial sums ``out[split, batch, row, n]``. ``x`` = ``[a | b]`` from row ``start`` on, GELU
        where flagged; with NORM, ``a``'s LayerNorm then AdaLN with the modulation row at ``m_row``. The columns of
        ``a`` and of ``b`` are two loops (no masked loads of the other piece)."""
        n_tiles = tl.cdiv(rank, BLOCK_N)
        split = tl.program_id(1) // n_tiles
        offs_n = (tl.program_id(1) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        batch = tl.program_id(2).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < rows
        source_rows = (start + offs_m).to(tl.int64)
        rows_a = batch * a_sb + source_rows * a_sn
        dtype = a_ptr.dtype.element_ty
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = mean
        if NORM:
            mean, rstd = _row_statistics(a_ptr, rows_a, mask_m, KA, EPS, BLOCK_M, BLOCK_K)
        first = split * K_SPLIT
        last = tl.minimum(first + K_SPLIT, KA + KB)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        m_base = batch * m_sb + m_row
        acc = _accumulate(acc, a_ptr, rows_a, mask_m, w_ptr, offs_n, rank, first, tl.minimum(last, KA), 0, mean,
                          rstd, shift_ptr, adaln_scale_ptr, m_base, dtype, GELU_A, NORM, KA + KB, BLOCK_K)
        if KB > 0:
            acc = _accumulate(acc, b_ptr, batch * b_sb + source_rows * b_sn, mask_m, w_ptr, offs_n, rank,
                              tl.maximum(first, KA), last, KA, mean, rstd, shift_ptr, adaln_scale_ptr, m_base, dtype,
                              GELU_B, False, KA + KB, BLOCK_K)
        acc *= tl.load(ls_ptr + offs_n, mask=offs_n < rank, other=0.0).to(tl.float32)[None, :]
        target = out_ptr + ((split * tl.num_programs(2) + batch) * rows + offs_m[:, None]) * rank + offs_n[None, :]
        tl.store(target, acc, mask=mask_m[:, None] & (offs_n[None, :] < rank))

    DEFAULT_CONFIG = {"block_m": 64, "block_n": 64, "block_k": 64, "warps": 4, "stages": 3, "programs": 256}
    NORM_CONFIG = {"block_m": 32, "block_n": 64, "block_k": 64, "warps": 4, "stages": 3, "programs": 0}

    def launch_lora_down(a, b, gelu_a: bool, gelu_b: bool, weight, lora_scale, start: int, shift=None, scale=None,
                         cond_row: int = 1, eps: float = 0.0, wrap: bool = True, config=None) -> torch.Tensor:
        """fp32 partial sums (splits, B, N - start, rank) of ``lora_scale * ([a | b] @ weight^T)`` on rows
        ``start:``; ``shift``/``scale`` (1 or B, >= 2, KA): a's LayerNorm (``eps``) and AdaLN with row ``cond_row``.
        ``wrap=False`` calls the kernel directly (tests under ``TRITON_INTERPRET=1``); ``config``: tile sizes,
        warps, pipeline stages and the programs to aim for by splitting the reduction (``probe_lora_down_kernel.py``)."""
        norm = shift is not None
        config = {**(NORM_CONFIG if norm else DEFAULT_CONFIG), **(config or {})}
        batch, rows = a.shape[0], a.shape[1] - start
        rank, width = weight.shape
        block_m, block_n, block_k = config["block_m"], config["block_n"], config["block_k"]
        tiles = triton.cdiv(rows, block_m) * triton.cdiv(rank, block_n) * batch
        steps = triton.cdiv(width, block_k)
        splits = 1 if norm else max(1, min(steps, config["programs"] // tiles))
        k_split = triton.cdiv(steps, splits) * block_k
        splits = triton.cdiv(width, k_split)
        out = torch.empty(splits, batch, rows, rank, dtype=torch.float32, device=a.device)
        b_ = a if b is None else b
        shift_, scale_ = (shift, scale) if norm else (a, a)
        m_sb = 0 if not norm or shift.shape[0] == 1 else shift.stride(0)
        kernel = torch.library.wrap_triton(_lora_down_kernel) if wrap else _lora_down_kernel
        grid = (triton.cdiv(rows, block_m), triton.cdiv(rank, block_n) * splits, batch)
        kernel[grid](a, a.stride(0), a.stride(1), b_, b_.stride(0), b_.stride(1), weight, lora_scale, out, rows,
                     start, rank, shift_, scale_, m_sb, cond_row * shift_.stride(1) if norm else 0, KA=a.shape[-1],
                     KB=0 if b is None else b.shape[-1], GELU_A=gelu_a, GELU_B=gelu_b, NORM=norm, EPS=eps,
                     K_SPLIT=k_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=config["warps"],
                     num_stages=config["stages"])
        return out
