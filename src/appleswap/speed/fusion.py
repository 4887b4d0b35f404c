"""Fused projections: the linears that read the same tokens run as ONE matrix multiply, with the condition LoRA
folded into it.

Stacking. A FLUX single block multiplies its normalised tokens by ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``
(3 x 3072 + 12288 outputs); a double block does the same with ``to_q/k/v`` (image stream) and ``add_q/k/v_proj``
(text stream). Four (or three) mid-sized GEMMs leave part of the GPU idle in their last wave; one GEMM of the
stacked weights fills it. The stacked weight is one buffer and the member layers' weights become views of it, so no
memory is added and the layers (state dict, LoRA, loading) stay as they are.

LoRA folding (inference). The condition LoRA adds ``s B A x`` on condition tokens only. Computed apart, that is
two skinny GEMMs per layer plus a copy of the whole output to add the delta to its condition rows (measured on an
H100: ~6 ms of a 76 ms pass). Folded, the stacked weight gets the members' ``B`` as extra input columns,
``[W | B_q 0 0 | 0 B_k 0 | ...]``, and the input gets ``z = s A x`` as extra features on condition rows (zeros
elsewhere): ``[x | z] [W | B]^T = W x + s B A x`` in the one GEMM that runs anyway, with ``r`` (or ``r x members``)
more reduction columns. The ``lora_A``/``lora_B`` weights become views of the fused buffers too, so the adapter
stays live (loading a LoRA file copies into them). With autograd the deltas are computed apart (the trainable
``B`` needs its own gradient). Same function as the separate layers (fp32 CPU tests; bf16 GEMMs may round
differently).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from appleswap.model.lora import _active_adapters, add_to_rows, is_lora_layer, lora_delta, plain_adapter
from appleswap.speed import kernels
from appleswap.speed.kernels import ConcatInput

DOUBLE_GROUPS = {"qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "add_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 "out": ("attn.to_out.0",), "ff_out": ("ff.net.2",)}
SINGLE_GROUPS = {"qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "proj_out": ("proj_out",)}
ATTRIBUTE = "apple_fused"  # nn.ModuleDict of FusedProjection on each fused block
_ALIGN = 8  # extra reduction columns padded to a multiple of 8 (16-byte rows for the GEMM)


def _base(layer: nn.Module) -> nn.Module:
    return layer.base_layer if is_lora_layer(layer) else layer


def _foldable_adapter(layers: list[nn.Module], dtype: torch.dtype, device: torch.device) -> str | None:
    """The adapter name if every LoRA member has exactly that one active plain adapter in the base dtype."""
    names = set()
    for layer in layers:
        if not is_lora_layer(layer):
            continue
        name = plain_adapter(layer)
        if name is None:
            return None
        weights = (layer.lora_A[name].weight, layer.lora_B[name].weight)
        if any(w.dtype != dtype or w.device != device for w in weights):
            return None
        names.add(name)
    return names.pop() if len(names) == 1 else None


class FusedProjection(nn.Module):
    """The stacked weight (sum of outputs, in + LoRA columns) and bias of ``layers``; the layers' own weights (and
    their LoRA matrices, when folded) are views of it. The members are kept in a plain list (not registered twice).
    """

    def __init__(self, layers: list[nn.Module], fold_lora: bool = True):
        super().__init__()
        bases = [_base(layer) for layer in layers]
        if any(type(base) is not nn.Linear for base in bases):
            raise ValueError("fused projections need plain nn.Linear layers (or fp8 layers: Fp8FusedProjection)")
        first = bases[0].weight
        extra = self._members(layers, bases, fold_lora, first.dtype, first.device, _ALIGN)
        stacked = first.new_zeros(sum(self.sizes), self.in_features + extra)
        stacked[:, :self.in_features] = torch.cat([base.weight.detach() for base in bases])
        self.register_buffer("weight_aug", stacked, persistent=False)
        self._share_storage(bases)

    def _members(self, layers: list[nn.Module], bases: list[nn.Module], fold_lora: bool, dtype: torch.dtype,
                 device: torch.device, align: int) -> int:
        """Sizes, foldable adapter, ranks and scalings of the members; the stacked bias and the LoRA buffers.
        Returns the number of extra (LoRA) reduction columns, a multiple of ``align``."""
        has_bias = [base.bias is not None for base in bases]
        if any(has_bias) and not all(has_bias):
            raise ValueError("fused projections need all layers with bias or all without")
        self.layers, self.sizes = list(layers), [base.out_features for base in bases]
        self.in_features = bases[0].in_features
        self.fold_adapter = _foldable_adapter(layers, dtype, device) if fold_lora else None
        self.ranks = [self._rank(layer) for layer in layers]
        self.fold_scaling = [self._scaling(layer) for layer in layers]
        extra = -(-sum(self.ranks) // align) * align
        bias = torch.cat([base.bias.detach() for base in bases]) if all(has_bias) else None
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("lora_down", torch.zeros(extra, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_scale", torch.zeros(extra, dtype=dtype, device=device), persistent=False)
        return extra

    def _rank(self, layer: nn.Module) -> int:
        return layer.lora_A[self.fold_adapter].weight.shape[0] if self.fold_adapter and is_lora_layer(layer) else 0

    def _scaling(self, layer: nn.Module) -> float:
        return layer.scaling[self.fold_adapter] if self.fold_adapter and is_lora_layer(layer) else 0.0

    @property
    def weight(self) -> torch.Tensor:
        """The stacked frozen weight (sum of outputs, in): a view of ``weight_aug`` without the LoRA columns."""
        return self.weight_aug[:, :self.in_features]

    def _share_storage(self, bases: list[nn.Module]) -> None:
        """Point every member's weight, bias and (folded) LoRA A / B at slices of the fused buffers."""
        row, column, bias = 0, self.in_features, self.bias
        for layer, base, size, rank, scaling in zip(self.layers, bases, self.sizes, self.ranks, self.fold_scaling,
                                                    strict=True):
            base.weight.data = self.weight_aug[row:row + size, :self.in_features]  # same Parameter, shared storage
            if bias is not None:
                base.bias.data = bias[row:row + size]
            if rank:
                offset = column - self.in_features
                a, b = layer.lora_A[self.fold_adapter], layer.lora_B[self.fold_adapter]
                self.weight_aug[row:row + size, column:column + rank] = b.weight.detach()
                self.lora_down[offset:offset + rank] = a.weight.detach()
                self.lora_scale[offset:offset + rank] = scaling
                b.weight.data = self.weight_aug[row:row + size, column:column + rank]
                a.weight.data = self.lora_down[offset:offset + rank]
            row, column = row + size, column + rank

    def matmul(self, x: torch.Tensor | ConcatInput, lora_columns: bool = False) -> torch.Tensor:
        """``x @ W^T + b``, or with ``lora_columns`` ``[x | z] @ [W | B]^T + b`` (``x`` then carries ``z``). A
        :class:`~appleswap.speed.kernels.ConcatInput` is joined by one Triton kernel where it applies."""
        weight = self.weight_aug if lora_columns else self.weight
        if isinstance(x, ConcatInput):
            width = weight.shape[1]
            x = kernels.join_rows(x, width)[0] if kernels.join_applies(x, width) else x.join(width)
        return F.linear(x, weight, self.bias)

    def release(self) -> None:
        """Give every member layer (and its LoRA matrices) its own storage again (before the group is dropped)."""
        for layer in self.layers:
            _own_parameter(_base(layer), "weight")
            _own_parameter(_base(layer), "bias")
            if is_lora_layer(layer):
                for name in layer.lora_A:
                    _own_parameter(layer.lora_A[name], "weight")
                    _own_parameter(layer.lora_B[name], "weight")

    def fold_ready(self) -> bool:
        """Whether the folded GEMM computes what the layers would now: inference, same single adapter and scale."""
        if self.fold_adapter is None or torch.is_grad_enabled():
            return False
        for layer, rank, scaling in zip(self.layers, self.ranks, self.fold_scaling, strict=True):
            if rank and (_active_adapters(layer) != [self.fold_adapter]
                         or layer.scaling[self.fold_adapter] != scaling):
                return False
        return True


