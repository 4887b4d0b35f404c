"""EVA02-CLIP-L-14-336 vision tower (timm ``eva02_large_patch14_clip_336``) loaded from the ORIGINAL EVA-CLIP file.

``EVA02_CLIP_L_336_psz14_s6B.pt`` stores the whole CLIP model (``visual.*``, ``text.*``, ``logit_scale``) in the
EVA-CLIP layout. :func:`convert_eva_clip_state_dict` renames the ``visual.*`` keys to timm's layout, so no EVA-CLIP
code (and no network) is needed. PuLID uses two outputs: the projected CLS (768-d, L2-normalised) and the token
sequences entering blocks 4, 8, 12, 16 and 20 (5 x (N, 577, 1024)), see :func:`hidden_block_inputs`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # EVA02-CLIP-L: 16 heads of 64
NUM_SCALES = 5

# original EVA-CLIP name -> timm name, applied to the key after the ``visual.`` prefix is removed
_RENAMES = (
    (re.compile(r"\.attn\.q_bias$"), ".attn.q_proj.bias"),
    (re.compile(r"\.attn\.v_bias$"), ".attn.v_proj.bias"),
    (re.compile(r"\.attn\.inner_attn_ln\."), ".attn.norm."),
    (re.compile(r"\.mlp\.w1\."), ".mlp.fc1_g."),
    (re.compile(r"\.mlp\.w2\."), ".mlp.fc1_x."),
    (re.compile(r"\.mlp\.w3\."), ".mlp.fc2."),
    (re.compile(r"\.mlp\.ffn_ln\."), ".mlp.norm."),
)


@dataclass(frozen=True)
class EvaConfig:
    """Vision-tower shape; the defaults are EVA02-CLIP-L-14-336."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 2730
    embed_dim: int = 768

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> EvaConfig:
        """Read the shape off a converted (timm-layout) state dict, so tiny test files load the same way."""
        try:
            width = sd["cls_token"].shape[-1]
            patch = sd["patch_embed.proj.weight"].shape[-1]
            grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
            depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
            return cls(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                       heads=max(width // HEAD_WIDTH, 1), mlp_hidden=sd["blocks.0.mlp.fc1_g.weight"].shape[0],
                       embed_dim=sd["head.weight"].shape[0])
        except (KeyError, ValueError) as error:
            raise ValueError(f"EVA-CLIP checkpoint lacks the expected vision keys ({error})") from error

    def hidden_block_inputs(self) -> tuple[int, ...]:
        """Blocks whose INPUT PuLID takes: 4, 8, 12, 16, 20 for depth 24 (every depth // 6 blocks, 5 of them)."""
        step = max(self.depth // 6, 1)
        if step * NUM_SCALES >= self.depth + 1:
            raise ValueError(f"EVA depth {self.depth} is too shallow for {NUM_SCALES} hidden scales")
        return tuple(step * (i + 1) for i in range(NUM_SCALES))


def unwrap_checkpoint(obj: object) -> dict[str, torch.Tensor]:
    """The tensor dict inside a torch checkpoint (plain, or under 'state_dict' / 'model' / 'module')."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError("EVA-CLIP checkpoint is not a state dict")  # noqa: TRY004 (a bad file, not a bad call)
    return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}


def convert_eva_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EVA-CLIP ``visual.*`` keys (or a bare visual state dict) -> timm Eva keys; drops text tower and rope buffers."""
    has_prefix = any(k.startswith("visual.") for k in sd)
    if not has_prefix and "cls_token" not in sd:
        raise ValueError("EVA-CLIP checkpoint has no visual.* weights (is this the EVA02-CLIP .pt?)")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if has_prefix:
            if not key.startswith("visual."):
                continue
            key = key[len("visual."):]
        if key.startswith("rope.") or ".rope." in key:
            continue  # fixed rotary tables, rebuilt by timm
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = value
    if not out:
        raise ValueError("EVA-CLIP checkpoint has no visual.* weights")
    return out


def build_eva(config: EvaConfig) -> torch.nn.Module:
    """An uninitialised timm ``eva02_large_patch14_clip_336`` of the given shape (no download)."""
    import timm

    return timm.create_model(
        "eva02_large_patch14_clip_336", pretrained=False, img_size=config.image_size,
        patch_size=config.patch_size, embed_dim=config.width, depth=config.depth, num_heads=config.heads,
        mlp_ratio=(config.mlp_hidden + 0.5) / config.width, num_classes=config.embed_dim,
    )


class EvaClipVision(torch.nn.Module):
    """The vision tower plus PuLID's two outputs; ``forward(pixels)`` -> (CLS (N, E) L2-normalised, 5 hiddens)."""

    def __init__(self, config: EvaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = build_eva(config)
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> EvaClipVision:
        """Load the original EVA-CLIP ``.pt`` (``torch.load(weights_only=True)``) through the key conversion."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"EVA-CLIP checkpoint: {path} not found")
        raw = unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
        try:
            sd = convert_eva_clip_state_dict(raw)
            module = cls(EvaConfig.from_state_dict(sd))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        missing, unexpected = module.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: does not match EVA02-CLIP vision layout; missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        log.info("EVA-CLIP vision loaded from %s (%s)", path, module.config)
        return module.to(device=device, dtype=dtype).eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> bicubic-resized to the tower's size, CLIP-normalised."""
        size = self.config.image_size
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return (images - self.mean.to(images)) / self.std.to(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, 3, H, W) in [0, 1] -> (CLS embedding (N, E) L2-normalised, [5 x (N, tokens, width)])."""
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images.float()).to(dtype)
        indices = [i - 1 for i in self.config.hidden_block_inputs()]  # output of block i-1 = input of block i
        final, inter = self.model.forward_intermediates(pixels, indices=indices, return_prefix_tokens=True,
                                                        output_fmt="NLC")
        hidden = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in inter]
        cls = self.model.forward_head(final)
        return F.normalize(cls, dim=-1), hidden
