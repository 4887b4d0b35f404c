"""APPLE's transformer, the whole model in one file: diffusers' FLUX blocks run as three branches (text, noisy
image, clean condition), plus the condition-only LoRA and the 20 PuLID ID cross-attentions.

The branches (docs/method.md: The teacher): the condition tokens get timestep 0 and FLUX guidance 1, share the
image's position ids and are the only tokens the LoRA acts on (``routed_linear``); text and image tokens run the
frozen weights. ID cross-attention residuals are added to the image tokens after double blocks 0, 2, ... and single
blocks 0, 4, ...; only the image tokens reach ``norm_out``/``proj_out``. With no condition and no ID the forward
equals diffusers' ``FluxTransformer2DModel.forward``.

Token layout: double blocks see the text ``context`` apart and ``hidden = [image; condition]``; single blocks see
``tokens = [text; image; condition]``. ``split`` is where the condition tokens start (None: there are none), and
per-branch AdaLN parameters are (B, 1 or 2, D): the main tokens' row, then the condition's.

This is the reference path: plain PyTorch, layer by layer. Everything that makes it fast (fused projections, fp8,
Triton kernels, CUDA graphs, offload, per-swap constants) lives in :mod:`appleswap.speed`, which attaches through
one seam: ``block_functions`` (the functions the forward runs per block, swapped like diffusers' attention
processors) or :class:`appleswap.speed.transformer.FastAppleTransformer`, a subclass whose forward computes the same.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn
from torch.utils.checkpoint import checkpoint

from appleswap.files import save_tensors
from appleswap.model import lora as lora_lib
from appleswap.model.id_attention import id_attention_layout
from appleswap.model.lora import base_linear, routed_linear


@dataclasses.dataclass
class TextEmbeddings:
    """The fixed prompt's encodings: T5 ``prompt_embeds`` (B, T, 4096), CLIP ``pooled`` (B, 768), ``text_ids`` (T, 3)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor

    def to(self, device=None, dtype=None) -> TextEmbeddings:
        return TextEmbeddings(self.prompt_embeds.to(device=device, dtype=dtype),
                              self.pooled.to(device=device, dtype=dtype), self.text_ids.to(device=device))

    def expand(self, batch: int) -> TextEmbeddings:
        """Broadcast a batch-1 prompt to ``batch`` rows (views, no copy)."""
        if self.prompt_embeds.shape[0] == batch:
            return self
        if self.prompt_embeds.shape[0] != 1:
            raise ValueError(f"text embeddings have batch {self.prompt_embeds.shape[0]}, need 1 or {batch}")
        return TextEmbeddings(self.prompt_embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1), self.text_ids)


# ---- the pieces of a block, per branch

def branch_modulation(linear: nn.Module, temb: torch.Tensor, temb_cond: torch.Tensor | None) -> torch.Tensor:
    """AdaLN parameters (B, 1 or 2, k * D): the main tokens' from ``temb``, the condition's from ``temb_cond``
    with the LoRA on (both rows through one matmul)."""
    emb = F.silu(temb)[:, None]
    if temb_cond is None:
        return routed_linear(linear, emb, None)
    return routed_linear(linear, torch.cat([emb, F.silu(temb_cond)[:, None]], dim=1), 1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int | None) -> torch.Tensor:
    """``x * (1 + scale) + shift``, the main branch's parameters on tokens before ``split``, the condition's after."""
    if split is None:
        return torch.addcmul(shift[:, :1], x, 1 + scale[:, :1])
    return torch.cat([torch.addcmul(shift[:, :1], x[:, :split], 1 + scale[:, :1]),
                      torch.addcmul(shift[:, 1:2], x[:, split:], 1 + scale[:, 1:2])], dim=1)


def add_gated(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, split: int | None) -> torch.Tensor:
    """``residual + gate * x`` with the per-branch gate."""
    if split is None:
        return torch.addcmul(residual, x, gate[:, :1])
    return residual + torch.cat([x[:, :split] * gate[:, :1], x[:, split:] * gate[:, 1:2]], dim=1)


def heads(x: torch.Tensor, norm: nn.Module | None, head_dim: int) -> torch.Tensor:
    """(B, N, H * D) -> (B, N, H, D), RMS-normalised per head when ``norm`` is given (FLUX's QK norm)."""
    x = x.unflatten(-1, (-1, head_dim))
    return x if norm is None else norm(x)


