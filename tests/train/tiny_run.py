"""A tiny teacher run on CPU (tiny FLUX weights folder + the test-photo dataset), in-process or under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/train/tiny_run.py BASE OUT STEPS BATCH
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def tiny_config(base: Path, out: Path, **overrides):
    from appleswap.train.config import TrainConfig

    values = {"dataset_root": str(base / "data"), "id_cache": str(base / "ids"), "output_dir": str(out),
              "resolution": 64, "lora_rank": 8, "lora_alpha": 8.0, "batch_size": 2, "gradient_accumulation": 1,
              "max_steps": 4, "mixed_precision": "fp32", "id_loss": "none", "lpips_weight": 0.0, "learning_rate": 1e-3,
              "num_validation": 1, "save_every": 2, "validate_every": 0, "validation_steps": 4, "log_every": 1,
              "num_workers": 0, "gradient_checkpointing": False}
    values.update(overrides)
    return TrainConfig(**values)


def run_tiny(base: Path, config, resume: bool = True) -> dict:
    """Seeded like the CLI: seed, data, parts, train."""
    from appleswap.train import build
    from appleswap.train.trainer import make_accelerator, train

    accelerator = make_accelerator(config, cpu=True)
    torch.manual_seed(config.seed)
    train_set, val_set = build.build_teacher_data(config)
    parts = build.build_parts(config, str(base / "w"), accelerator.device)
    return {"result": train(parts, train_set, val_set, config, accelerator, resume=resume), "parts": parts}


if __name__ == "__main__":
    base, out, steps, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    run_tiny(base, tiny_config(base, out, max_steps=steps, batch_size=batch, save_every=steps, num_validation=0))
