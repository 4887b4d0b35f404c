"""The condition-branch LoRA: PEFT layers for the parameters and files, our routing for the forward.

APPLE's only trainable weights are a LoRA (adapter ``default``) that acts on condition tokens only. PEFT wraps
the target ``nn.Linear`` layers (so parameters, ``get_peft_model_state_dict`` and the reference file format are
PEFT's), but instead of PEFT's forward (LoRA on every token, then multiplied by 0 on two of three branches) the
three-branch forward calls :func:`routed_linear`: ONE base matmul over all tokens plus the LoRA delta computed
on the condition slice only.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
# target modules of the APPLE research configs (single-block attn.to_out does not exist in diffusers)
DOUBLE_TARGETS = ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")
SINGLE_TARGETS = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")
FILE_PREFIX = "transformer."  # FluxPipeline.save_lora_weights prefix
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata: the adapter's LoraConfig, keys prefixed
_LORA_KEY = re.compile(r"^(?:transformer\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


def apple_target_modules(num_double: int, num_single: int) -> list[str]:
    """Full module names the APPLE LoRA wraps: x_embedder plus the per-block lists above."""
    names = ["x_embedder"]
    names += [f"transformer_blocks.{i}.{t}" for i in range(num_double) for t in DOUBLE_TARGETS]
    names += [f"single_transformer_blocks.{i}.{t}" for i in range(num_single) for t in SINGLE_TARGETS]
    return names


def is_lora_layer(layer: nn.Module) -> bool:
    return hasattr(layer, "base_layer") and hasattr(layer, "lora_A")


def _active_adapters(layer: nn.Module) -> list[str]:
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def plain_adapter(layer: nn.Module) -> str | None:
    """The name of ``layer``'s one active adapter if it is a plain LoRA (no dropout, no DoRA), else None: the
    adapters that fused GEMMs can fold or merge."""
    active = _active_adapters(layer) if is_lora_layer(layer) else []
    if len(active) != 1 or not isinstance(layer.lora_dropout[active[0]], nn.Identity):
        return None
    return None if getattr(layer, "use_dora", {}).get(active[0], False) else active[0]


def lora_delta(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Sum over active adapters of ``scaling * B(A(dropout(x)))``, or None when no adapter is active."""
    delta = None
    for name in _active_adapters(layer):
        if getattr(layer, "use_dora", {}).get(name, False):
            raise ValueError(f"adapter {name!r} uses DoRA, which condition-only routing does not support")
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        x_cast = x.to(lora_a.weight.dtype)
        term = lora_b(lora_a(layer.lora_dropout[name](x_cast))) * layer.scaling[name]
        delta = term if delta is None else delta + term
    return delta


def in_place_ok() -> bool:
    """Eager inference may write into fresh tensors in place (no concatenation copies); autograd needs the
    functional form, and so does ``torch.compile`` (inductor fuses the functional slices and adds into the
    consumer kernel, while in-place writes into views would break the graph)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def add_to_rows(out: torch.Tensor, start: int, delta: torch.Tensor) -> torch.Tensor:
    """``out`` with ``delta`` added to tokens ``start:`` (in place when allowed)."""
    if in_place_ok():
        out[:, start:] += delta.to(out.dtype)
        return out
    # (a zero-padded add, out + pad(delta), measured 20 ms per pass slower under torch.compile on an H100)
    return torch.cat([out[:, :start], out[:, start:] + delta.to(out.dtype)], dim=1)


def base_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen layer alone (used for text tokens, which never see the LoRA)."""
    return layer.base_layer(x) if is_lora_layer(layer) else layer(x)


def routed_linear(layer: nn.Module, x: torch.Tensor, cond_start: int | None) -> torch.Tensor:
    """``layer`` on (B, N, in) with its LoRA applied to tokens ``cond_start:`` only (None: no condition tokens).

    One base matmul covers every token; the LoRA delta is computed on the condition slice alone.
    """
    if not is_lora_layer(layer):
        return layer(x)
    out = layer.base_layer(x)
    if cond_start is None or cond_start >= x.shape[1]:
        return out
    delta = lora_delta(layer, x[:, cond_start:])
    if delta is None:
        return out
    return add_to_rows(out, cond_start, delta)


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a LoRA safetensors file into PEFT state-dict keys (``<module>.lora_A.weight``), prefix removed."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    raw = load_file(str(path))
    state = {}
    for key, value in raw.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: key {key!r} is not a LoRA weight (expected '<module>.lora_A.weight' / "
                             "'lora_B', optionally prefixed 'transformer.')")
        state[f"{match.group(1)}.lora_{match.group(2)}.weight"] = value
    if not state:
        raise ValueError(f"{path}: no LoRA weights found")
    return state