def joint_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rotary: tuple,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on query and key, then attention over all tokens: (B, N, H, D) in, (B, N, H * D) out.

    ``mask``: (N, N) boolean, True where a row may attend (the independent-condition mode), or None."""
    query, key = apply_rotary_emb(query, rotary, sequence_dim=1), apply_rotary_emb(key, rotary, sequence_dim=1)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


# ---- the two block kinds

def double_block(block, hidden, context, temb, temb_cond, rotary, split, mask=None):
    """One ``FluxTransformerBlock``: text ``context`` (B, T, D) on the ``*_context`` weights, ``hidden`` =
    [image; condition] (B, N, D) on the image-stream weights (LoRA on the condition rows); one joint attention."""
    attn, text_len = block.attn, context.shape[1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = branch_modulation(
        block.norm1.linear, temb, temb_cond).chunk(6, dim=-1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = base_linear(
        block.norm1_context.linear, F.silu(temb))[:, None].chunk(6, dim=-1)  # text: the image timestep, as in FLUX

    # attention: [text; image; condition] queries, keys and values
    norm_hidden = modulate(block.norm1.norm(hidden), shift_msa, scale_msa, split)
    norm_context = block.norm1_context.norm(context) * (1 + c_scale_msa) + c_shift_msa
    query = torch.cat([heads(base_linear(attn.add_q_proj, norm_context), attn.norm_added_q, attn.head_dim),
                       heads(routed_linear(attn.to_q, norm_hidden, split), attn.norm_q, attn.head_dim)], dim=1)
    key = torch.cat([heads(base_linear(attn.add_k_proj, norm_context), attn.norm_added_k, attn.head_dim),
                     heads(routed_linear(attn.to_k, norm_hidden, split), attn.norm_k, attn.head_dim)], dim=1)
    value = torch.cat([heads(base_linear(attn.add_v_proj, norm_context), None, attn.head_dim),
                       heads(routed_linear(attn.to_v, norm_hidden, split), None, attn.head_dim)], dim=1)
    out = joint_attention(query, key, value, rotary, mask)
    context_out, hidden_out = out[:, :text_len], out[:, text_len:]

    # image and condition: attention output, then the MLP, each added with its gate
    hidden = add_gated(hidden, attn.to_out[1](routed_linear(attn.to_out[0], hidden_out, split)), gate_msa, split)
    ff = block.ff.net
    norm_hidden = modulate(block.norm2(hidden), shift_mlp, scale_mlp, split)
    ff_hidden = ff[1](F.gelu(routed_linear(ff[0].proj, norm_hidden, split), approximate=ff[0].approximate))
    hidden = add_gated(hidden, routed_linear(ff[2], ff_hidden, split), gate_mlp, split)

    # text: the frozen weights only
    context = context + c_gate_msa * base_linear(attn.to_add_out, context_out)
    norm_context = block.norm2_context(context) * (1 + c_scale_mlp) + c_shift_mlp
    context = context + c_gate_mlp * base_feed_forward(block.ff_context, norm_context)
    if hidden.dtype == torch.float16:
        hidden, context = hidden.clip(-65504, 65504), context.clip(-65504, 65504)
    return context, hidden


def base_feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    """A diffusers ``FeedForward`` on its frozen weights (the text stream never sees the LoRA)."""
    net = ff.net
    x = F.gelu(base_linear(net[0].proj, x), approximate=net[0].approximate)
    return base_linear(net[2], net[1](x))


def single_block(block, tokens, temb, temb_cond, rotary, split, mask=None):
    """One ``FluxSingleTransformerBlock`` over ``tokens`` = [text; image; condition] (B, N, D): attention and
    MLP side by side from one normalised input, joined by ``proj_out`` (LoRA on the condition rows)."""
    attn = block.attn
    shift, scale, gate = branch_modulation(block.norm.linear, temb, temb_cond).chunk(3, dim=-1)
    normed = modulate(block.norm.norm(tokens), shift, scale, split)
    query = heads(routed_linear(attn.to_q, normed, split), attn.norm_q, attn.head_dim)
    key = heads(routed_linear(attn.to_k, normed, split), attn.norm_k, attn.head_dim)
    value = heads(routed_linear(attn.to_v, normed, split), None, attn.head_dim)
    mlp = block.act_mlp(routed_linear(block.proj_mlp, normed, split))
    attn_out = joint_attention(query, key, value, rotary, mask)
    out = routed_linear(block.proj_out, torch.cat([attn_out, mlp], dim=2), split)
    tokens = add_gated(tokens, out, gate, split)
    if tokens.dtype == torch.float16:
        tokens = tokens.clip(-65504, 65504)
    return tokens


def id_residual(attention: nn.Module, id_tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """One PuLID ID cross-attention: the image tokens attend to the ID tokens (its output is added to them)."""
    return attention(id_tokens, image)


# ---- the model

class AppleTransformer(nn.Module):
    """FLUX transformer (``flux``) + ID cross-attentions (``id_attentions``), three-branch forward.

    Args:
        flux: a diffusers ``FluxTransformer2DModel`` (its LoRA adapter, if any, is PEFT's ``default``).
        id_attentions: ``IDCrossAttention`` modules in application order (doubles first), or None for no ID path.
    """

    #: the functions the forward runs per block; ``block_functions`` starts as a copy and :mod:`appleswap.speed`
    #: replaces entries (compiled versions) without touching the forward
    BLOCK_FUNCTIONS: ClassVar[dict] = {"double": double_block, "single": single_block, "id": id_residual}

    def __init__(self, flux: nn.Module, id_attentions: nn.ModuleList | None = None):
        super().__init__()
        self.flux = flux
        self.id_attentions = id_attentions if id_attentions is not None else nn.ModuleList()
        doubles, singles = id_attention_layout(len(flux.transformer_blocks), len(flux.single_transformer_blocks))
        if len(self.id_attentions) not in (0, len(doubles) + len(singles)):
            raise ValueError(f"{len(self.id_attentions)} ID cross-attentions given; this FLUX config needs "
                             f"{len(doubles) + len(singles)} ({len(doubles)} double + {len(singles)} single)")
        self._ca_double = {block: n for n, block in enumerate(doubles)}
        self._ca_single = {block: len(doubles) + n for n, block in enumerate(singles)}
        self.block_functions = dict(self.BLOCK_FUNCTIONS)
        self.gradient_checkpointing = False
        self.checkpointed_blocks: frozenset[int] = frozenset()  # block indices (doubles first) recomputed in backward

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the token embedder's weight). Not diffusers' ``ModelMixin.dtype``: that walks all
        ~4,800 modules of a FLUX with LoRA looking for hooks, ~10 ms of host time per call."""
        return next(self.flux.x_embedder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the passes run (the token embedder's weight; it stays there under every offload tier)."""
        return next(self.flux.x_embedder.parameters()).device

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, *, text: TextEmbeddings,
                img_ids: torch.Tensor, condition: torch.Tensor | None = None, id_tokens: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, id_weight: float = 1.0,
                independent_condition: bool = False) -> torch.Tensor:
        """Velocity (B, L, 64) for noisy ``latents`` (B, L, 64) at ``timestep`` (B,) in [0, 1].

        Args:
            text: prompt embeddings (batch 1 or B).
            img_ids: position ids (L, 3), shared by image and condition tokens.
            condition: clean condition tokens (B, L, 64) or None (two branches only).
            id_tokens: PuLID ID tokens (B or 1, 32, D) or None (ID cross-attentions skipped).
            guidance: FLUX guidance (B,) for text and image (None: 1.0); the condition always gets 1.0.
            id_weight: weight of the ID cross-attention residuals.
            independent_condition: OminiControl's independent mode (condition tokens attend to themselves only;
                APPLE's released setting is full joint attention).
        """
        batch, length, _ = latents.shape
        text = text.expand(batch)
        if condition is not None and condition.shape != latents.shape:
            raise ValueError(f"condition {tuple(condition.shape)} must match latents {tuple(latents.shape)}")
        id_tokens = None if id_tokens is None else id_tokens.expand(batch, -1, -1)
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        flux, run = self.flux, self.block_functions

        # embeddings: tokens (LoRA on the condition rows), the two time embeddings, the prompt, RoPE
        split = length if condition is not None else None
        tokens = torch.cat([latents, condition.to(latents.dtype)], 1) if condition is not None else latents
        hidden = routed_linear(flux.x_embedder, tokens, split)
        temb = self.time_embedding(timestep, guidance, text.pooled, hidden.dtype)
        temb_cond = None if condition is None else self.time_embedding(torch.zeros_like(timestep), None,
                                                                       text.pooled, hidden.dtype)
        context = flux.context_embedder(text.prompt_embeds.to(hidden.dtype))
        rotary = self.rotary(text, img_ids, condition is not None, latents.device)
        independent = condition is not None and independent_condition
        mask = self.independent_mask(text.prompt_embeds.shape[1], length, latents.device) if independent else None

        # double blocks, then single blocks over [text; image; condition]; ID residuals on the image tokens
        num_double = len(flux.transformer_blocks)
        for n, block in enumerate(flux.transformer_blocks):
            context, hidden = self._run(run["double"], block, hidden, context, temb, temb_cond, rotary, split, mask,
                                        block=n)
            hidden = self._add_id(self._ca_double.get(n), hidden, 0, length, id_tokens, id_weight)
        text_len = context.shape[1]
        tokens, split = torch.cat([context, hidden], dim=1), None if split is None else text_len + length
        for n, block in enumerate(flux.single_transformer_blocks):
            tokens = self._run(run["single"], block, tokens, temb, temb_cond, rotary, split, mask,
                               block=num_double + n)
            tokens = self._add_id(self._ca_single.get(n), tokens, text_len, length, id_tokens, id_weight)
        image = tokens[:, text_len:text_len + length]
        return flux.proj_out(flux.norm_out(image, temb))

    def time_embedding(self, timestep, guidance, pooled, dtype) -> torch.Tensor:
        """FLUX's time (+ guidance) + pooled-text embedding (B, D); timesteps in [0, 1] (FLUX scales by 1000)."""
        embed = self.flux.time_text_embed
        timestep = timestep.to(dtype) * 1000
        if not self.flux.config.guidance_embeds:
            return embed(timestep, pooled)
        guidance = guidance if guidance is not None else torch.ones_like(timestep)
        return embed(timestep, guidance.to(dtype) * 1000, pooled)

    def rotary(self, text: TextEmbeddings, img_ids: torch.Tensor, condition: bool, device) -> tuple:
        """RoPE (cos, sin) over [text; image(; condition)] positions: the condition reuses the image's ids."""
        ids = [text.text_ids, img_ids, img_ids] if condition else [text.text_ids, img_ids]
        return self.flux.pos_embed(torch.cat([i.to(device) for i in ids], dim=0))

    @staticmethod
    def independent_mask(text_len: int, length: int, device) -> torch.Tensor:
        """(N, N) boolean: every row sees every column, except condition rows, which see condition columns only."""
        total = text_len + 2 * length
        mask = torch.ones(total, total, dtype=torch.bool, device=device)
        mask[text_len + length:, :text_len + length] = False
        return mask

    def _add_id(self, index: int | None, tokens, start: int, length: int, id_tokens, id_weight: float):
        """``tokens`` with ID cross-attention ``index``'s residual added to the image rows ``start:start+length``."""
        if index is None or id_tokens is None or not len(self.id_attentions):
            return tokens
        image = tokens[:, start:start + length]
        image = image + id_weight * self._run(self.block_functions["id"], self.id_attentions[index], id_tokens, image)
        return torch.cat([tokens[:, :start], image, tokens[:, start + length:]], dim=1)

    # ---- training
    def enable_gradient_checkpointing(self, fraction: float = 1.0) -> None:
        """Recompute blocks (and ID cross-attentions) in backward to save activation memory.

        ``fraction`` < 1 keeps the activations of the last blocks (doubles first, then singles): less recomputation
        for more memory, the same gradients."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"checkpoint fraction {fraction} must be in [0, 1]")
        blocks = len(self.flux.transformer_blocks) + len(self.flux.single_transformer_blocks)
        self.gradient_checkpointing = True
        self.checkpointed_blocks = frozenset(range(round(fraction * blocks)))

    def _run(self, fn, *args, block: int | None = None):
        """``fn(*args)``, recomputed in backward when checkpointing covers ``block`` (None: any block's ID part)."""
        covered = block is None or block in self.checkpointed_blocks
        if self.gradient_checkpointing and covered and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ---- LoRA
    def has_lora(self) -> bool:
        return lora_lib.ADAPTER_NAME in getattr(self.flux, "peft_config", {})

    def add_lora(self, rank: int = 64, alpha: float | None = None, modules: list[str] | None = None,
                 init: str | bool = "gaussian", dropout: float = 0.0) -> None:
        """Add a fresh condition LoRA (APPLE's target modules by default, alpha = rank, Gaussian init)."""
        if modules is None:
            modules = lora_lib.apple_target_modules(len(self.flux.transformer_blocks),
                                                    len(self.flux.single_transformer_blocks))
        lora_lib.add_condition_lora(self.flux, modules, rank, alpha, init, dropout)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA tensors (adapter ``default``)."""
        return [p for name, p in self.flux.named_parameters() if ".lora_" in name]

    def save_lora(self, path: str | Path) -> Path:
        """Write the adapter as safetensors with the reference keys (``transformer.<module>.lora_A.weight``), its
        rank and alpha in diffusers' metadata."""
        if not self.has_lora():
            raise ValueError("save_lora: this transformer has no LoRA adapter (add_lora or load_lora first)")
        metadata = lora_lib.lora_file_metadata(self.flux)
        return save_tensors(path, lora_lib.lora_state_dict(self.flux), metadata=metadata)

    def load_lora(self, path: str | Path, rank: int | None = None) -> int:
        """Load a LoRA file (reference or our own); the rank is read from the file. Returns the rank."""
        rank = lora_lib.load_lora_into(self.flux, path, rank)
        self.flux.to(self.device)
        for param in self.lora_parameters():
            param.data = param.data.to(self.dtype)
        return rank