def fuse_block(block: nn.Module, fold_lora: bool = True, condition_weights: bool = True,
               projection: Callable[[list[nn.Module], bool, bool], FusedProjection] | None = None,
               ) -> list[FusedProjection]:
    """Stack the projections of one FLUX block (double or single) into :class:`FusedProjection` groups, each made
    by ``projection(layers, fold_lora, condition_weights)`` (default: the bf16 group; for fp8 layers
    :func:`appleswap.speed.fp8.fused_projection_for`, which keeps their merged condition weights unless
    ``condition_weights`` is False). Returns the groups."""
    if projection is None:
        projection = lambda layers, fold, _: FusedProjection(layers, fold)
    groups = DOUBLE_GROUPS if hasattr(block, "norm1_context") else SINGLE_GROUPS
    modules = dict(block.named_modules())
    fused = nn.ModuleDict({name: projection([modules[m] for m in members], fold_lora, condition_weights)
                           for name, members in groups.items()})
    block.add_module(ATTRIBUTE, fused)
    return list(fused.values())


def _own_parameter(module: nn.Module, name: str) -> None:
    param = getattr(module, name)
    if param is not None:
        param.data = param.data.clone()  # same Parameter object (optimisers, hooks), its own storage


def unfuse_block(block: nn.Module) -> None:
    """Give every member layer (and its LoRA matrices) its own storage again and drop the stacked buffers."""
    fused = getattr(block, ATTRIBUTE, None)
    if fused is None:
        return
    for group in fused.values():
        group.release()
    delattr(block, ATTRIBUTE)


