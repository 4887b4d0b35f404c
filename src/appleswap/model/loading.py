"""Assemble APPLE's model from local files: FLUX transformer + VAE (diffusers folder), PuLID ID cross-attentions
(``pulid_ca.*`` of ``pulid_flux_v0.9.1.safetensors``) and the condition LoRA (``default.safetensors``).

Nothing here downloads. Mis-shaped or foreign checkpoints fail with a ValueError naming the file and key.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from appleswap.model.id_attention import build_id_attentions, id_attention_layout
from appleswap.model.text import load_text_embeddings  # noqa: F401  (re-exported contract)
from appleswap.model.transformer import AppleTransformer

logger = logging.getLogger(__name__)

ID_CA_PREFIX = "pulid_ca."
_CA_KEY = re.compile(r"^pulid_ca\.(\d+)\.(.+)$")


def _component_dir(flux_path: Path, name: str) -> Path | None:
    if (flux_path / name / "config.json").is_file():
        return flux_path / name
    return None


def load_flux_transformer(flux_path: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    """``FluxTransformer2DModel`` from a diffusers FLUX folder, its ``transformer/`` folder, or a single file."""
    from diffusers import FluxTransformer2DModel

    path = Path(flux_path)
    if path.is_file():
        model = FluxTransformer2DModel.from_single_file(str(path), torch_dtype=dtype)
    elif _component_dir(path, "transformer") is not None:
        model = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
    elif (path / "config.json").is_file():
        model = FluxTransformer2DModel.from_pretrained(path, torch_dtype=dtype)
    else:
        raise FileNotFoundError(f"flux_path {path}: neither a diffusers FLUX folder (transformer/config.json) "
                                "nor a transformer folder nor a single checkpoint file")
    return model.to(device).eval().requires_grad_(False)


def load_vae(flux_path: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    """The FLUX ``AutoencoderKL`` from ``<flux_path>/vae``."""
    from diffusers import AutoencoderKL

    path = Path(flux_path)
    if _component_dir(path, "vae") is None:
        raise FileNotFoundError(f"{path / 'vae'}: no VAE config; flux_path must be a diffusers FLUX folder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def read_id_attention_weights(path: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """``pulid_ca.<i>.<param>`` tensors of a PuLID-FLUX file, grouped by module index (``pulid_encoder.*`` ignored)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PuLID file {path} does not exist")
    modules: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            match = _CA_KEY.match(key)
            if match:
                modules.setdefault(int(match.group(1)), {})[match.group(2)] = handle.get_tensor(key)
    if not modules:
        raise ValueError(f"{path}: no '{ID_CA_PREFIX}*' weights (is this pulid_flux_v0.9.1.safetensors?)")
    if sorted(modules) != list(range(len(modules))):
        raise ValueError(f"{path}: pulid_ca module indices {sorted(modules)} are not 0..{len(modules) - 1}")
    return modules


def build_id_attentions_from_weights(modules: dict[int, dict[str, torch.Tensor]], flux: nn.Module,
                                     source: str = "PuLID file") -> nn.ModuleList:
    """Build the ID cross-attentions with the shapes the file implies and load them strictly."""
    doubles, singles = id_attention_layout(len(flux.transformer_blocks), len(flux.single_transformer_blocks))
    if len(modules) != len(doubles) + len(singles):
        raise ValueError(f"{source}: {len(modules)} pulid_ca modules, this FLUX config needs "
                         f"{len(doubles) + len(singles)}")
    first = modules[0]
    for name in ("to_q.weight", "to_kv.weight", "to_out.weight"):
        if name not in first:
            raise ValueError(f"{source}: pulid_ca.0.{name} missing")
    inner, dim = first["to_q.weight"].shape
    kv_dim = first["to_kv.weight"].shape[1]
    if dim != flux.inner_dim:
        raise ValueError(f"{source}: pulid_ca.0.to_q.weight has input width {dim}, FLUX hidden size is "
                         f"{flux.inner_dim}")
    head_dim = 128 if inner % 128 == 0 else flux.config.attention_head_dim
    attentions = build_id_attentions(len(modules), dim, kv_dim, inner // head_dim, head_dim)
    for index, module in enumerate(attentions):
        _load_strict(module, modules[index], f"{source}: pulid_ca.{index}")
    return attentions


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{what}.{key}: shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    module.load_state_dict(state, strict=True)


def load_apple_transformer(flux_path: str | Path, *, pulid_path: str | Path | None = None,
                           lora_path: str | Path | None = None, lora_rank: int | None = None,
                           dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> AppleTransformer:
    """FLUX + 20 ID cross-attentions (when ``pulid_path``) + condition LoRA (when ``lora_path``), frozen, eval mode.

    Args:
        flux_path: diffusers FLUX folder (or its transformer folder, or a single checkpoint file).
        pulid_path: ``pulid_flux_v0.9.1.safetensors``; only ``pulid_ca.*`` is used here.
        lora_path: APPLE LoRA (``transformer.``-prefixed PEFT keys); rank read from the file.
        lora_rank: optional check of the file's rank.
    """
    flux = load_flux_transformer(flux_path, dtype=dtype, device="cpu")
    id_attentions = None
    if pulid_path is not None:
        id_attentions = build_id_attentions_from_weights(read_id_attention_weights(pulid_path), flux, str(pulid_path))
    model = AppleTransformer(flux, id_attentions)
    if lora_path is not None:
        model.load_lora(lora_path, rank=lora_rank)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info("APPLE transformer: %d ID cross-attentions, LoRA %s", len(model.id_attentions),
                "on" if model.has_lora() else "off")
    return model
