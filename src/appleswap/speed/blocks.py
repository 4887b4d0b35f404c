"""Three-branch forwards of diffusers' FLUX blocks: text, image and condition tokens in one joint attention.

The condition tokens run the image-stream weights of each block with their own AdaLN modulation (from the
t = 0, guidance = 1 embedding) and with the LoRA switched on; text and image tokens run the frozen weights.
Every layer call goes through the diffusers block's own submodules (``norm1.linear``, ``attn.to_q``, ``ff``...).
Token layout inside a block: double blocks see ``hidden = [image; condition]`` and the text separately; single
blocks see ``[text; image; condition]``. ``split`` is where the condition starts (None: no condition tokens).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from appleswap.model.lora import base_linear, in_place_ok, routed_linear
from appleswap.speed.fusion import fused_projection, routed_fused
from appleswap.speed.kernels import ConcatInput, RowModulation, as_tensor, modulate_rows, qk_norm_rope


def branch_modulation(linear, temb: torch.Tensor | None, temb_cond: torch.Tensor | None,
                      cond_mod: torch.Tensor | None = None, main: torch.Tensor | None = None) -> torch.Tensor:
    """AdaLN parameters for the main tokens and (LoRA on) for the condition: (B, 1 or 2, k * D).

    ``cond_mod``: the condition's row precomputed once per swap (:func:`condition_modulation`), (1 or B, 1, k * D).
    ``main``: the main tokens' row precomputed for this timestep (``AppleTransformer.timestep_modulation``), or
    both rows (1, 2, k * D) when the step table holds them joined (``AppleTransformer.joined_modulation``).
    """
    if main is not None and main.shape[1] == 2:  # [main; condition], a view of the step's row: no concatenation
        return main if temb_cond is not None else main[:, :1]
    if main is None and cond_mod is None:  # both rows from one matmul (the training path)
        emb = F.silu(temb)[:, None]  # (B, 1, D)
        if temb_cond is None:
            return routed_linear(linear, emb, None)
        return routed_linear(linear, torch.cat([emb, F.silu(temb_cond)[:, None]], dim=1), 1)
    if main is None:
        main = routed_linear(linear, F.silu(temb)[:, None], None)  # (B, 1, k * D)
    if temb_cond is None:
        return main
    if cond_mod is None:
        cond_mod = condition_modulation(linear, temb_cond)
    batch = max(main.shape[0], cond_mod.shape[0])
    return torch.cat([main.expand(batch, -1, -1), cond_mod.to(main.dtype).expand(batch, -1, -1)], dim=1)


def condition_modulation(linear, temb_cond: torch.Tensor) -> torch.Tensor:
    """The condition branch's AdaLN row (LoRA on): depends only on t = 0 and the pooled text, so once per swap."""
    return routed_linear(linear, F.silu(temb_cond)[:, None], 0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int | None) -> torch.Tensor:
    """x * (1 + scale) + shift with per-branch parameters: shift/scale are (B, 1 or 2, D)."""
    if split is None:
        return torch.addcmul(shift[:, :1], x, 1 + scale[:, :1])
    if in_place_ok():  # eager inference: modulate the fresh normalised tensor in place, no concat
        main, cond = x[:, :split], x[:, split:]
        torch.addcmul(shift[:, :1], main, 1 + scale[:, :1], out=main)
        torch.addcmul(shift[:, 1:2], cond, 1 + scale[:, 1:2], out=cond)
        return x
    return modulate_rows(x, shift, scale, split)


def projection_input(block, group: str, norm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     split: int | None) -> torch.Tensor | ConcatInput:
    """``modulate(norm(x))`` as the input of the block's fused ``group``: left to the GEMM-input kernel
    (:class:`~appleswap.speed.kernels.RowModulation`, one pass where inductor ran four kernels) when the block is
    fused and ``norm`` is FLUX's LayerNorm without affine; else computed here."""
    if fused_projection(block, group) is None or type(norm) is not nn.LayerNorm or norm.elementwise_affine:
        return modulate(norm(x), shift, scale, split)
    return ConcatInput((x,), (None,), norm=RowModulation(shift, scale, split, norm.eps))


def _cond_modulated(norm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int | None):
    """A function recomputing the condition rows of ``modulate(norm(x), ...)`` (LayerNorm acts per token)."""
    if split is None:
        return None
    return lambda: torch.addcmul(shift[:, 1:2], norm(x[:, split:]), 1 + scale[:, 1:2])