def lora_modules_and_rank(state: dict[str, torch.Tensor], source: str = "LoRA") -> tuple[list[str], int]:
    """Module names and the rank (lora_A rows) of a LoRA state dict; all modules must share one rank."""
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    ranks = {state[f"{m}.lora_A.weight"].shape[0] for m in modules if f"{m}.lora_A.weight" in state}
    missing = [m for m in modules if f"{m}.lora_A.weight" not in state or f"{m}.lora_B.weight" not in state]
    if missing:
        raise ValueError(f"{source}: module(s) {missing[:3]} lack a lora_A or lora_B weight")
    if len(ranks) != 1:
        raise ValueError(f"{source}: modules have different ranks {sorted(ranks)}; expected one rank")
    return modules, ranks.pop()


def check_lora_shapes(model: nn.Module, state: dict[str, torch.Tensor], rank: int, source: str) -> None:
    """Raise ValueError naming the first module whose LoRA shapes do not fit the model."""
    named = dict(model.named_modules())
    for key, value in state.items():
        module_name, which = key.rsplit(".lora_", 1)
        layer = named.get(module_name)
        if layer is None:
            raise ValueError(f"{source}: module {module_name!r} does not exist in the FLUX transformer")
        base = layer.base_layer if is_lora_layer(layer) else layer
        if not hasattr(base, "in_features"):  # nn.Linear, or the fp8 layer that replaced one
            raise ValueError(f"{source}: module {module_name!r} is {type(base).__name__}, not Linear")
        want = (rank, base.in_features) if which.startswith("A") else (base.out_features, rank)
        if tuple(value.shape) != want:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model needs {want}")


def add_condition_lora(flux: nn.Module, modules: list[str], rank: int, alpha: float | None = None,
                       init: str | bool = "gaussian", dropout: float = 0.0) -> None:
    """Wrap ``modules`` of the diffusers transformer with a PEFT LoRA adapter named ``default``."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init,
                        target_modules=modules, lora_dropout=dropout)
    flux.add_adapter(config, adapter_name=ADAPTER_NAME)


def lora_file_metadata(flux: nn.Module) -> dict[str, str]:
    """Safetensors metadata naming the adapter's rank and alpha as diffusers' ``save_lora_weights`` writes it, so
    a loader (:func:`load_lora_into`, diffusers) uses the scale alpha / rank that training used (issue M5)."""
    config = flux.peft_config[ADAPTER_NAME]
    entries = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    return {"format": "pt", METADATA_KEY: json.dumps({FILE_PREFIX + k: v for k, v in entries.items()}, indent=2,
                                                     sort_keys=True)}


def read_lora_alpha(path: str | Path) -> float | None:
    """The alpha recorded in a LoRA file's metadata (diffusers' key), or None: files without it (the authors')
    are used at scale 1, alpha = rank, as their loader does."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"{path}: unreadable {METADATA_KEY} metadata ({error})") from error
    if config.get(FILE_PREFIX + "use_rslora") or config.get(FILE_PREFIX + "alpha_pattern"):
        raise ValueError(f"{path}: rsLoRA / per-module alphas are not supported")
    alpha = config.get(FILE_PREFIX + "lora_alpha")
    return None if alpha is None else float(alpha)


def load_lora_into(flux: nn.Module, path: str | Path, rank: int | None = None) -> int:
    """Create the adapter from the file (rank and alpha from the file) and load its weights; returns the rank."""
    from peft import set_peft_model_state_dict

    state = read_lora_file(path)
    modules, file_rank = lora_modules_and_rank(state, str(path))
    if rank is not None and rank != file_rank:
        raise ValueError(f"lora_rank={rank} but {path} holds rank {file_rank}")
    check_lora_shapes(flux, state, file_rank, str(path))
    if ADAPTER_NAME in getattr(flux, "peft_config", {}):
        flux.delete_adapters(ADAPTER_NAME)
    add_condition_lora(flux, modules, file_rank, alpha=read_lora_alpha(path), init=False)
    result = set_peft_model_state_dict(flux, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: unexpected LoRA keys {unexpected[:3]}")
    logger.info("loaded LoRA %s: %d modules, rank %d", path, len(modules), file_rank)
    return file_rank


def lora_state_dict(flux: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under the reference file keys (``transformer.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(flux, adapter_name=ADAPTER_NAME)
    return {FILE_PREFIX + key: value.detach().contiguous() for key, value in state.items()}
