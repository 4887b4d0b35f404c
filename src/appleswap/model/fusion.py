"""Fused input projections: the linears that read the same normalised tokens run as ONE matrix multiply.

A FLUX single block multiplies its normalised tokens by ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` (3 x 3072 +
12288 outputs); a double block does the same with ``to_q/k/v`` (image stream) and ``add_q/k/v_proj`` (text stream).
Four (or three) mid-sized GEMMs leave part of the GPU idle in their last wave; one GEMM of the stacked weights fills
it. The stacked weight is one buffer and the member layers' weights become row views of it, so no memory is added
and the layers (state dict, LoRA, loading) stay as they are. The LoRA deltas are still computed per member layer on
the condition tokens only and added to the matching columns. Same function as the separate layers (bit-identical
in fp32 on the CPU; bf16 GEMMs may round differently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from appleswap.model.lora import _active_adapters, add_to_rows, is_lora_layer, lora_delta

DOUBLE_GROUPS = {"qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "add_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_GROUPS = {"qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
ATTRIBUTE = "apple_fused"  # nn.ModuleDict of FusedProjection on each fused block


def _base(layer: nn.Module) -> nn.Module:
    return layer.base_layer if is_lora_layer(layer) else layer


class FusedProjection(nn.Module):
    """The stacked weight (sum of outputs, in) and bias of ``layers``; the layers' own weights are views of it.

    The member layers are kept in a plain list (not registered twice as submodules).
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        bases = [_base(layer) for layer in layers]
        if any(type(base) is not nn.Linear for base in bases):
            raise ValueError("fused projections need plain nn.Linear layers (fuse before quantising to fp8)")
        self.sizes = [base.out_features for base in bases]
        weight = torch.cat([base.weight.detach() for base in bases])
        has_bias = [base.bias is not None for base in bases]
        if any(has_bias) and not all(has_bias):
            raise ValueError("fused projections need all layers with bias or all without")
        bias = torch.cat([base.bias.detach() for base in bases]) if all(has_bias) else None
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        for base, rows, bias_rows in zip(bases, weight.split(self.sizes), self._split_bias(), strict=True):
            base.weight = nn.Parameter(rows, requires_grad=False)  # a view: no second copy of the weights
            if bias_rows is not None:
                base.bias = nn.Parameter(bias_rows, requires_grad=False)
        self.layers = list(layers)

    def _split_bias(self) -> list[torch.Tensor | None]:
        return list(self.bias.split(self.sizes)) if self.bias is not None else [None] * len(self.sizes)


def fuse_block(block: nn.Module) -> None:
    """Stack the projections of one FLUX block (double or single) into :class:`FusedProjection` groups."""
    groups = DOUBLE_GROUPS if hasattr(block, "norm1_context") else SINGLE_GROUPS
    modules = dict(block.named_modules())
    block.add_module(ATTRIBUTE, nn.ModuleDict(
        {name: FusedProjection([modules[member] for member in members]) for name, members in groups.items()}))


def unfuse_block(block: nn.Module) -> None:
    """Give every member layer its own weight storage again and drop the stacked buffers."""
    fused = getattr(block, ATTRIBUTE, None)
    if fused is None:
        return
    for group in fused.values():
        for layer in group.layers:
            base = _base(layer)
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
            if base.bias is not None:
                base.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    delattr(block, ATTRIBUTE)


def fused_projection(block: nn.Module, name: str) -> FusedProjection | None:
    """The block's fused group ``name``, or None when the block is not fused."""
    fused = getattr(block, ATTRIBUTE, None)
    return None if fused is None else fused[name]


def routed_fused(fused: FusedProjection, x: torch.Tensor, cond_start: int | None) -> list[torch.Tensor]:
    """Every member layer's output (LoRA on tokens ``cond_start:`` only) from one base matmul.

    Each member's LoRA delta is added to that member's slice of the output, not to the stacked output: under
    ``torch.compile`` the addition then fuses into the slice's consumer (norm, activation) instead of copying the
    whole stacked output once more.
    """
    outputs = list(F.linear(x, fused.weight, fused.bias).split(fused.sizes, dim=-1))
    if cond_start is None or cond_start >= x.shape[1]:
        return outputs
    cond = x[:, cond_start:]
    deltas = stacked_lora_deltas(fused, cond)
    if deltas is None:  # several adapters, dropout or DoRA: one member at a time
        deltas = [lora_delta(layer, cond) if is_lora_layer(layer) else None for layer in fused.layers]
    for index, delta in enumerate(deltas):
        if delta is not None:
            outputs[index] = add_to_rows(outputs[index], cond_start, delta)
    return outputs


def stacked_lora_deltas(fused: FusedProjection, cond: torch.Tensor) -> list[torch.Tensor] | None:
    """The members' LoRA deltas with ONE down-projection: their ``lora_A`` matrices stacked (r x members rows),
    then each member's ``lora_B`` on its slice. None unless every member has exactly one active plain adapter."""
    adapters = []
    for layer in fused.layers:
        names = _active_adapters(layer) if is_lora_layer(layer) else []
        if len(names) != 1:
            return None
        name = names[0]
        if not isinstance(layer.lora_dropout[name], nn.Identity) or getattr(layer, "use_dora", {}).get(name, False):
            return None
        adapters.append((layer, name))
    stacked = torch.cat([layer.lora_A[name].weight for layer, name in adapters])
    down = F.linear(cond.to(stacked.dtype), stacked)
    ranks = [layer.lora_A[name].weight.shape[0] for layer, name in adapters]
    return [layer.lora_B[name](part) * layer.scaling[name]
            for (layer, name), part in zip(adapters, down.split(ranks, dim=-1), strict=True)]