def add_gated(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, split: int | None) -> torch.Tensor:
    """residual + gate * x with a per-branch gate (B, 1 or 2, D); in place on ``residual`` for inference."""
    if split is None:
        return torch.addcmul(residual, x, gate[:, :1])
    if in_place_ok():
        residual[:, :split].addcmul_(x[:, :split], gate[:, :1])
        residual[:, split:].addcmul_(x[:, split:], gate[:, 1:2])
        return residual
    return residual + torch.cat([x[:, :split] * gate[:, :1], x[:, split:] * gate[:, 1:2]], dim=1)


def _projections(block, group: str, layers, x: torch.Tensor, split: int | None,
                 cond_rows=None) -> list[torch.Tensor]:
    """The outputs of ``layers`` on ``x``: one stacked matmul when the block is fused (:mod:`fusion`).

    ``cond_rows``: a function recomputing ``x[:, split:]`` from x's inputs (lets a folded LoRA skip a copy)."""
    fused = fused_projection(block, group)
    if fused is not None:
        return routed_fused(fused, x, split, cond_rows)
    x = as_tensor(x)
    return [routed_linear(layer, x, split) if split is not None else base_linear(layer, x) for layer in layers]


@dataclasses.dataclass
class AttentionExtras:
    """Options of the "independent condition" mode: a boolean mask (N, N) keeping condition rows on condition
    columns, a list collecting each block's (key, value) after RoPE, or cached (key, value) appended to the keys."""

    mask: torch.Tensor | None = None
    record: list | None = None
    cached: list | None = None  # per call, in block order: (key, value) of the condition tokens

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.cached.pop(0) if self.cached else None

    def query_rows(self, rows: slice) -> AttentionExtras:
        """The same options for queries ``rows`` only (the mask's rows sliced; the lists shared)."""
        mask = None if self.mask is None else self.mask[rows]
        return dataclasses.replace(self, mask=mask)


def joint_attention(query, key, value, extras: AttentionExtras | None = None) -> torch.Tensor:
    """SDPA over all tokens (query and key already normalised and rotated); (B, N, H, Dh) in, (B, N, H*Dh) out."""
    mask = None
    if extras is not None:
        if extras.record is not None:
            extras.record.append((key, value))
        cached = extras.take()
        if cached is not None:
            key, value = torch.cat([key, cached[0]], dim=1), torch.cat([value, cached[1]], dim=1)
        mask = extras.mask
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


def double_block(block, hidden, context, temb, temb_cond, rotary, split, extras=None, cond_mod=None, main_mod=None):
    """One ``FluxTransformerBlock`` over text ``context`` (B, T, D) and ``hidden`` = [image; cond] (B, N, D).

    ``main_mod``: this timestep's AdaLN rows (image stream, text stream), each (1 or B, 1, 6D), precomputed."""
    attn = block.attn
    main_mod = main_mod if main_mod is not None else (None, None)
    mod = branch_modulation(block.norm1.linear, temb, temb_cond, cond_mod, main_mod[0])  # (B, 1|2, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    norm_hidden = projection_input(block, "qkv", block.norm1.norm, hidden, shift_msa, scale_msa, split)
    cond_rows = _cond_modulated(block.norm1.norm, hidden, shift_msa, scale_msa, split)
    # text stream: the frozen *_context weights with the image timestep, as in stock FLUX
    c_mod = main_mod[1] if main_mod[1] is not None else base_linear(block.norm1_context.linear, F.silu(temb))[:, None]
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod.chunk(6, dim=-1)
    norm_context = block.norm1_context.norm(context) * (1 + c_scale_msa) + c_shift_msa

    query, key, value = _projections(block, "qkv", (attn.to_q, attn.to_k, attn.to_v), norm_hidden, split, cond_rows)
    c_query, c_key, c_value = _projections(block, "add_qkv", (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                           norm_context, None)
    query, key = qk_norm_rope([c_query, query], [c_key, key], [attn.norm_added_q, attn.norm_q],
                              [attn.norm_added_k, attn.norm_k], rotary, attn.head_dim)  # text first
    value = torch.cat([c_value, value], 1).unflatten(-1, (-1, attn.head_dim))
    out = joint_attention(query, key, value, extras)
    text_len = context.shape[1]
    context_out, hidden_out = out[:, :text_len], out[:, text_len:]
    hidden_out = attn.to_out[1](_projections(block, "out", (attn.to_out[0],), hidden_out, split)[0])
    context_out = base_linear(attn.to_add_out, context_out.contiguous())

    hidden = add_gated(hidden, hidden_out, gate_msa, split)
    norm_hidden = modulate(block.norm2(hidden), shift_mlp, scale_mlp, split)
    ff = block.ff.net
    ff_in = routed_linear(ff[0].proj, norm_hidden, split)
    if _identity(ff[1]):  # GELU applied where the GEMM input is written (kernels.ConcatInput)
        ff_hidden = ConcatInput((ff_in,), (ff[0].approximate,))
    else:
        ff_hidden = ff[1](F.gelu(ff_in, approximate=ff[0].approximate))
    cond_rows = None if split is None else lambda: ff[1](F.gelu(ff_in[:, split:], approximate=ff[0].approximate))
    ff_out = _projections(block, "ff_out", (ff[2],), ff_hidden, split, cond_rows)[0]
    hidden = add_gated(hidden, ff_out, gate_mlp, split)

    context = context + c_gate_msa * context_out
    norm_context = block.norm2_context(context) * (1 + c_scale_mlp) + c_shift_mlp
    context = context + c_gate_mlp * _base_feed_forward(block.ff_context, norm_context)
    if hidden.dtype == torch.float16:
        hidden, context = hidden.clip(-65504, 65504), context.clip(-65504, 65504)
    return context, hidden


def _identity(module: nn.Module) -> bool:
    """A module that returns its input (FLUX's ``ff.net[1]``: dropout with p = 0, or any dropout in eval mode)."""
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and (module.p == 0 or not module.training))


