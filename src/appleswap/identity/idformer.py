"""PuLID's IDFormer: (ArcFace + CLIP CLS, 5 ViT hidden states) -> (N, 32, 2048) ID tokens.

Parameter names match ``pulid_encoder.*`` in ``pulid_flux_v0.9.1.safetensors`` so the file loads strictly.
Every width is a config field (the real sizes are the defaults) so tests can build tiny encoders with real names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
_ANNOUNCED: set[str] = set()  # PuLID files whose IDFormer shape was logged at info

PREFIX = "pulid_encoder."
DIM_HEAD = 64  # PuLID's IDFormer always uses 64-wide heads
NUM_SCALES = 5


@dataclass(frozen=True)
class IDFormerConfig:
    dim: int = 1024
    depth: int = 10
    heads: int = 16
    num_id_token: int = 5
    num_queries: int = 32
    output_dim: int = 2048
    ff_mult: int = 4
    id_dim: int = 1280  # ArcFace 512 + CLIP CLS 768
    vit_dim: int = 1024  # EVA hidden width
    mlp_dim: int = 1024  # hidden width of the mapping MLPs

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> IDFormerConfig:
        """Read the shape off an IDFormer state dict (keys without the ``pulid_encoder.`` prefix)."""
        try:
            _, queries, dim = sd["latents"].shape
            layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
            return cls(
                dim=dim, depth=layers, heads=sd["layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
                num_id_token=sd["id_embedding_mapping.6.weight"].shape[0] // dim, num_queries=queries,
                output_dim=sd["proj_out"].shape[1], ff_mult=sd["layers.0.1.1.weight"].shape[0] // dim,
                id_dim=sd["id_embedding_mapping.0.weight"].shape[1], vit_dim=sd["mapping_0.0.weight"].shape[1],
                mlp_dim=sd["mapping_0.0.weight"].shape[0],
            )
        except (KeyError, ValueError) as error:
            raise ValueError(f"not a PuLID IDFormer state dict (missing or odd {error})") from error


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-LN-LeakyReLU x2 then Linear: indices 0, 1, 3, 4, 6 hold weights, as in the PuLID file."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, out_dim))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [context ; latents] (keys/values), queries from the latents only."""

    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.norm1(context), self.norm2(latents)
        q = self._split(self.to_q(latents))
        k, v = (self._split(t) for t in self.to_kv(torch.cat([context, latents], dim=1)).chunk(2, dim=-1))
        # scale q and k by dim_head^-1/4 each (PuLID's fp16-stable form) and softmax in fp32
        scale = self.dim_head ** -0.25
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        out = (weight @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


class IDFormer(nn.Module):
    """Perceiver-style resampler: 32 learned queries + 5 ID tokens, two layers per ViT scale."""

    def __init__(self, config: IDFormerConfig = IDFormerConfig()) -> None:
        super().__init__()
        if config.depth % NUM_SCALES:
            raise ValueError(f"IDFormer depth must be a multiple of {NUM_SCALES}, got {config.depth}")
        self.config = config
        scale = config.dim ** -0.5
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, config.dim) * scale)
        self.proj_out = nn.Parameter(scale * torch.randn(config.dim, config.output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(config.dim, config.heads), _feed_forward(config.dim, config.ff_mult)])
            for _ in range(config.depth)
        )
        for i in range(NUM_SCALES):
            setattr(self, f"mapping_{i}", _mlp(config.vit_dim, config.mlp_dim, config.dim))
        self.id_embedding_mapping = _mlp(config.id_dim, config.mlp_dim, config.dim * config.num_id_token)

    def forward(self, id_cond: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """id_cond (N, id_dim), hidden 5 x (N, T, vit_dim) -> ID tokens (N, num_queries, output_dim)."""
        cfg = self.config
        if len(hidden) != NUM_SCALES:
            raise ValueError(f"IDFormer wants {NUM_SCALES} hidden states, got {len(hidden)}")
        id_tokens = self.id_embedding_mapping(id_cond).reshape(id_cond.shape[0], cfg.num_id_token, cfg.dim)
        latents = torch.cat([self.latents.expand(id_cond.shape[0], -1, -1), id_tokens], dim=1)
        per_scale = cfg.depth // NUM_SCALES
        for i in range(NUM_SCALES):
            context = torch.cat([id_tokens, getattr(self, f"mapping_{i}")(hidden[i])], dim=1)
            for attn, ff in self.layers[i * per_scale:(i + 1) * per_scale]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :cfg.num_queries] @ self.proj_out

    @torch.no_grad()
    def null_tokens(self, num_vit_tokens: int) -> torch.Tensor:
        """PuLID's uncond ID: the encoder on an all-zero id_cond and all-zero hidden states, (1, Q, output_dim)."""
        p = self.latents
        zeros = [torch.zeros(1, num_vit_tokens, self.config.vit_dim, device=p.device, dtype=p.dtype)] * NUM_SCALES
        return self(torch.zeros(1, self.config.id_dim, device=p.device, dtype=p.dtype), zeros)

    @classmethod
    def from_file(cls, path: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, expect: IDFormerConfig | None = None) -> IDFormer:
        """Load ``pulid_encoder.*`` from a PuLID-FLUX safetensors file, strictly, with shape checks."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"PuLID file: {path} not found")
        sd = {k[len(PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)}
        if not sd:
            raise ValueError(f"{path}: no '{PREFIX}*' tensors; is this pulid_flux_v0.9.1.safetensors?")
        try:
            config = IDFormerConfig.from_state_dict(sd)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        if expect is not None and config != expect:
            raise ValueError(f"{path}: IDFormer shape {config} differs from the expected {expect}")
        model = cls(config)
        _load_strict(model, sd, path)
        # a swap reads the file twice (the null ID, then the encoder): its shape is news once per process
        log.log(logging.DEBUG if str(path) in _ANNOUNCED else logging.INFO, "IDFormer loaded from %s (%s)", path, config)
        _ANNOUNCED.add(str(path))
        return model.to(device=device, dtype=dtype).eval()


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with a message naming the file, the key and both shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: pulid_encoder weights do not fit the IDFormer: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}, mis-shaped {bad[:4]}")
    model.load_state_dict(sd, strict=True)
