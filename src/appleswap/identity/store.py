"""Identity files: ID tokens saved as safetensors (key ``id_tokens``, (1, 32, 2048) float32) plus string metadata.

The same format serves ``appleswap identity`` outputs, every ``prepare-ids`` cache entry and the null ID, so one
loader reads them all. Metadata values are strings; lists (e.g. source files) are stored as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appleswap.files import save_tensors

TOKENS_KEY = "id_tokens"
FORMAT = "appleswap-identity/1"


def _as_tokens(tokens: torch.Tensor | np.ndarray, where: str) -> torch.Tensor:
    """Any (32, D) / (1, 32, D) tensor or array as a contiguous float32 (1, 32, D) CPU tensor."""
    tensor = torch.as_tensor(np.asarray(tokens) if isinstance(tokens, np.ndarray) else tokens)
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] != 1:
        raise ValueError(f"{where}: ID tokens must be (32, D) or (1, 32, D), got {tuple(tensor.shape)}")
    return tensor.contiguous()


def save_identity(path: str | Path, tokens: torch.Tensor | np.ndarray, metadata: dict[str, Any] | None = None) -> Path:
    """Write one identity atomically; non-string metadata values are JSON-encoded."""
    meta = {"format": FORMAT}
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    return save_tensors(path, {TOKENS_KEY: _as_tokens(tokens, str(path))}, metadata=meta)


def load_identity(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """(tokens (1, 32, D) float32, metadata) of an identity file; clear errors for missing or foreign files."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"identity file {path} not found (make one with `appleswap identity -s PHOTO -o ...`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if TOKENS_KEY not in set(handle.keys()):
                raise ValueError(f"{path}: no '{TOKENS_KEY}' tensor; not an appleswap identity file")
            tokens = handle.get_tensor(TOKENS_KEY)
            metadata = dict(handle.metadata() or {})
    except SafetensorError as error:
        raise ValueError(f"{path}: not a safetensors identity file ({error})") from error
    return _as_tokens(tokens, str(path)), metadata


def load_reference_npy(path: str | Path) -> torch.Tensor:
    """An authors' ``pulid_id/*.npy`` (any shape squeezing to (32, D)) as (1, 32, D); pickles are refused."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a plain .npy array ({error})") from error
    return _as_tokens(np.squeeze(array).astype(np.float32), str(path))
