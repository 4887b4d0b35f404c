"""Loading the user's 3DDFA-V3 checkpoints safely: ``torch.load(weights_only=True)`` and strict key checks."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (under ``key`` when the file wraps it), loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a loadable PyTorch weights file with weights_only=True ({error})") from error
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path}: expected a dict with key {key!r}, found {found}")
        data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return dict(data)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix such as DataParallel's ``module.`` from every key that has it."""
    return {(k.removeprefix(prefix)): v for k, v in state.items()}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``module``; every parameter must be present (BN step counters may be absent)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"{source}: missing {len(missing)} weights for {type(module).__name__}: {shown}")
    if result.unexpected_keys:
        log.debug("%s: ignored %d unused keys (e.g. %s)", source, len(result.unexpected_keys),
                  result.unexpected_keys[0])
