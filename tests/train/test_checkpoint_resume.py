"""Training checkpoints cut mid-save: a save killed at every one of its file-system steps must leave a run whose
resume restores the last complete checkpoint whole (LoRA, AdamW moments, RNG, data position), never a mix."""

from __future__ import annotations

import copy
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from appleswap.model.transformer import AppleTransformer
from appleswap.train import checkpoint as ckpt
from tests.fixtures.tiny_flux import build_tiny_transformer


class Killed(RuntimeError):
    """The simulated kill."""


_TEMPLATE: list[AppleTransformer] = []


def _model() -> AppleTransformer:
    if not _TEMPLATE:
        template = AppleTransformer(build_tiny_transformer())
        template.add_lora(rank=2, modules=["x_embedder", "transformer_blocks.0.attn.to_q"])
        _TEMPLATE.append(template)
    model = copy.deepcopy(_TEMPLATE[0])
    model.requires_grad_(False)
    for param in model.lora_parameters():
        param.requires_grad_(True)
    return model


def _step(model, optimizer, seed):
    """One AdamW step on a simple loss of the LoRA (moves the LoRA and the moments)."""
    generator = torch.Generator().manual_seed(seed)
    loss = sum(((p - torch.randn(p.shape, generator=generator)) ** 2).sum() for p in model.lora_parameters())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _snapshot(model, optimizer):
    lora = {name: p.detach().clone() for name, p in model.flux.named_parameters() if ".lora_" in name}
    moments = {(i, k): v.clone() for i, entry in optimizer.state_dict()["state"].items() for k, v in entry.items()
               if isinstance(v, torch.Tensor)}
    return lora, moments


def _save(model, optimizer, run: Path, step: int, batch: int, seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    ckpt.save_checkpoint(run / "checkpoints" / f"step{step:07d}", transformer=model, optimizer=optimizer, step=step,
                         data_state={"epoch": 0, "batch": batch}, config={"marker": batch})
    return {"lora_moments": _snapshot(model, optimizer), "batch": batch, "torch_rng": torch.get_rng_state(),
            "python_rng": random.random(), "numpy_rng": np.random.random()}


def _check_restores(run: Path, expected: dict) -> None:
    """A fresh model + optimizer resumed from the newest complete checkpoint equals exactly one saved state."""
    found = ckpt.latest_checkpoint(run)
    assert found is not None
    model = _model()
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=0.1)
    _step(model, optimizer, seed=99)  # other values everywhere, so nothing passes by accident
    state = ckpt.load_checkpoint(found, transformer=model, optimizer=optimizer)
    want = expected[state["data"]["batch"]]  # the incarnation the state file says it is
    assert state["step"] == int(found.name.removeprefix("step")) and state["config"] == {"marker": want["batch"]}
    lora, moments = _snapshot(model, optimizer)
    want_lora, want_moments = want["lora_moments"]
    assert lora.keys() == want_lora.keys() and moments.keys() == want_moments.keys()
    for key in want_lora:
        assert torch.equal(lora[key], want_lora[key]), key
    for key in want_moments:
        assert torch.equal(moments[key], want_moments[key]), key
    assert torch.equal(torch.get_rng_state(), want["torch_rng"])
    assert random.random() == want["python_rng"] and np.random.random() == want["numpy_rng"]


class _KillAt:
    """Counts the save's file-system steps (tensor/JSON writes, renames, deletions) and raises at step ``at``."""

    def __init__(self, monkeypatch, at: int | None):
        self.at, self.calls = at, 0
        for owner, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree"), (Path, "unlink"),
                            (Path, "rename"), (Path, "write_text"), (safetensors.torch, "save_file")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, function):
        def wrapped(*args, **kwargs):
            if self.at is not None and self.calls == self.at:
                self.calls += 1
                raise Killed("killed mid-save")
            self.calls += 1
            return function(*args, **kwargs)

        return wrapped


def _count_steps(tmp_path, monkeypatch, resave: bool) -> int:
    run = tmp_path / "count"
    model = _model()
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=0.1)
    _step(model, optimizer, 0)
    _save(model, optimizer, run, 1, 100, 1)
    if resave:
        _save(model, optimizer, run, 2, 200, 2)
    with monkeypatch.context() as patch:
        counter = _KillAt(patch, None)
        _save(model, optimizer, run, 2, 300, 3)
    return counter.calls


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "step-saved-before"])
def test_resume_after_a_save_killed_at_every_step(tmp_path, monkeypatch, resave):
    steps = _count_steps(tmp_path, monkeypatch, resave)
    assert steps >= 4  # LoRA, optimizer, RNG, state: at least one write each
    for at in range(steps + 1):
        run = tmp_path / f"run{at}"
        model = _model()
        optimizer = torch.optim.AdamW(model.lora_parameters(), lr=0.1)
        _step(model, optimizer, 0)
        expected = {100: _save(model, optimizer, run, 1, 100, 1)}
        _step(model, optimizer, 1)
        if resave:  # a run restarted without --resume saves step 2 again over a complete step 2
            expected[200] = _save(model, optimizer, run, 2, 200, 2)
            _step(model, optimizer, 2)
        with monkeypatch.context() as patch:
            _KillAt(patch, at if at < steps else None)
            try:
                expected[300] = _save(model, optimizer, run, 2, 300, 3)
            except Killed:
                pass
        if at == steps:
            assert 300 in expected  # the save that was not killed is what resumes
        _check_restores(run, expected)


def test_prune_removes_leftovers_of_killed_saves(tmp_path, monkeypatch):
    model = _model()
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=0.1)
    _step(model, optimizer, 0)
    _save(model, optimizer, tmp_path, 1, 100, 1)
    with monkeypatch.context() as patch:
        _KillAt(patch, 2)
        with pytest.raises(Killed):
            _save(model, optimizer, tmp_path, 2, 200, 2)
    _save(model, optimizer, tmp_path, 3, 300, 3)
    ckpt.prune_checkpoints(tmp_path, keep=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step0000001", "step0000003"]
    assert (tmp_path / "checkpoints" / "step0000001" / ckpt.LORA_FILE).is_file()  # the LoRA stays for evaluation
    assert ckpt.latest_checkpoint(tmp_path).name == "step0000003"
