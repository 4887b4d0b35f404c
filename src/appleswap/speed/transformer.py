"""FastAppleTransformer: :class:`~appleswap.model.transformer.AppleTransformer` with every speed option the
inference passes use, computing the same function (the equivalence tests in ``tests/speed/`` compare each option
with the reference forward).

What it adds: a forward that also takes once-per-swap inputs (the condition's KV cache in the independent mode, the
condition's AdaLN rows, the main tokens' rows from a step table, and :class:`PassConstants`: the prompt embedding,
RoPE and the ID cross-attentions' keys/values), and the switches for fused projections (:mod:`.fusion`), fp8 block
weights (:mod:`.fp8`), regional ``torch.compile``, whole-pass CUDA graphs (:mod:`.cuda_graph`) and sequential
offload (:mod:`.offload`). Its block functions (:mod:`.blocks`) use the Triton kernels (:mod:`.kernels`) on CUDA.
Make one from a loaded model with :meth:`FastAppleTransformer.from_reference` (the modules are shared, not copied);
:func:`appleswap.speed.attach_speed` does that and applies a profile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from appleswap.model import lora as lora_lib
from appleswap.model.transformer import AppleTransformer, TextEmbeddings
from appleswap.speed.blocks import AttentionExtras, condition_modulation, double_block, single_block
from appleswap.speed.cuda_graph import CudaGraphRunner
from appleswap.speed.fp8 import fused_projection_for, quantize_blocks_fp8
from appleswap.speed.fp8_condition import drop_condition_weights
from appleswap.speed.fusion import ATTRIBUTE, fuse_block, unfuse_block
from appleswap.speed.offload import BlockOffloader

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ConditionCache:
    """Per-block (key, value) of the condition tokens (independent-condition mode), double blocks first."""

    keys_values: list


@dataclasses.dataclass
class ConditionModulation:
    """Once-per-swap constants of the condition branch (t = 0, guidance 1, fixed prompt): its time embedding
    ``temb`` (1, D) and every block's AdaLN row ``rows`` (1, 1, k * D), double blocks first."""

    temb: torch.Tensor
    rows: list


@dataclasses.dataclass
class TimestepModulation:
    """The main (text and image) tokens' AdaLN rows of every block and of ``norm_out``, one row per timestep:
    ``rows`` (S, W), the layers' outputs concatenated in block order (double blocks: image then text stream).

    They depend only on the timestep, the guidance and the pooled prompt, so a swap computes them for its whole
    schedule at once (one matmul per layer reads each weight once instead of once per step) and passes
    :meth:`step` to each pass. ``with_condition``: each block's image-stream row is followed by the condition's
    (:meth:`FastAppleTransformer.joined_modulation`), so a pass reads both as one view."""

    rows: torch.Tensor
    with_condition: bool = False

    def step(self, index: int) -> TimestepModulation:
        return TimestepModulation(self.rows[index:index + 1], self.with_condition)


@dataclasses.dataclass
class PassConstants:
    """What every pass of a swap computes alike: the prompt through ``context_embedder`` ``context`` (1 or B, T, D),
    RoPE's (cos, sin) over the token positions ``rotary``, and each ID cross-attention's keys and values of the ID
    tokens ``id_keys_values`` (list of (B, N, 2 * inner), or None). Build with
    :meth:`FastAppleTransformer.pass_constants`; same result, fewer kernels per pass."""

    context: torch.Tensor
    rotary: tuple
    id_keys_values: list | None = None


def _id_residual(attention: nn.Module, id_tokens: torch.Tensor | None, image: torch.Tensor,
                 keys_values: torch.Tensor | None = None) -> torch.Tensor:
    """One ID cross-attention, its keys and values of the ID tokens possibly precomputed (:class:`PassConstants`)."""
    return attention(id_tokens, image, keys_values)


