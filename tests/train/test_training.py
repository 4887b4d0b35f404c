"""Tiny teacher runs on CPU: the loss goes down, all losses backprop, resume is exact, two processes = one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.tiny_flux import make_tiny_weights
from tests.train.conftest import write_dataset
from tests.train.tiny_run import run_tiny, tiny_config

CHECKOUT = os.pathsep.join(str(Path(__file__).resolve().parents[2] / p) for p in ("src", ""))  # not an installed copy


@pytest.fixture(scope="module")
def base(tmp_path_factory, faces_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny_train")
    make_tiny_weights(root / "w")
    write_dataset(root / "data", root / "ids", faces_dir)
    return root


def _lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "default.safetensors"))


def _velocity_error(parts, data) -> float:
    """The judge, independent of the training loss code: mean squared distance of the predicted velocity to the
    true one, noise - x0, on held-out draws (noise and t from a generator training never used), x_t built here."""
    from appleswap.model.latents import image_ids, vae_scale_factor
    from appleswap.train.teacher import batch_text, encode_posterior

    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=len(data))))
    size = len(batch["index"])
    x0 = encode_posterior(parts.vae, batch["target"], [torch.Generator().manual_seed(i) for i in range(size)])
    cond = encode_posterior(parts.vae, batch["condition"], [torch.Generator().manual_seed(99 + i) for i in range(size)])
    height, width = batch["target"].shape[-2:]
    ids = image_ids(height, width, vae_scale=vae_scale_factor(parts.vae))
    text = batch_text(parts, torch.zeros(size, dtype=torch.bool), torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(424242)
    errors = []
    with torch.no_grad():
        for _ in range(4):
            noise = torch.randn(x0.shape, generator=generator)
            t = 0.1 + 0.8 * torch.rand(size, generator=generator)
            x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
            velocity = parts.transformer(x_t, t, text=text, img_ids=ids, condition=cond,
                                         id_tokens=batch["id_tokens"], guidance=torch.ones(size))
            errors.append(float(((velocity - (noise - x0)) ** 2).mean()))
    return float(np.mean(errors))


def test_teacher_run_lowers_flow_matching_loss(base, tmp_path):
    from appleswap.train import build

    config = tiny_config(base, tmp_path / "run", max_steps=40, lora_rank=16, lora_alpha=16.0, learning_rate=3e-3,
                         save_every=40, num_validation=0, drop_text=0.0, drop_condition=0.0, drop_id=0.0)
    data = build.build_teacher_data(config)[0]
    run = run_tiny(base, config)
    trained = _velocity_error(run["parts"], data)
    fresh = run_tiny(base, tiny_config(base, tmp_path / "fresh", max_steps=0, lora_rank=16, lora_alpha=16.0,
                                       num_validation=0))
    before = _velocity_error(fresh["parts"], data)
    assert trained < 0.9 * before, (before, trained)
    saved = _lora(tmp_path / "run" / "checkpoints" / "step0000040")
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in saved)


def test_id_and_lpips_losses_backprop(base, tmp_path):
    """Both auxiliary losses run on the decoded x0 estimate and reach the LoRA (gates opened to t <= 1)."""
    import torchvision

    from appleswap.files import save_tensors
    from appleswap.train.arcface import ArcFaceResNet
    from appleswap.train.teacher import compute_loss

    torch.manual_seed(0)
    save_tensors(tmp_path / "arc.safetensors", ArcFaceResNet((1, 1, 1, 1)).state_dict())
    vgg = torchvision.models.vgg16(weights=None).features.state_dict()
    save_tensors(tmp_path / "vgg.safetensors", {f"features.{k}": v for k, v in vgg.items()})
    config = tiny_config(base, tmp_path / "aux", id_loss="arcface", arcface=str(tmp_path / "arc.safetensors"),
                         vgg16=str(tmp_path / "vgg.safetensors"), lpips_weight=1.0, id_loss_max_t=1.0,
                         lpips_max_t=1.0, max_steps=0)
    parts = run_tiny(base, config)["parts"]
    from appleswap.train import build

    data = build.build_teacher_data(config)[0]
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    loss, logs = compute_loss(parts, batch, config)
    loss.backward()
    assert logs["loss/id"] > 0 and logs["loss/lpips"] > 0
    assert abs(logs["loss/total"] - logs["loss/fm"] - logs["loss/id"] - logs["loss/lpips"]) < 1e-4
    grads = [p.grad for p in parts.transformer.lora_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_stop_and_resume_equals_uninterrupted(base, tmp_path):
    straight = tmp_path / "straight"
    run_tiny(base, tiny_config(base, straight, max_steps=4, save_every=2))
    resumed = tmp_path / "resumed"
    run_tiny(base, tiny_config(base, resumed, max_steps=2, save_every=2))
    assert (resumed / "checkpoints" / "step0000002" / "state.json").is_file()
    run_tiny(base, tiny_config(base, resumed, max_steps=4, save_every=2))
    a, b = _lora(straight / "checkpoints" / "step0000004"), _lora(resumed / "checkpoints" / "step0000004")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    changed = _lora(straight / "checkpoints" / "step0000002")
    assert any(not torch.equal(changed[k], a[k]) for k in a)  # the last two steps did change the LoRA


def test_two_processes_match_one(base, tmp_path):
    one = tmp_path / "one"
    run_tiny(base, tiny_config(base, one, max_steps=3, batch_size=2, save_every=3, num_validation=0))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": CHECKOUT}
    script = Path(__file__).with_name("tiny_run.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script), str(base), str(two), "3", "1"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _lora(one / "checkpoints" / "step0000003"), _lora(two / "checkpoints" / "step0000003")
    # the same global batches and draws: equal up to float reduction order (AdamW moves each weight ~3e-3 here)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=5e-5)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.02 * max(a[k].abs().max().item() for k in a
                                                                          if ".lora_B." in k)


def test_train_teacher_cli_with_shipped_config(base, tmp_path):
    """`appleswap train teacher --config configs/teacher.yaml` + flag overrides: checkpoint, preview, logs."""
    from tests.train.test_pseudo import CLI

    repo = Path(__file__).resolve().parents[2]
    run = tmp_path / "cli"
    args = ["train", "teacher", "--config", str(repo / "configs" / "teacher.yaml"), "--dataset-root",
            str(base / "data"), "--id-cache", str(base / "ids"), "-o", str(run), "--size", "64",
            "--lora-rank", "4", "--lora-alpha", "4", "--batch-size", "2", "--gradient-accumulation", "2",
            "--max-steps", "2", "--dtype", "fp32", "--id-loss", "none", "--lpips-weight", "0",
            "--num-validation", "2", "--save-every", "1", "--validate-every", "2", "--validation-steps", "2",
            "--log-every", "1", "--workers", "0", "--no-gradient-checkpointing", "--weights-dir", str(base / "w"),
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": CHECKOUT}
    result = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step0000001", "step0000002"]
    assert (run / "previews" / "step0000002.png").is_file()
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    config = __import__("json").loads((run / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["aes_threshold"] == 5.1  # flag over file, file over default


def test_training_step_for_benchmarks(base, tmp_path):
    """The bench entry point: one optimizer step without accelerate moves the LoRA and only the LoRA."""
    from appleswap.train.teacher import example_batch, training_step

    config = tiny_config(base, tmp_path / "bench", max_steps=0, id_loss_max_t=1.0)
    parts = run_tiny(base, config)["parts"]
    lora = [p for p in parts.transformer.parameters() if p.requires_grad]
    assert lora and all(".lora_" in n for n, p in parts.transformer.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in parts.transformer.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in lora]
    optimizer = torch.optim.AdamW(lora, lr=1e-3, weight_decay=1e-3)
    logs = training_step(parts, example_batch(2, 64, 64), config, optimizer)
    assert logs["grad_norm"] > 0 and np.isfinite(logs["loss/total"])
    assert any(not torch.equal(a, b) for a, b in zip(before, lora))
    assert all(torch.equal(p, frozen[n]) for n, p in parts.transformer.named_parameters() if n in frozen)
