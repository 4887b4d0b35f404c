"""Training checkpoints without pickle: LoRA, optimizer, RNG, data position and step as safetensors + JSON.

A checkpoint folder ``<run>/checkpoints/step{N}/`` holds ``default.safetensors`` (the LoRA with the reference
keys: `generate --lora` loads it as is), ``optimizer.safetensors`` (AdamW moments, param groups in the
metadata), ``rng.safetensors`` (torch CPU/CUDA generator states) and ``state.json`` (step, data position,
python/numpy RNG, config). accelerate's own ``save_state`` pickles the optimizer and the RNG states, so the
trainer calls these functions from the main process instead (the LoRA is replicated under DDP).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appleswap.files import save_json, save_tensors

log = logging.getLogger(__name__)
LORA_FILE = "default.safetensors"
STATE_FILE = "state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten ``optimizer.state_dict()`` into tensors ``state.<param>.<key>`` plus JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Inverse of :func:`optimizer_tensors` (tensors are moved by the optimizer's own load_state_dict)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(meta["scalars"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def rng_snapshot() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states: torch tensors for safetensors, python/numpy states as JSON-ready lists."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    jsonable = {"python": [version, list(internal), gauss],
                "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, jsonable


def restore_rng(tensors: dict[str, torch.Tensor], jsonable: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = jsonable["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = jsonable["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(folder: Path, *, transformer: Any, optimizer: torch.optim.Optimizer | None, step: int,
                    data_state: dict[str, int], config: dict[str, Any],
                    lora_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a complete checkpoint, never a mix: the files go to a hidden ``.<name>.partial`` folder (``state.json``
    last) that replaces ``folder`` in one rename, so a save killed at any point leaves the previous complete
    checkpoints as they were (a re-saved step is first marked incomplete, then replaced whole).

    ``lora_state`` (reference keys) replaces ``transformer.save_lora`` when the LoRA was gathered elsewhere (FSDP);
    ``optimizer=None`` writes no moments (a resume then starts them afresh).
    """
    partial = folder.parent / f".{folder.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    if lora_state is not None:
        from appleswap.model.lora import lora_file_metadata

        save_tensors(partial / LORA_FILE, lora_state, metadata=lora_file_metadata(transformer.flux))
    else:
        transformer.save_lora(partial / LORA_FILE)
    if optimizer is not None:
        tensors, meta = optimizer_tensors(optimizer)
        save_tensors(partial / "optimizer.safetensors", tensors, metadata=meta)
    rng_tensors, rng_json = rng_snapshot()
    save_tensors(partial / "rng.safetensors", rng_tensors)
    save_json(partial / STATE_FILE, {"step": step, "data": data_state, "rng": rng_json, "config": config})
    if folder.exists():  # an older save of this step: incomplete from here on, then gone
        (folder / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder)
    os.replace(partial, folder)
    log.info("checkpoint %s (step %d)", folder, step)
    return folder


def load_checkpoint(folder: Path, *, transformer: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore LoRA, optimizer and RNG from ``folder``; returns its ``state.json`` (step, data position)."""
    from safetensors.torch import load_file

    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"resume: {state_path} not found (incomplete or not a training checkpoint)")
    state = json.loads(state_path.read_text())
    restore_lora(transformer, folder / LORA_FILE)
    if (folder / "optimizer.safetensors").is_file():
        load_optimizer_tensors(optimizer, folder / "optimizer.safetensors")
    else:
        log.warning("resume: %s has no optimizer state; AdamW moments start afresh", folder)
    restore_rng(load_file(str(folder / "rng.safetensors")), state["rng"])
    log.info("resumed from %s (step %d)", folder, state["step"])
    return state


def restore_lora(transformer: Any, path: Path) -> None:
    """Copy a LoRA file into the existing adapter parameters in place (the optimizer keeps pointing at them)."""
    from appleswap.model.lora import read_lora_file

    state = read_lora_file(path)
    params = {name.removeprefix("flux."): p for name, p in transformer.named_parameters() if ".lora_" in name}
    wanted = {key.replace(".weight", ".default.weight"): value for key, value in state.items()}
    if set(wanted) != set(params):
        missing, unexpected = sorted(set(params) - set(wanted))[:2], sorted(set(wanted) - set(params))[:2]
        raise ValueError(f"resume: {path} does not match the model's LoRA (missing {missing}, "
                         f"unexpected {unexpected})")
    with torch.no_grad():
        for name, value in wanted.items():
            params[name].copy_(value)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``<run>/checkpoints``, or None."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return max(found, key=lambda p: int(p.name.removeprefix("step")), default=None)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` full states; older ones keep only their LoRA file (for evaluation)."""
    root = run_dir / "checkpoints"
    found = sorted((p for p in root.glob("step*") if (p / STATE_FILE).is_file()),
                   key=lambda p: int(p.name.removeprefix("step")))
    for folder in found[: max(len(found) - keep, 0)]:
        for name in ("optimizer.safetensors", "rng.safetensors"):
            (folder / name).unlink(missing_ok=True)
        (folder / STATE_FILE).rename(folder / "state.lora-only.json")
    for stale in [*root.glob("step*/.*.tmp"), *root.glob(".step*.partial")] if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
