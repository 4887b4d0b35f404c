"""The training loop (teacher and student): accelerate for devices, DDP and accumulation; our own
pickle-free checkpoints; TensorBoard scalars and real-swap previews at the guidance actually used."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from appleswap.config import config_to_dict
from appleswap.files import save_image
from appleswap.model.latents import image_ids, prepare_noise, vae_scale_factor
from appleswap.train import checkpoint as ckpt
from appleswap.train.build import make_optimizer
from appleswap.train.teacher import (
    TrainParts,
    batch_text,
    compute_loss,
    encode_posterior,
    sample_generator,
    training_step,
)

log = logging.getLogger(__name__)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Per epoch a permutation seeded by (seed, epoch), cut into global batches of ``batch_size * world_size``;
    each rank takes its slice. One process with batch 4 sees the same global batches as two with batch 2.
    ``start`` skips micro-batches already consumed (exact resume)."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if size < batch_size * world_size:
            raise ValueError(f"{size} training samples are fewer than one global batch ({batch_size} x {world_size})")
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        glob = self.batch_size * self.world_size
        for number in range(self.start, len(self)):
            chunk = order[number * glob:(number + 1) * glob]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()


def make_accelerator(config: Any, cpu: bool = False):
    """accelerate handles processes and accumulation; weights stay in the config dtype (pure bf16 = paper)."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = ["tensorboard"] + (["wandb"] if os.environ.get("WANDB_PROJECT") else [])
    return Accelerator(gradient_accumulation_steps=config.gradient_accumulation, mixed_precision="no", cpu=cpu,
                       log_with=trackers, project_config=ProjectConfiguration(
                           project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")))


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if k in ("id_tokens",) else v for k, v in batch.items()}


@torch.no_grad()
def sample_swaps(parts: TrainParts, batch: dict[str, Any], *, steps: int, guidance: float,
                 seed: int = 0) -> torch.Tensor:
    """Euler sampling over FLUX's shifted schedule from seeded noise: (B, 3, H, W) in [0, 1] (previews, tests)."""
    from appleswap.model.latents import decode_tokens
    from appleswap.sampling.samplers import sample_euler
    from appleswap.sampling.schedule import get_schedule

    model, vae = parts.transformer, parts.vae
    device, dtype = model.device, model.dtype
    height, width = batch["target"].shape[-2:]
    scale = vae_scale_factor(vae)
    cond = encode_posterior(vae, batch["condition"], [sample_generator(seed, -1, int(i), "vae_condition")
                                                      for i in batch["index"]]).to(device, dtype)
    x = prepare_noise(len(cond), height, width, generator=torch.Generator().manual_seed(seed), vae_scale=scale,
                      device=device, dtype=torch.float32)
    ids = image_ids(height, width, device=device, vae_scale=scale)
    text = batch_text(parts, torch.zeros(len(x), dtype=torch.bool), device, dtype)
    g = torch.full((len(x),), guidance, device=device, dtype=dtype)
    id_tokens = batch["id_tokens"].to(device, dtype)

    def velocity(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(latents.to(dtype), sigma.to(dtype), text=text, img_ids=ids, condition=cond,
                     id_tokens=id_tokens, guidance=g).float()

    x = sample_euler(velocity, x, get_schedule(steps, x.shape[1]), disable=True)
    return decode_tokens(vae, x, height, width).cpu()


def write_preview(path: Path, batch: dict[str, Any], result: torch.Tensor) -> None:
    """Rows of [source | condition | swap | target]."""
    rows = [torch.cat([batch["source"][i], batch["condition"][i], result[i], batch["target"][i]], dim=2)
            for i in range(len(result))]
    grid = torch.cat(rows, dim=1).clamp(0, 1).permute(1, 2, 0).numpy()
    save_image(path, (grid * 255 + 0.5).astype(np.uint8))


def _validate(parts: TrainParts, val_set: Any, config: Any, step: int, accelerator: Any) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size)
    logs, first = [], None
    parts.transformer.eval()
    with torch.no_grad():
        for batch in loader:
            logs.append(compute_loss(parts, batch, config, epoch=-1)[1]["loss/fm"])
            first = batch if first is None else first
    parts.transformer.train()
    if first is not None and config.validation_steps > 0:
        result = sample_swaps(parts, first, steps=config.validation_steps, guidance=config.validation_guidance,
                              seed=config.seed)
        write_preview(Path(config.output_dir) / "previews" / f"step{step:07d}.png", first, result)
    return {"val/fm": float(np.mean(logs))} if logs else {}


def train(parts: TrainParts, train_set: Any, val_set: Any, config: Any, accelerator: Any, *,
          resume: bool = True) -> dict[str, Any]:
    """Run to ``config.max_steps`` optimizer steps (resuming from the newest complete checkpoint when asked);
    returns the last logs and the step reached."""
    run_dir = Path(config.output_dir)
    transformer = parts.transformer
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    sampler = GlobalBatchSampler(len(train_set), config.batch_size, accelerator.process_index,
                                 accelerator.num_processes, config.seed)
    step, epoch, position = 0, 0, 0
    found = ckpt.latest_checkpoint(run_dir) if resume else None
    if found is not None:
        state = ckpt.load_checkpoint(found, transformer=transformer, optimizer=optimizer)
        step, epoch, position = state["step"], state["data"]["epoch"], state["data"]["batch"]
    if accelerator.is_main_process:
        import os

        accelerator.init_trackers(os.environ.get("WANDB_PROJECT") or "train",
                                  config={k: str(v) for k, v in config_to_dict(config).items()})
    progress, advance = _progress_bar(config, accelerator, step)
    logs: dict[str, float] = {}
    while step < config.max_steps:
        train_set.set_epoch(epoch)
        sampler.set_position(epoch, position)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=config.num_workers,
                                             pin_memory=accelerator.device.type == "cuda")
        for batch in loader:
            with accelerator.accumulate(model):
                logs = training_step(parts, _to_device(batch, accelerator.device), config, optimizer,
                                     epoch=epoch, accelerator=accelerator, model=model)
            position += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            advance(logs)
            _after_step(parts, val_set, config, accelerator, (model, optimizer), step, epoch, position, logs)
            if step >= config.max_steps:
                break
        else:
            epoch, position = epoch + 1, 0
    progress.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "logs": logs}


