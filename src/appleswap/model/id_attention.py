"""PuLID's ID cross-attention: image tokens query the 32 ID tokens; the result is added back as a residual.

Parameter names and shapes follow ``pulid_flux_v0.9.1.safetensors`` (``pulid_ca.<i>.norm1/norm2/to_q/to_kv/
to_out``) so the released weights load with ``strict=True``. Full size: dim 3072, kv_dim 2048, 16 heads x 128.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DOUBLE_INTERVAL = 2  # PuLID-FLUX: an ID cross-attention after double blocks 0, 2, 4, ...
SINGLE_INTERVAL = 4  # ... and after single blocks 0, 4, 8, ...


def id_attention_layout(num_double: int, num_single: int) -> tuple[list[int], list[int]]:
    """Double- and single-block indices followed by an ID cross-attention (10 + 10 = 20 for FLUX.1)."""
    return list(range(0, num_double, DOUBLE_INTERVAL)), list(range(0, num_single, SINGLE_INTERVAL))


class IDCrossAttention(nn.Module):
    """Perceiver-style cross-attention of image tokens (queries) over ID tokens (keys/values), no biases.

    Args:
        dim: width of the image tokens (3072).
        kv_dim: width of the ID tokens (2048).
        heads: attention heads (16); ``inner = heads * head_dim`` (2048).
        head_dim: width per head (128).
    """

    def __init__(self, dim: int = 3072, kv_dim: int = 2048, heads: int = 16, head_dim: int = 128):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.norm1 = nn.LayerNorm(kv_dim)  # on the ID tokens
        self.norm2 = nn.LayerNorm(dim)  # on the image tokens
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def keys_values(self, id_tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Keys and values of the ID tokens, (B, N, 2 * inner): the same at every step of a swap, so a swap computes
        them once (``AppleTransformer.pass_constants``)."""
        return self.to_kv(self.norm1(id_tokens.to(dtype)))

    def forward(self, id_tokens: torch.Tensor | None, hidden_states: torch.Tensor,
                keys_values: torch.Tensor | None = None) -> torch.Tensor:
        """ID tokens (B, N, kv_dim) and image tokens (B, L, dim) -> residual (B, L, dim) to add to the image tokens.

        ``keys_values``: :meth:`keys_values` computed beforehand (B or 1, N, 2 * inner); then ``id_tokens`` is unused."""
        batch, length, _ = hidden_states.shape
        if keys_values is None:
            keys_values = self.keys_values(id_tokens, hidden_states.dtype)
        keys_values = keys_values.expand(batch, -1, -1)
        hidden_states = self.norm2(hidden_states)
        query = self.to_q(hidden_states).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        key, value = keys_values.chunk(2, dim=-1)
        key = key.reshape(batch, -1, self.heads, self.head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value)  # softmax scale 1/sqrt(head_dim), as PuLID
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


def build_id_attentions(num_modules: int, dim: int, kv_dim: int, heads: int, head_dim: int) -> nn.ModuleList:
    return nn.ModuleList(IDCrossAttention(dim, kv_dim, heads, head_dim) for _ in range(num_modules))
