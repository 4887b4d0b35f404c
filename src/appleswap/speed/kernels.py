"""Triton kernels for the memory-bound steps that ``torch.compile`` leaves slow (inference on CUDA only).

``qk_norm_rope``: FLUX's per-head RMSNorm of queries and keys followed by RoPE, read once from the fused
projection's output and written once in attention layout. Inductor splits this into several kernels per block
(a looped reduction plus the rotation and the text/image concatenation: 4.3 ms of a 75 ms pass on an H100).
One program normalises and rotates a tile of tokens of one head of the query or the key; the text and image
streams of a double block write into the same output at their token offsets (no concatenation).

``join_rows``: the input of a projection that reads a concatenation, ``[a | gelu(b) | z]`` (a single block's
``proj_out`` reads the attention output, the GELU of the MLP and, with the folded LoRA, ``z`` on condition rows;
a double block's ``ff.net.2`` reads ``[gelu(h) | z]``). Kept apart as a :class:`ConcatInput`, the pieces are read
once and written once as the GEMM's input; for fp8 the kernel also takes each row's amax and writes e4m3 values
and the row scale, where inductor reads the row twice (a looped reduction over ~15k columns: ~5.6 ms per pass).
The same kernel writes the input of the q/k/v projections, ``[AdaLN(LayerNorm(x)) | z]`` with the AdaLN row of
each token's branch (:class:`RowModulation`), where inductor ran four kernels (the norm's statistics, the
modulation, and for fp8 the amax and the cast).

Same arithmetic as the reference (``torch.nn.RMSNorm`` then diffusers' ``apply_rotary_emb``): fp32 statistics,
one rounding to the activation dtype after the norm, one after the rotation. The kernels are registered with
``torch.library.triton_op`` so that compiled blocks and CUDA graphs call them like any other kernel. Elsewhere
(CPU, autograd, no Triton, unusual shapes) the reference torch code runs; ``set_enabled(False)`` forces it (A/B).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from appleswap.speed.fp8_linear import FP8_MAX, ROUND_UP

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


def modulate_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int | None) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-branch rows: shift/scale (B, 1 or 2, D); tokens ``split:`` take row 1."""
    if split is None:
        return torch.addcmul(shift[:, :1], x, 1 + scale[:, :1])
    main = torch.addcmul(shift[:, :1], x[:, :split], 1 + scale[:, :1])
    cond = torch.addcmul(shift[:, 1:2], x[:, split:], 1 + scale[:, 1:2])
    return torch.cat([main, cond], dim=1)


@dataclasses.dataclass
class RowModulation:
    """LayerNorm without affine (``eps``), then AdaLN with per-branch rows (:func:`modulate_rows`): FLUX's
    ``norm1`` / ``norm`` before the q/k/v projections, applied to a :class:`ConcatInput`'s first part."""

    shift: torch.Tensor
    scale: torch.Tensor
    split: int | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return modulate_rows(F.layer_norm(x, x.shape[-1:], eps=self.eps), self.shift, self.scale, self.split)


@dataclasses.dataclass
class ConcatInput:
    """A projection input given as column pieces, concatenated only where needed: ``parts`` (B, N, K_i), each
    through GELU where ``gelu[i]`` names the approximation ("tanh", "none") or as it is (None), then ``tail``
    (B, N_t, K_t) on the last N_t rows (zeros above: the folded LoRA's ``z`` on condition tokens). ``norm``: a
    :class:`RowModulation` of the first part (then the only one)."""

    parts: tuple
    gelu: tuple
    tail: torch.Tensor | None = None
    norm: RowModulation | None = None

    @property
    def shape(self) -> tuple:
        first = self.parts[0]
        width = sum(p.shape[-1] for p in self.parts) + (0 if self.tail is None else self.tail.shape[-1])
        return (*first.shape[:-1], width)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def with_tail(self, tail: torch.Tensor) -> ConcatInput:
        return dataclasses.replace(self, tail=tail)

    def rows(self, start: int) -> torch.Tensor:
        """The concatenation of rows ``start:`` (the condition tokens), as a tensor."""
        norm = self.norm
        if norm is not None and norm.split is not None:
            norm = dataclasses.replace(norm, split=max(norm.split - start, 0))
        return ConcatInput(tuple(p[:, start:] for p in self.parts), self.gelu, norm=norm).join()

    def join(self, width: int | None = None) -> torch.Tensor:
        """The concatenation as one tensor (reference path), zero-padded on the right to ``width`` columns."""
        pieces = [p if g is None else F.gelu(p, approximate=g) for p, g in zip(self.parts, self.gelu, strict=True)]
        if self.norm is not None:
            pieces[0] = self.norm(pieces[0])
        if self.tail is not None:
            pieces.append(F.pad(self.tail, (0, 0, self.parts[0].shape[1] - self.tail.shape[1], 0)))
        joined = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
        return joined if width is None else F.pad(joined, (0, width - joined.shape[-1]))