def _base_feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    net = ff.net
    x = F.gelu(base_linear(net[0].proj, x), approximate=net[0].approximate)
    return base_linear(net[2], net[1](x))


def single_block(block, tokens, temb, temb_cond, rotary, split, extras=None, cond_mod=None, main_mod=None,
                 image_rows=None):
    """One ``FluxSingleTransformerBlock`` over ``tokens`` = [text; image; cond] (B, N, D); ``main_mod``: this
    timestep's AdaLN row (1 or B, 1, 3D), precomputed.

    ``image_rows``: (start, stop) for the last block, whose output the model reads only on the image tokens: every
    token still gives keys and values, but the queries, the MLP's second half and ``proj_out`` run on those rows
    alone (~60% of their work; same result). Returns just those rows then."""
    attn = block.attn
    mod = branch_modulation(block.norm.linear, temb, temb_cond, cond_mod, main_mod)  # (B, 1|2, 3D)
    shift, scale, gate = mod.chunk(3, dim=-1)
    normed = projection_input(block, "qkv_mlp", block.norm.norm, tokens, shift, scale, split)
    query, key, value, mlp_in = _projections(block, "qkv_mlp", (attn.to_q, attn.to_k, attn.to_v, block.proj_mlp),
                                             normed, split, _cond_modulated(block.norm.norm, tokens, shift, scale, split))
    query, key = qk_norm_rope([query], [key], [attn.norm_q], [attn.norm_k], rotary, attn.head_dim)
    if image_rows is not None:  # main-branch rows only from here on (image tokens come before the condition)
        rows = slice(*image_rows)
        query, mlp_in, tokens, split = query[:, rows], mlp_in[:, rows], tokens[:, rows], None
        extras = None if extras is None else extras.query_rows(rows)
    attn_out = joint_attention(query, key, value.unflatten(-1, (-1, attn.head_dim)), extras)
    cond_rows = None if split is None else lambda: torch.cat([attn_out[:, split:], block.act_mlp(mlp_in[:, split:])], 2)
    if isinstance(block.act_mlp, nn.GELU):  # GELU applied where the GEMM input is written (kernels.ConcatInput)
        proj_in = ConcatInput((attn_out, mlp_in), (None, block.act_mlp.approximate))
    else:
        proj_in = torch.cat([attn_out, block.act_mlp(mlp_in)], dim=2)
    out = _projections(block, "proj_out", (block.proj_out,), proj_in, split, cond_rows)[0]
    tokens = add_gated(tokens, out, gate, split)
    if tokens.dtype == torch.float16:
        tokens = tokens.clip(-65504, 65504)
    return tokens