def fused_projection(block: nn.Module, name: str) -> FusedProjection | None:
    """The block's fused group ``name``, or None when the block is not fused."""
    fused = getattr(block, ATTRIBUTE, None)
    return None if fused is None else fused[name]


def routed_fused(fused: FusedProjection, x: torch.Tensor | ConcatInput, cond_start: int | None,
                 cond_rows: Callable[[], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every member layer's output (LoRA on tokens ``cond_start:`` only) from one base matmul.

    Inference with a folded LoRA: one GEMM of ``[x | z]`` (see the module docstring). ``cond_rows``, if given,
    recomputes ``x[:, cond_start:]`` from x's own inputs under ``torch.compile``: then ``x`` has no consumer but the
    concatenation, and
    ``torch.compile`` writes it straight into ``[x | z]`` (measured on an H100: reading z's input from ``x``
    instead made inductor copy every ``x`` once more, ~3 ms per pass). Otherwise each member's LoRA delta is added
    to that member's slice of the output (under ``torch.compile`` the addition fuses into the slice's consumer).
    """
    if cond_start is None or cond_start >= x.shape[1]:
        return list(fused.matmul(x).split(fused.sizes, dim=-1))
    condition = getattr(fused, "condition", None)  # fp8: merged condition weights (fp8_condition)
    if condition is not None and condition.ready():
        return list(condition.matmul(fused, x, cond_start).split(fused.sizes, dim=-1))
    if fused.fold_ready():
        recompute = cond_rows is not None and torch.compiler.is_compiling()  # eager: the slice costs no launches
        cond = cond_rows() if recompute else _rows(x, cond_start)
        z = F.linear(cond, fused.lora_down) * fused.lora_scale
        if isinstance(x, ConcatInput):  # z joins the pieces: written once with them
            return list(fused.matmul(x.with_tail(z), lora_columns=True).split(fused.sizes, dim=-1))
        z = F.pad(z, (0, 0, cond_start, 0))  # zeros above
        return list(fused.matmul(torch.cat([x, z], dim=-1), lora_columns=True).split(fused.sizes, dim=-1))
    x = kernels.as_tensor(x)
    outputs = list(fused.matmul(x).split(fused.sizes, dim=-1))
    cond = x[:, cond_start:]
    deltas = stacked_lora_deltas(fused, cond)
    if deltas is None:  # several adapters, dropout or DoRA: one member at a time
        deltas = [lora_delta(layer, cond) if is_lora_layer(layer) else None for layer in fused.layers]
    for index, delta in enumerate(deltas):
        if delta is not None:
            outputs[index] = add_to_rows(outputs[index], cond_start, delta)
    return outputs


def _rows(x: torch.Tensor | ConcatInput, start: int) -> torch.Tensor:
    return x.rows(start) if isinstance(x, ConcatInput) else x[:, start:]


def stacked_lora_deltas(fused: FusedProjection, cond: torch.Tensor) -> list[torch.Tensor] | None:
    """The members' LoRA deltas with ONE down-projection: their ``lora_A`` matrices stacked (r x members rows),
    then each member's ``lora_B`` on its slice. None unless every member has exactly one active plain adapter."""
    adapters = [(layer, plain_adapter(layer)) for layer in fused.layers]
    if any(name is None for _, name in adapters):
        return None
    stacked = torch.cat([layer.lora_A[name].weight for layer, name in adapters])
    down = F.linear(cond.to(stacked.dtype), stacked)
    ranks = [layer.lora_A[name].weight.shape[0] for layer, name in adapters]
    return [layer.lora_B[name](part) * layer.scaling[name]
            for (layer, name), part in zip(adapters, down.split(ranks, dim=-1), strict=True)]