def as_tensor(x) -> torch.Tensor:
    return x.join() if isinstance(x, ConcatInput) else x


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
                             cos_ptr, sin_ptr, qo_ptr, ko_ptr, tokens, offset, total, EPS: tl.constexpr,
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
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / DIM + EPS)  # EPS constexpr: inductor passes floats as fp64
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
                            wrap: bool = True, block: int = 32,
                            num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Allocate (query, key) (B, N, H, D) and run one kernel per part. ``wrap=False`` calls the kernel
        directly (tests under ``TRITON_INTERPRET=1``); the op wraps it for ``torch.compile``. ``block`` tokens per
        program and ``num_warps``: varying them made no difference inside a pass (``benchmarks/RESULTS.md``)."""
        first = q_parts[0]
        batch, width = first.shape[0], first.shape[-1]
        total = sum(part.shape[1] for part in q_parts)
        query = first.new_empty(batch, total, width // head_dim, head_dim)
        key = torch.empty_like(query)
        kernel = torch.library.wrap_triton(_qk_norm_rope_kernel) if wrap else _qk_norm_rope_kernel
        offset = 0
        for q, k, wq, wk in zip(q_parts, k_parts, q_weights, k_weights, strict=True):
            tokens = q.shape[1]
            grid = (triton.cdiv(tokens, block), 2 * (width // head_dim), batch)
            kernel[grid](q, k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), wq, wk, cos, sin, query, key,
                         tokens, offset, total, EPS=eps, HEADS=width // head_dim, DIM=head_dim, BLOCK_T=block,
                         num_warps=num_warps)
            offset += tokens
        return query, key

    @torch.library.triton_op("appleswap::qk_norm_rope", mutates_args={})
    def _qk_norm_rope_op(q_parts: list[torch.Tensor], k_parts: list[torch.Tensor], q_weights: list[torch.Tensor],
                         k_weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
                         head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_qk_norm_rope(q_parts, k_parts, q_weights, k_weights, cos, sin, eps, head_dim)


    @triton.jit
    def _gelu_tanh(x):
        """PyTorch's tanh GELU in fp32; tanh(u) = 1 - 2 / (exp(2u) + 1) (saturates cleanly at +-1)."""
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))

    @triton.jit
    def _layer_norm_modulate(x, cols, row, batch, shift_ptr, adaln_scale_ptr, m_sb, m_sr, split, dtype,
                             KA: tl.constexpr, EPS: tl.constexpr):
        """LayerNorm (no affine) of the row's first KA columns, then ``y * (1 + scale) + shift`` with the row's
        branch (0 before ``split``, 1 from it); rounded to ``dtype`` where the reference rounds."""
        in_a = cols < KA
        centred = tl.where(in_a, x - tl.sum(x, axis=0) / KA, 0.0)
        y = (centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / KA + EPS)).to(dtype).to(tl.float32)
        base = batch * m_sb + (row >= split).to(tl.int64) * m_sr
        shift = tl.load(shift_ptr + base + cols, mask=in_a, other=0.0).to(tl.float32)
        scale = tl.load(adaln_scale_ptr + base + cols, mask=in_a, other=0.0).to(tl.float32)
        y = (y * (1.0 + scale).to(dtype).to(tl.float32) + shift).to(dtype).to(tl.float32)
        return tl.where(in_a, y, 0.0)

    @triton.jit
    def _join_rows_kernel(a_ptr, a_sb, a_sn, b_ptr, b_sb, b_sn, t_ptr, t_sb, t_sn, out_ptr, scale_ptr, rows,
                          tail_start, width, shift_ptr, adaln_scale_ptr, m_sb, m_sr, split, KA: tl.constexpr,
                          KB: tl.constexpr, KT: tl.constexpr, GELU_A: tl.constexpr, GELU_B: tl.constexpr,
                          NORM: tl.constexpr, EPS: tl.constexpr, QUANT: tl.constexpr, FACTOR: tl.constexpr,
                          BLOCK: tl.constexpr):
        """One row: ``[a | b | tail]`` (GELU where flagged, or with NORM a's LayerNorm and AdaLN, rounded to the
        input dtype like the reference), zero padded to ``width``; with QUANT its amax, e4m3 values and fp32
        scale (``quantize_activation_rows``). FACTOR and EPS are constexprs: inductor passes float arguments as
        fp64, and fp64 cannot be cast to e4m3."""
        row = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        dtype = a_ptr.dtype.element_ty
        x = tl.load(a_ptr + batch * a_sb + row * a_sn + cols, mask=cols < KA, other=0.0).to(tl.float32)
        if GELU_A:
            x = _gelu_tanh(x).to(dtype).to(tl.float32)
        if NORM:
            x = _layer_norm_modulate(x, cols, row, batch, shift_ptr, adaln_scale_ptr, m_sb, m_sr, split, dtype, KA, EPS)
        if KB > 0:
            in_b = (cols >= KA) & (cols < KA + KB)
            b = tl.load(b_ptr + batch * b_sb + row * b_sn + (cols - KA), mask=in_b, other=0.0).to(tl.float32)
            if GELU_B:
                b = _gelu_tanh(b).to(dtype).to(tl.float32)
            x = tl.where(in_b, b, x)
        if KT > 0:
            in_t = (cols >= KA + KB) & (cols < KA + KB + KT) & (cols * 0 + row >= tail_start)  # tensor mask
            t = tl.load(t_ptr + batch * t_sb + (row - tail_start) * t_sn + (cols - KA - KB), mask=in_t, other=0.0)
            x = tl.where(in_t, t.to(tl.float32), x)
        flat = batch * rows + row
        if QUANT:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) * FACTOR, 1.1754943508222875e-38)  # fp32's tiny
            tl.store(out_ptr + flat * width + cols, (x / scale).to(out_ptr.dtype.element_ty), mask=cols < width)
            tl.store(scale_ptr + flat, scale)
        else:
            tl.store(out_ptr + flat * width + cols, x.to(out_ptr.dtype.element_ty), mask=cols < width)

    def launch_join_rows(a, b, tail, gelu_a: bool, gelu_b: bool, width: int, quantize: bool, shift=None, scale=None,
                         split: int = -1, eps: float = 0.0, wrap: bool = True,
                         num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(joined (B, N, width): e4m3 when ``quantize`` else a's dtype, row scales (B * N, 1) fp32 or empty).
        ``shift``/``scale`` (1 or B, 1 or 2, KA), same strides: a's LayerNorm (``eps``) and AdaLN, branch 1 from
        row ``split`` on (-1: every row branch 0). ``num_warps`` per program (default 8, 16 above 8,192 columns):
        alone 4 or 8 were faster, inside a pass no setting was (``benchmarks/RESULTS.md``)."""

        batch, rows = a.shape[0], a.shape[1]
        dtype = torch.float8_e4m3fn if quantize else a.dtype
        out = torch.empty(batch, rows, width, dtype=dtype, device=a.device)
        scales = torch.empty(batch * rows if quantize else 0, 1, dtype=torch.float32, device=a.device)
        b_ = a if b is None else b
        t_ = a if tail is None else tail
        norm = shift is not None
        shift_, scale_ = (shift, scale) if norm else (a, a)
        m_sb = 0 if not norm or shift.shape[0] == 1 else shift.stride(0)
        block = triton.next_power_of_2(width)
        kernel = torch.library.wrap_triton(_join_rows_kernel) if wrap else _join_rows_kernel
        kernel[(rows, batch)](
            a, a.stride(0), a.stride(1), b_, b_.stride(0), b_.stride(1), t_, t_.stride(0), t_.stride(1), out, scales,
            rows, rows - (0 if tail is None else tail.shape[1]), width, shift_, scale_, m_sb,
            shift_.stride(1) if norm else 0, split if split >= 0 else rows, KA=a.shape[-1],
            KB=0 if b is None else b.shape[-1], KT=0 if tail is None else tail.shape[-1], GELU_A=gelu_a,
            GELU_B=gelu_b, NORM=norm, EPS=eps, QUANT=quantize, FACTOR=ROUND_UP / FP8_MAX, BLOCK=block,
            num_warps=num_warps or (16 if block > 8192 else 8))
        return out, scales

    @torch.library.triton_op("appleswap::join_rows", mutates_args={})
    def _join_rows_op(a: torch.Tensor, b: torch.Tensor | None, tail: torch.Tensor | None, gelu_a: bool,
                      gelu_b: bool, width: int, quantize: bool, shift: torch.Tensor | None = None,
                      scale: torch.Tensor | None = None, split: int = -1,
                      eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_join_rows(a, b, tail, gelu_a, gelu_b, width, quantize, shift, scale, split, eps)


def _norm_applies(x: ConcatInput) -> bool:
    """The kernel's LayerNorm + AdaLN: one part without GELU, shift and scale (1 or B, 1 or 2, K) alike."""
    norm, first = x.norm, x.parts[0]
    if norm is None:
        return True
    shift, scale = norm.shift, norm.scale
    rows = 1 if norm.split is None else 2
    return (len(x.parts) == 1 and x.gelu[0] is None and shift.shape == scale.shape
            and shift.stride() == scale.stride() and shift.dim() == 3 and shift.shape[0] in (1, first.shape[0])
            and shift.shape[1] >= rows and shift.shape[2] == first.shape[-1] and shift.stride(-1) == 1
            and shift.dtype == first.dtype)


def join_applies(x: ConcatInput, width: int) -> bool:
    """Whether :func:`join_rows` runs the kernel for ``x``: CUDA inference, 16-bit pieces with unit column
    stride, at most two parts plus the tail, tanh GELU only, ``width`` no less than the pieces."""
    parts = (*x.parts, *(() if x.tail is None else (x.tail,)))
    first = x.parts[0]
    if not (enabled() and first.is_cuda and not torch.is_grad_enabled()) or len(x.parts) > 2:
        return False
    if any(g not in (None, "tanh") for g in x.gelu) or width < x.shape[-1] or width > 65536 or not _norm_applies(x):
        return False
    return all(p.dim() == 3 and p.stride(-1) == 1 and p.dtype == first.dtype and p.shape[0] == first.shape[0]
               for p in parts) and first.dtype in (torch.bfloat16, torch.float16)


def join_rows(x: ConcatInput, width: int, quantize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` joined and padded to ``width`` columns in one kernel (check :func:`join_applies` first); with
    ``quantize`` as e4m3 with one fp32 scale per row (flattened (B * N, 1)), else in x's dtype and an empty scale."""
    a, b = x.parts[0], x.parts[1] if len(x.parts) > 1 else None
    gelu_b = len(x.gelu) > 1 and x.gelu[1] is not None
    if x.norm is None:
        return torch.ops.appleswap.join_rows(a, b, x.tail, x.gelu[0] is not None, gelu_b, width, quantize)
    norm = x.norm
    split = -1 if norm.split is None else norm.split
    return torch.ops.appleswap.join_rows(a, b, x.tail, False, gelu_b, width, quantize, norm.shift, norm.scale, split,
                                         float(norm.eps))


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