def _progress_bar(config: Any, accelerator: Any, step: int):
    """One bar on the main process, on a terminal only (None: tqdm's check), showing the loss and samples/s;
    returns it and ``advance(logs)``, called once per optimizer step."""
    bar = tqdm(total=config.max_steps, initial=step, disable=None if accelerator.is_local_main_process else True,
               desc="train", unit="step")
    samples_per_step = config.batch_size * config.gradient_accumulation * accelerator.num_processes
    last = [time.perf_counter()]

    def advance(logs: dict[str, float]) -> None:
        now = time.perf_counter()
        bar.set_postfix(loss=f"{logs.get('loss/total', float('nan')):.4f}",
                        samples_s=f"{samples_per_step / max(now - last[0], 1e-9):.2f}", refresh=False)
        bar.update(1)
        last[0] = now

    return bar, advance


def fsdp_lora_state(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
    """Under FSDP: gather the full state on the main process (a collective: every rank calls it) and keep the
    LoRA under the reference keys."""
    full = accelerator.get_state_dict(model)
    return {"transformer." + k.removeprefix("flux.").replace(".default.weight", ".weight"): v
            for k, v in (full or {}).items() if ".lora_" in k}


def _after_step(parts: TrainParts, val_set: Any, config: Any, accelerator: Any, prepared: tuple, step: int,
                epoch: int, position: int, logs: dict[str, float]) -> None:
    """Logging, checkpoints and previews at optimizer-step boundaries (main process writes)."""
    from accelerate.utils import DistributedType

    model, optimizer = prepared
    run_dir = Path(config.output_dir)
    if step % config.log_every == 0:
        accelerator.log(logs, step=step)
    if step % config.save_every == 0 or step == config.max_steps:
        accelerator.wait_for_everyone()
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        lora_state = fsdp_lora_state(accelerator, model) if fsdp else None
        if accelerator.is_main_process:  # FSDP shards the AdamW moments: not saved (resume restarts them)
            ckpt.save_checkpoint(run_dir / "checkpoints" / f"step{step:07d}", transformer=parts.transformer,
                                 optimizer=None if fsdp else optimizer, step=step, lora_state=lora_state,
                                 data_state={"epoch": epoch, "batch": position}, config=config_to_dict(config))
            ckpt.prune_checkpoints(run_dir, config.keep_checkpoints)
        accelerator.wait_for_everyone()
    if val_set is not None and config.validate_every and step % config.validate_every == 0 \
            and accelerator.is_main_process:
        accelerator.log(_validate(parts, val_set, config, step, accelerator), step=step)
