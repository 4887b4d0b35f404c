"""The checkpoint pieces one by one: the optimizer's flattening (tensors + JSON scalars), the RNG snapshot, the files
of a save (with and without optimizer, with a gathered LoRA state), refusals, the newest complete checkpoint by
step number, and pruning (LoRA kept, leftovers of killed saves removed)."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from appleswap.model.transformer import AppleTransformer
from appleswap.train import checkpoint as ckpt
from tests.fixtures.tiny_flux import build_tiny_transformer

MODULES = ["x_embedder", "transformer_blocks.0.attn.to_q"]


def _model(seed: int = 0) -> AppleTransformer:
    model = AppleTransformer(build_tiny_transformer())
    model.add_lora(rank=2, modules=MODULES)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.lora_parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
            param.requires_grad_(True)
    return model


def _trained(seed: int = 0, lr: float = 0.05):
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=lr)
    loss = sum((p**2).sum() for p in model.lora_parameters())
    loss.backward()
    optimizer.step()
    return model, optimizer


def test_optimizer_state_round_trips_with_its_scalars(tmp_path):
    model, optimizer = _trained()
    params = list(model.lora_parameters())
    first = optimizer.state[params[0]]
    first["custom_count"] = 3  # a non-tensor entry travels in the JSON metadata
    first["ema.buffer"] = torch.ones(2)  # names may hold dots
    first["ema.decay"] = 0.5
    last = optimizer.state[params[-1]]
    last.clear()
    last["step"] = 4.0  # a parameter whose state has no tensor at all (AdamW takes a float step)
    tensors, meta = ckpt.optimizer_tensors(optimizer)
    count = len(params)
    assert set(tensors) == ({f"state.{i}.{k}" for i in range(count - 1) for k in ("step", "exp_avg", "exp_avg_sq")}
                            | {"state.0.ema.buffer"})
    assert json.loads(meta["scalars"]) == {"0.custom_count": 3, "0.ema.decay": 0.5, f"{count - 1}.step": 4.0}
    assert json.loads(meta["param_groups"])[0]["lr"] == 0.05
    from appleswap.files import save_tensors

    save_tensors(tmp_path / "opt.safetensors", tensors, metadata=meta)
    _, fresh = _trained(seed=1, lr=0.3)
    ckpt.load_optimizer_tensors(fresh, tmp_path / "opt.safetensors")
    want, got = optimizer.state_dict(), fresh.state_dict()
    assert json.loads(json.dumps(got["param_groups"])) == json.loads(json.dumps(want["param_groups"]))  # (tuples)
    assert got["param_groups"][0]["lr"] == 0.05
    assert got["state"].keys() == want["state"].keys()
    for index, entry in want["state"].items():
        assert got["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got["state"][index][key], value), (index, key)
            else:
                assert got["state"][index][key] == value


def test_rng_snapshot_restores_every_generator():
    np.random.normal()  # leaves a cached Gaussian in numpy's legacy state
    tensors, jsonable = ckpt.rng_snapshot()
    json.dumps(jsonable)  # JSON-ready
    want = (torch.rand(3), random.random(), np.random.random(), np.random.normal())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    ckpt.restore_rng(tensors, json.loads(json.dumps(jsonable)))
    got = (torch.rand(3), random.random(), np.random.random(), np.random.normal())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_save_writes_the_four_files_and_replaces_a_step_whole(tmp_path, caplog):
    model, optimizer = _trained()
    folder = tmp_path / "checkpoints" / "step0000005"
    folder.mkdir(parents=True)
    (folder / "stale.txt").write_text("from an older save of this step")
    leftover = tmp_path / "checkpoints" / ".step0000005.partial"  # a save of this step killed earlier
    leftover.mkdir()
    (leftover / "default.safetensors").write_text("half written")
    with caplog.at_level(logging.INFO, logger="appleswap.train.checkpoint"):
        returned = ckpt.save_checkpoint(folder, transformer=model, optimizer=optimizer, step=5,
                                        data_state={"epoch": 1, "batch": 7}, config={"lr": 0.05})
    assert returned == folder
    assert caplog.messages == [f"checkpoint {folder} (step 5)"]
    assert sorted(p.name for p in folder.iterdir()) == ["default.safetensors", "optimizer.safetensors",
                                                        "rng.safetensors", "state.json"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["step0000005"]  # no partial folder left
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 5 and state["data"] == {"epoch": 1, "batch": 7} and state["config"] == {"lr": 0.05}
    assert set(state["rng"]) == {"python", "numpy"}
    assert torch.equal(load_file(str(folder / "rng.safetensors"))["torch_cpu"], torch.get_rng_state())


def test_gathered_lora_state_is_written_as_given(tmp_path):
    model, _ = _trained()
    given = {k: torch.full_like(v, 0.5) for k, v in model.flux.state_dict().items() if ".lora_" in k}
    given = {"transformer." + k.replace(".default.weight", ".weight"): v for k, v in given.items()}
    folder = ckpt.save_checkpoint(tmp_path / "step0000001", transformer=model, optimizer=None, step=1,
                                  data_state={}, config={}, lora_state=given)
    written = load_file(str(folder / ckpt.LORA_FILE))
    assert written.keys() == given.keys() and all(torch.equal(written[k], given[k]) for k in given)
    with safe_open(str(folder / ckpt.LORA_FILE), framework="pt") as handle:
        assert "lora_adapter_metadata" in handle.metadata()  # rank and alpha travel with it
    assert not (folder / "optimizer.safetensors").exists()


def test_resume_without_optimizer_file_keeps_fresh_moments(tmp_path, caplog):
    model, _ = _trained()
    folder = ckpt.save_checkpoint(tmp_path / "step0000002", transformer=model, optimizer=None, step=2,
                                  data_state={"batch": 3}, config={})
    resumed, optimizer = _trained(seed=4)
    moments = {k: v.clone() for k, v in next(iter(optimizer.state.values())).items()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="appleswap.train.checkpoint"):
        state = ckpt.load_checkpoint(folder, transformer=resumed, optimizer=optimizer)
    assert caplog.messages[-1] == f"resumed from {folder} (step 2)"
    assert state["step"] == 2 and state["data"] == {"batch": 3}
    assert f"resume: {folder} has no optimizer state; AdamW moments start afresh" in caplog.messages
    assert all(torch.equal(v, moments[k]) for k, v in next(iter(optimizer.state.values())).items())
    for (name, param), (_, saved) in zip(resumed.flux.named_parameters(), model.flux.named_parameters()):
        if ".lora_" in name:
            assert torch.equal(param, saved), name  # the LoRA itself is restored


def test_refusals(tmp_path):
    model, optimizer = _trained()
    with pytest.raises(FileNotFoundError, match="state.json not found"):
        ckpt.load_checkpoint(tmp_path, transformer=model, optimizer=optimizer)
    other = AppleTransformer(build_tiny_transformer())
    other.add_lora(rank=2, modules=["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"])
    path = other.save_lora(tmp_path / "other.safetensors")
    two = r"\['[^',\]]+', '[^',\]]+'\]"  # the first two names of 4 missing and 4 unexpected
    with pytest.raises(ValueError, match=f"does not match the model's LoRA \\(missing {two}, unexpected {two}\\)"):
        ckpt.restore_lora(model, path)


def _fake_checkpoint(root, name, complete=True):
    folder = root / "checkpoints" / name
    folder.mkdir(parents=True)
    for file in (ckpt.LORA_FILE, "optimizer.safetensors", "rng.safetensors"):
        (folder / file).write_text(file)
    if complete:
        (folder / ckpt.STATE_FILE).write_text("{}")
    return folder


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path, "step9")
    _fake_checkpoint(tmp_path, "step10")  # 10 > 9 although "step10" < "step9" as text
    _fake_checkpoint(tmp_path, "step11", complete=False)
    assert ckpt.latest_checkpoint(tmp_path).name == "step10"


def test_prune_keeps_the_newest_full_states(tmp_path):
    for step in (1, 2, 10, 20):
        _fake_checkpoint(tmp_path, f"step{step}")
    _fake_checkpoint(tmp_path, "step30", complete=False)
    (tmp_path / "checkpoints" / "step1" / "optimizer.safetensors").unlink()  # saved without moments
    (tmp_path / "checkpoints" / "step20" / ".default.safetensors.tmp").write_text("leftover")
    (tmp_path / "checkpoints" / ".step40.partial").mkdir()
    ckpt.prune_checkpoints(tmp_path, keep=2)
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        assert sorted(p.name for p in (root / f"step{step}").iterdir()) == [ckpt.LORA_FILE, "state.lora-only.json"]
    for step in (10, 20):
        assert (root / f"step{step}" / ckpt.STATE_FILE).is_file() and (root / f"step{step}" / "rng.safetensors").is_file()
    assert not (root / "step20" / ".default.safetensors.tmp").exists() and not (root / ".step40.partial").exists()
    assert (root / "step30" / "optimizer.safetensors").is_file()  # an incomplete folder is not counted or pruned
    ckpt.prune_checkpoints(tmp_path, keep=5)  # fewer than keep: nothing more
    assert (root / "step10" / ckpt.STATE_FILE).is_file()
    ckpt.prune_checkpoints(tmp_path / "nothing", keep=1)  # no checkpoints folder: nothing to do