class FastAppleTransformer(AppleTransformer):
    """The reference model's modules with the speed options' state; the same function, faster."""

    BLOCK_FUNCTIONS: ClassVar[dict] = {"double": double_block, "single": single_block, "id": _id_residual}

    def __init__(self, flux: nn.Module, id_attentions: nn.ModuleList | None = None):
        super().__init__(flux, id_attentions)
        self.offloader = None  # BlockOffloader while sequential offload is on
        self.graph_runner = None  # CudaGraphRunner while enable_cuda_graphs is on
        self._folded_fp8: list = []  # fused fp8 groups with a folded or merged LoRA (checked when it changes)
        self.fused_fold: bool | None = None  # fuse_projections' fold_lora while fused, None when not fused
        self.fused_condition = True  # fuse_projections' condition_weights
        self._state_modules: tuple = ((), (), [])  # modulation_state's layers, their adapters and submodules

    @classmethod
    def from_reference(cls, model: AppleTransformer) -> FastAppleTransformer:
        """The same modules (shared, not copied) and checkpointing settings behind the fast forward."""
        if isinstance(model, cls):
            return model
        fast = cls(model.flux, model.id_attentions)
        fast.gradient_checkpointing, fast.checkpointed_blocks = model.gradient_checkpointing, model.checkpointed_blocks
        return fast.train(model.training)

    def _add_id(self, index: int | None, hidden, start: int, length: int, id_tokens, id_weight: float,
                id_keys_values: list | None = None):
        if index is None or (id_tokens is None and id_keys_values is None) or not len(self.id_attentions):
            return hidden
        image = hidden[:, start:start + length]
        keys_values = None if id_keys_values is None else id_keys_values[index]
        residual = self._run(self.block_functions["id"], self.id_attentions[index], id_tokens, image, keys_values)
        if lora_lib.in_place_ok():  # eager inference: add into the image slice, no concatenation
            image.add_(residual, alpha=id_weight)
            return hidden
        image = image + id_weight * residual
        return torch.cat([hidden[:, :start], image, hidden[:, start + length:]], dim=1)

    def _block(self, index: int):
        """Context manager giving block ``index`` (doubles first) on the device (sequential offload aware)."""
        if self.offloader is not None:
            return self.offloader.resident(index)
        blocks = self.flux.transformer_blocks
        block = blocks[index] if index < len(blocks) else self.flux.single_transformer_blocks[index - len(blocks)]
        return contextlib.nullcontext(block)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, *, text: TextEmbeddings,
                img_ids: torch.Tensor, condition: torch.Tensor | None = None, id_tokens: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, id_weight: float = 1.0, independent_condition: bool = False,
                condition_cache: ConditionCache | None = None, modulation: ConditionModulation | None = None,
                timestep_modulation: TimestepModulation | None = None,
                constants: PassConstants | None = None) -> torch.Tensor:
        """The reference forward's velocity (:meth:`AppleTransformer.forward`, same arguments), with the once-per-swap
        inputs it may take precomputed:

        Args:
            condition_cache: from :meth:`build_condition_cache`: the independent mode with the condition's keys
                and values computed once per swap (then ``condition`` must be None).
            modulation: from :meth:`condition_modulation`: the condition's AdaLN rows computed once per swap
                (same result as without it, fewer matmuls per pass).
            timestep_modulation: from :meth:`timestep_modulation`, the row of this pass's timestep (one row for
                the whole batch, which must then share timestep and guidance; same result, fewer matmuls).
            constants: from :meth:`pass_constants` for this swap's prompt, positions and ID tokens (then pass
                ``id_tokens=None``; same result, fewer kernels).
        """
        kwargs = {"text": text, "img_ids": img_ids, "condition": condition, "id_tokens": id_tokens,
                  "guidance": guidance, "id_weight": id_weight, "independent_condition": independent_condition,
                  "condition_cache": condition_cache, "modulation": modulation,
                  "timestep_modulation": timestep_modulation, "constants": constants}
        stale = [group.refresh_lora() and group.condition is not None for group in self._folded_fp8]  # each one
        if any(stale):
            self._model_changed()  # merged condition weights went stale: those groups take another path
        if self.graph_runner is not None and self.offloader is None:
            return self.graph_runner(latents, timestep, **kwargs)  # falls back to eager off CUDA / with autograd
        return self._forward(latents, timestep, **kwargs)

    def _forward(self, latents, timestep, *, text, img_ids, condition, id_tokens, guidance, id_weight,
                 independent_condition, condition_cache, modulation, timestep_modulation,
                 constants=None) -> torch.Tensor:
        batch, length, _ = latents.shape
        text = text.expand(batch)
        if condition is not None and condition.shape != latents.shape:
            raise ValueError(f"condition {tuple(condition.shape)} must match latents {tuple(latents.shape)}")
        if condition_cache is not None and condition is not None:
            raise ValueError("pass either condition or condition_cache, not both")
        if constants is not None and id_tokens is not None:
            raise ValueError("pass either id_tokens or constants (which hold the ID keys and values), not both")
        if id_tokens is not None and id_tokens.shape[0] != batch:
            id_tokens = id_tokens.expand(batch, -1, -1)
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep
        main_rows, out_row = self._split_timestep_rows(timestep_modulation)
        streams = self._embed(latents, condition, timestep, guidance, text, img_ids, modulation,
                              timestep_embedding=main_rows is None, constants=constants)
        extras = None
        if condition is not None and independent_condition:
            extras = AttentionExtras(mask=self.independent_mask(text.prompt_embeds.shape[1], length, latents.device))
        elif condition_cache is not None:
            extras = AttentionExtras(cached=list(condition_cache.keys_values))
        rows = modulation.rows if modulation is not None and condition is not None else None
        id_keys_values = None if constants is None else constants.id_keys_values
        image = self._blocks(*streams, length, id_tokens, id_weight, extras, rows, main_rows, id_keys_values)
        if out_row is None:
            return self.flux.proj_out(self.flux.norm_out(image, streams[2]))
        scale, shift = out_row.to(image.dtype).chunk(2, dim=-1)  # AdaLayerNormContinuous's order
        return self.flux.proj_out(self.flux.norm_out.norm(image) * (1 + scale) + shift)

    def _embed(self, latents, condition, timestep, guidance, text, img_ids, modulation=None, timestep_embedding=True,
               constants=None):
        """Token embeddings, the two time embeddings and RoPE: (hidden, context, temb, temb_cond, rotary); temb is
        None without ``timestep_embedding`` (the rows were precomputed); context and RoPE from ``constants``."""
        flux, length = self.flux, latents.shape[1]
        tokens = torch.cat([latents, condition.to(latents.dtype)], 1) if condition is not None else latents
        hidden = lora_lib.routed_linear(flux.x_embedder, tokens, length if condition is not None else None)
        dtype = hidden.dtype
        temb = self.time_embedding(timestep, guidance, text.pooled, dtype) if timestep_embedding else None
        temb_cond = None
        if condition is not None and modulation is not None:
            temb_cond = modulation.temb.to(dtype).expand(latents.shape[0], -1)  # (1 or B, D) -> (B, D)
        elif condition is not None:
            temb_cond = self.time_embedding(torch.zeros_like(timestep), None, text.pooled, dtype)
        if constants is None:
            context = flux.context_embedder(text.prompt_embeds.to(dtype))
            rotary = self.rotary(text, img_ids, condition is not None, latents.device)
            return hidden, context, temb, temb_cond, rotary
        count = text.prompt_embeds.shape[1] + tokens.shape[1]
        if constants.rotary[0].shape[0] != count or constants.context.shape[1] != text.prompt_embeds.shape[1]:
            raise ValueError(f"constants were built for {constants.rotary[0].shape[0]} tokens, this pass has {count}"
                             " (build them with the same prompt, positions and condition)")
        context = constants.context.to(dtype).expand(latents.shape[0], -1, -1)
        return hidden, context, temb, temb_cond, constants.rotary

    @torch.no_grad()
    def pass_constants(self, text: TextEmbeddings, img_ids: torch.Tensor, id_tokens: torch.Tensor | None = None,
                       condition: bool = True) -> PassConstants:
        """The prompt through ``context_embedder``, RoPE over [text; image(; condition)] positions and the ID
        cross-attentions' keys and values of ``id_tokens`` (the batch the passes will get), once per swap: every
        pass over them computes the same. ``condition``: whether the passes carry condition tokens."""
        if text.prompt_embeds.shape[0] != 1:
            raise ValueError("pass_constants needs one prompt (batch 1)")
        context = self.flux.context_embedder(text.prompt_embeds.to(self.device, self.dtype))
        keys_values = None
        if id_tokens is not None and len(self.id_attentions):
            tokens = id_tokens.to(self.device)
            keys_values = [attention.keys_values(tokens, self.dtype) for attention in self.id_attentions]
        return PassConstants(context, self.rotary(text, img_ids, condition, self.device), keys_values)

    def _blocks(self, hidden, context, temb, temb_cond, rotary, length, id_tokens, id_weight, extras, rows=None,
                main_rows=None, id_keys_values=None):
        """Double then single blocks with the ID residuals; returns the image tokens (B, L, D).

        ``rows`` / ``main_rows``: precomputed condition / main-token AdaLN rows per block (doubles first), or None."""
        has_cond = temb_cond is not None
        split = length if has_cond else None
        num_double = len(self.flux.transformer_blocks)
        for n in range(num_double):
            with self._block(n) as block:
                context, hidden = self._run(self.block_functions["double"], block, hidden, context, temb, temb_cond, rotary, split,
                                            extras, None if rows is None else rows[n],
                                            None if main_rows is None else main_rows[n], block=n)
            hidden = self._add_id(self._ca_double.get(n), hidden, 0, length, id_tokens, id_weight, id_keys_values)
        text_len = context.shape[1]
        tokens = torch.cat([context, hidden], dim=1)
        split = text_len + length if has_cond else None
        num_single = len(self.flux.single_transformer_blocks)
        for n in range(num_single):
            # only the last block's image rows are read: without autograd it returns just those (training runs it
            # whole, so the LoRA weights that only act on its other rows keep their zero gradients, as in the reference)
            last = n == num_single - 1 and not torch.is_grad_enabled()
            with self._block(num_double + n) as block:
                tokens = self._run(self.block_functions["single"], block, tokens, temb, temb_cond, rotary, split, extras,
                                   None if rows is None else rows[num_double + n],
                                   None if main_rows is None else main_rows[num_double + n],
                                   (text_len, text_len + length) if last else None, block=num_double + n)
            start = 0 if last else text_len
            tokens = self._add_id(self._ca_single.get(n), tokens, start, length, id_tokens, id_weight, id_keys_values)
        return tokens if tokens.shape[1] == length else tokens[:, text_len:text_len + length]

    @torch.no_grad()
    def build_condition_cache(self, condition: torch.Tensor, text: TextEmbeddings,
                              img_ids: torch.Tensor) -> ConditionCache:
        """Run the condition tokens alone (t = 0, guidance 1, LoRA on, attending to themselves) once and keep
        each block's keys and values; later passes reuse them (independent-condition KV cache)."""
        batch = condition.shape[0]
        text = text.expand(batch)
        timestep = torch.zeros(batch, device=condition.device)
        temb_cond = self.time_embedding(timestep, None, text.pooled, self.dtype)
        hidden = lora_lib.routed_linear(self.flux.x_embedder, condition.to(self.dtype), 0)
        rotary = self.flux.pos_embed(img_ids.to(condition.device))
        context = hidden.new_zeros(batch, 0, hidden.shape[-1])
        extras = AttentionExtras(record=[])
        num_double = len(self.flux.transformer_blocks)
        for n in range(num_double):
            with self._block(n) as block:
                context, hidden = double_block(block, hidden, context, temb_cond, temb_cond, rotary, 0, extras)
        for n in range(len(self.flux.single_transformer_blocks)):
            with self._block(num_double + n) as block:
                hidden = single_block(block, hidden, temb_cond, temb_cond, rotary, 0, extras)
        return ConditionCache(extras.record)

    @torch.no_grad()
    def condition_modulation(self, text: TextEmbeddings) -> ConditionModulation:
        """The condition branch's time embedding and per-block AdaLN rows (LoRA on), computed once per swap.

        They depend only on t = 0, guidance 1 and the pooled prompt; pass the result as ``modulation=``."""
        pooled = text.pooled
        temb = self.time_embedding(torch.zeros(1, device=pooled.device), None, pooled, self.dtype)
        rows = []
        for n in range(len(self.flux.transformer_blocks) + len(self.flux.single_transformer_blocks)):
            with self._block(n) as block:
                linear = block.norm1.linear if hasattr(block, "norm1") else block.norm.linear
                rows.append(condition_modulation(linear, temb))
        return ConditionModulation(temb, rows)

    def _modulation_widths(self, with_condition: bool = False) -> list[int]:
        """Output widths of the main tokens' AdaLN linears in :class:`TimestepModulation` order (the image-stream
        rows doubled ``with_condition``)."""
        widths, factor = [], 2 if with_condition else 1
        for block in self.flux.transformer_blocks:
            widths += [factor * block.norm1.linear.out_features, block.norm1_context.linear.out_features]
        widths += [factor * block.norm.linear.out_features for block in self.flux.single_transformer_blocks]
        return widths + [self.flux.norm_out.linear.out_features]

    @torch.no_grad()
    def joined_modulation(self, table: TimestepModulation, condition: ConditionModulation) -> TimestepModulation:
        """``table`` with the condition's AdaLN row after each block's image-stream row, at every step: a pass then
        takes a block's [main; condition] rows as one view of its step's row, where it concatenated them (two
        small kernels per block). Once per schedule and prompt; the pass's result is the same."""
        if table.with_condition:
            return table
        pieces, steps = list(table.rows.split(self._modulation_widths(), dim=-1)), table.rows.shape[0]
        for index, row in zip(self._image_stream_rows(), condition.rows, strict=True):
            pieces[index] = torch.cat([pieces[index], row.reshape(1, -1).to(table.rows).expand(steps, -1)], dim=-1)
        return TimestepModulation(torch.cat(pieces, dim=-1), with_condition=True)

    def _image_stream_rows(self) -> list[int]:
        """Indices of the image streams' AdaLN rows among :meth:`_modulation_widths` (the condition's counterparts)."""
        num_double = len(self.flux.transformer_blocks)
        return [2 * n for n in range(num_double)] + [2 * num_double + n for n in range(len(self.flux.single_transformer_blocks))]

    @torch.no_grad()
    def timestep_modulation(self, timesteps: torch.Tensor, text: TextEmbeddings,
                            guidance: float | None = None) -> TimestepModulation:
        """The main tokens' AdaLN rows for ``timesteps`` (S,) in [0, 1] (FLUX ``guidance`` for all of them, None:
        1.0), one matmul per layer for all S; pass ``result.step(i)`` as ``timestep_modulation=``. Timesteps are
        rounded to the model dtype first, as the pipeline's passes get them."""
        if text.pooled.shape[0] != 1:
            raise ValueError("timestep_modulation needs one prompt (pooled batch 1)")
        steps = timesteps.to(self.device, self.dtype).reshape(-1)
        guide = None if guidance is None else torch.full_like(steps, guidance)
        emb = F.silu(self.time_embedding(steps, guide, text.pooled.to(self.device).expand(len(steps), -1),
                                          self.dtype))
        parts, num_double = [], len(self.flux.transformer_blocks)
        for n in range(num_double + len(self.flux.single_transformer_blocks)):
            with self._block(n) as block:
                linears = (block.norm1.linear, block.norm1_context.linear) if n < num_double else (block.norm.linear,)
                parts += [lora_lib.base_linear(linear, emb) for linear in linears]
        parts.append(self.flux.norm_out.linear(emb))
        return TimestepModulation(torch.cat(parts, dim=1))

    def modulation_state(self) -> tuple:
        """What the AdaLN rows depend on besides prompt and timestep: storage and in-place version of every tensor
        of the layers computing them (LoRA included) and the adapters' switches (a key for caching the rows).
        Their submodules are listed again only when the layers or their adapters change (walking them took ~1.5 ms
        of host time per call, three calls per swap); the tensors are read afresh every call."""
        modules = [self.flux.time_text_embed, self.flux.norm_out.linear]
        for block in self.flux.transformer_blocks:
            modules += [block.norm1.linear, block.norm1_context.linear]
        modules += [block.norm.linear for block in self.flux.single_transformer_blocks]
        loras = [m for m in modules if lora_lib.is_lora_layer(m)]
        adapters = tuple(tuple(m.lora_A) for m in loras)
        listed, listed_adapters, submodules = self._state_modules
        if adapters != listed_adapters or len(listed) != len(modules) or any(a is not b for a, b in zip(listed, modules)):
            submodules = [sub for module in modules for sub in module.modules()]
            self._state_modules = (modules, adapters, submodules)
        tensors = [t for sub in submodules for t in (*sub._parameters.values(), *sub._buffers.values()) if t is not None]
        switches = [(tuple(m.active_adapters), m.disable_adapters, tuple(m.scaling.items())) for m in loras]
        return tuple((t.data_ptr(), t._version) for t in tensors), tuple(switches)

    def _split_timestep_rows(self, modulation: TimestepModulation | None):
        """(per-block rows, norm_out row) as views (1, 1, width) of one step's row, or (None, None); the image
        streams' rows (1, 2, width) when joined with the condition's."""
        if modulation is None:
            return None, None
        if modulation.rows.shape[0] != 1:
            raise ValueError("timestep_modulation: pass one step's rows (TimestepModulation.step(i))")
        pieces = modulation.rows.split(self._modulation_widths(modulation.with_condition), dim=-1)
        num_double, image = len(self.flux.transformer_blocks), set(self._image_stream_rows())
        branches = 2 if modulation.with_condition else 1  # image streams: [main; condition] rows
        pieces = [p.unflatten(-1, (branches, -1)) if n in image else p[:, None] for n, p in enumerate(pieces)]
        per_block = [(pieces[2 * n], pieces[2 * n + 1]) for n in range(num_double)] + pieces[2 * num_double:-1]
        return per_block, pieces[-1]

    # ---- speed options (same function)
    def compile_blocks(self, mode: str | None = None, fullgraph: bool = True) -> None:
        """Regional ``torch.compile`` of the block functions (:func:`compile_block_functions`); recorded CUDA
        graphs are recorded anew."""
        self._model_changed()
        compile_block_functions(self, mode, fullgraph)

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        """Record each inference pass (per input signature) as one CUDA graph and replay it (:mod:`cuda_graph`):
        no per-kernel launch cost. Same function; on the CPU or with autograd the pass runs as usual."""
        self.graph_runner = CudaGraphRunner(self._forward) if enabled else None

    def _model_changed(self) -> None:
        """Weights moved or replaced: recorded CUDA graphs point at the old storage, so record anew."""
        if self.graph_runner is not None:
            self.graph_runner = type(self.graph_runner)(self._forward)

    def uncompile_blocks(self) -> None:
        """Back to the eager block functions (e.g. before quantising, to time the eager fp8 path)."""
        self._model_changed()
        self.block_functions = dict(self.BLOCK_FUNCTIONS)

    def fuse_projections(self, fold_lora: bool = True, condition_weights: bool = True) -> int:
        """Stack the linears that read the same tokens (q/k/v and MLP-in) into one GEMM per block and fold the
        condition LoRA into those GEMMs (:mod:`appleswap.speed.fusion`): same function; the LoRA columns raised the
        measured H100 peak from 26.1 to 26.6-26.8 GiB at FLUX size. ``fold_lora=False`` keeps the LoRA apart (for
        A/B timing). Call it after moving the model to its device and loading the LoRA (a later ``.to(device)``
        still computes the same, but stores the fused weights twice). After :meth:`quantize_fp8` it stacks the fp8
        weights (:class:`~appleswap.speed.fp8.Fp8FusedProjection`) and uses their merged condition weights
        (``condition_weights=False``: the fold instead, for A/B timing). Returns the number of fused blocks."""
        self._model_changed()

        if self.offloader is not None:
            raise ValueError("fuse_projections: turn sequential offload off first")
        self.unfuse_projections()  # fusing again (e.g. after a LoRA change) starts from separate layers
        blocks = list(self.flux.transformer_blocks) + list(self.flux.single_transformer_blocks)
        groups = [group for block in blocks for group in fuse_block(block, fold_lora, condition_weights,
                                                                               fused_projection_for)]
        self._folded_fp8 = [group for group in groups
                            if getattr(group, "_folded_b", None) or getattr(group, "condition", None) is not None]
        self.fused_fold, self.fused_condition = fold_lora, condition_weights
        if condition_weights:
            self._warn_unmerged(groups)
        return len(blocks)

    @staticmethod
    def _warn_unmerged(groups: list) -> None:
        """Say so when merged fp8 condition weights exist but hold another LoRA than the one loaded now."""
        unmerged = [group for group in groups if getattr(group, "condition", False) is None and group.fold_adapter
                    and any(getattr(getattr(layer, "base_layer", None), "condition_lora", None) is not None
                            for layer in group.layers)]
        if unmerged:
            logger.warning("%d fused fp8 groups fold the LoRA in: it is not the one merged when the model was "
                           "quantised (quantise after loading the LoRA for the faster merged weights)", len(unmerged))

    def is_fused(self) -> bool:
        return any(hasattr(block, ATTRIBUTE) for block in self.flux.transformer_blocks)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections` (each layer gets its own weight storage back)."""
        self._model_changed()

        self._folded_fp8, self.fused_fold = [], None
        for block in list(self.flux.transformer_blocks) + list(self.flux.single_transformer_blocks):
            unfuse_block(block)

    # ---- memory / numerics options
    def enable_sequential_offload(self, device: torch.device | str | None = None, prefetch: int = 1) -> None:
        """Keep the blocks' weights in pinned host memory, each copied in just before it runs (next prefetched)."""
        self._model_changed()

        if self.offloader is not None:
            return
        self.unfuse_projections()  # blocks move one by one: each layer needs its own storage
        drop_condition_weights(self.flux)  # unfused layers run the LoRA apart: no merged copies to move
        device = torch.device(device) if device is not None else self.device
        blocks = list(self.flux.transformer_blocks) + list(self.flux.single_transformer_blocks)
        self.offloader = BlockOffloader(blocks, device, prefetch=prefetch)
        self.place(device)

    def place(self, device: torch.device | str) -> FastAppleTransformer:
        """Move everything except host-offloaded blocks to ``device`` (no dtype change: fp8 buffers stay fp8)."""
        self._model_changed()
        skip = ("transformer_blocks", "single_transformer_blocks") if self.offloader is not None else ()
        for name, child in self.flux.named_children():
            if name not in skip:
                child.to(device)
        for name, param in self.flux.named_parameters(recurse=False):
            param.data = param.data.to(device)
        self.id_attentions.to(device)
        return self

    def disable_sequential_offload(self) -> None:
        if self.offloader is not None:
            self._model_changed()
            self.offloader.restore()
            self.offloader = None

    def quantize_fp8(self, include_modulation: bool = False, device: torch.device | str | None = None,
                     granularity: str = "row", fast_accum: bool = True, merge_condition: bool = True) -> int:
        """fp8 (e4m3; ``granularity`` "row": scales per output channel and token, "tensor": one each) weights for
        every block linear; LoRA and ID attentions stay. Changes numerics; irreversible (the bf16 weights are
        freed). ``device``: move each block there just before quantising it (load on the CPU, quantise onto the GPU
        one block at a time). ``fast_accum`` (default): the fp8 GEMMs accumulate in the tensor cores' own
        accumulator, faster on Hopper (:class:`~appleswap.speed.fp8.Fp8Linear`). ``merge_condition`` (default):
        the condition rows of the fused GEMMs get their own e4m3 weights with the LoRA merged, quantised now from
        the full-precision weights (:mod:`~appleswap.speed.fp8_condition`: faster, +5.3 GiB at FLUX size). Load
        the LoRA first. Returns the layer count.

        Afterwards move the model with :meth:`place` or ``.to(device)``, never ``.to(dtype)`` (it would cast the
        fp8 buffers)."""
        self._model_changed()

        if self.offloader is not None:
            raise ValueError("quantize_fp8: turn sequential offload off first (or quantise before enabling it)")
        self.unfuse_projections()  # quantise the separate layers; fuse_projections afterwards stacks them again
        return quantize_blocks_fp8(self.flux, include_modulation, device, granularity, fast_accum, merge_condition)

    # ---- LoRA
    def load_lora(self, path, rank: int | None = None) -> int:
        """Load a LoRA file (reference or our own); the rank is read from the file. Returns the rank.

        A fused model is unfused and fused again, so the new adapter is folded into the fused GEMMs."""
        self._model_changed()
        fused = self.is_fused()
        self.unfuse_projections()
        rank = super().load_lora(path, rank)
        if fused:
            self.fuse_projections()
        return rank


def compile_block_functions(model: AppleTransformer, mode: str | None = None, fullgraph: bool = True,
                            memory_budget: float | None = None) -> None:
    """Regional ``torch.compile``: the double-block, single-block and ID-attention functions are compiled once
    each and the graph is reused by every block of that kind (their weights are graph inputs), so compiling
    takes seconds-to-a-minute instead of minutes for the whole model. ``mode``: None (default),
    "reduce-overhead" (CUDA graphs per region) or "max-autotune-no-cudagraphs". The functional (not in-place)
    form of the blocks runs under compile; inductor fuses its slices and additions into neighbouring kernels.

    ``memory_budget`` (training, 0..1): selective activation checkpointing by the compiler. Each block graph keeps
    this share of the activations it would otherwise save for backward and recomputes the rest, choosing what is
    cheapest to recompute (norms and pointwise ops before matmuls and attention): torch's
    ``activation_memory_budget``, applied while these graphs compile and run. Same gradients.
    """
    import torch._dynamo

    if memory_budget is not None and not 0.0 <= memory_budget <= 1.0:
        raise ValueError(f"memory_budget {memory_budget} must be in [0, 1]")
    # one graph per block kind; a few extra for guidance batches / no-condition passes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    options = {"mode": mode, "fullgraph": fullgraph, "dynamic": False}
    compiled = {name: torch.compile(fn, **options) for name, fn in type(model).BLOCK_FUNCTIONS.items()}
    if memory_budget is not None:
        compiled = {name: _under_memory_budget(fn, memory_budget) for name, fn in compiled.items()}
    model.block_functions = compiled


def _under_memory_budget(compiled, budget: float):
    """``compiled`` called with torch's activation memory budget set (the partitioner reads it when the graph
    compiles, at the first call)."""
    import functools

    import torch._functorch.config

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compiled(*args, **kwargs)
    run.memory_budget = budget
    return run


def uncompile_block_functions(model: AppleTransformer) -> None:
    """Back to the model's eager block functions."""
    model.block_functions = dict(type(model).BLOCK_FUNCTIONS)
