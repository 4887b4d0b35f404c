"""``appleswap pseudo``: pseudo-triplets from the teacher with attribute-aware inversion (docs/method.md).

The manifest ``pairs.json`` is drawn once with the seed; ranks take strided shards; finished files are skipped,
so a killed job restarted with the same command ends with every pair exactly once. Several GPUs:
``torchrun --nproc_per_node N -m appleswap.cli pseudo ...`` (RANK / WORLD_SIZE are read from the environment).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from appleswap.cli_common import HelpFormatter, common_parser, exit_status
from appleswap.config import add_config_args, load_config_file, resolve_config
from appleswap.train.config import PseudoConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pseudo", help="pseudo-triplets from the teacher (inversion + regeneration)",
                                   description=__doc__, parents=[common_parser()], formatter_class=HelpFormatter)
    add_config_args(parser, PseudoConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from appleswap.config import torch_dtype
    from appleswap.devices import pick_device
    from appleswap.pipeline import SwapPipeline
    from appleswap.train.data import IdTokenStore
    from appleswap.train.pairs import load_or_create_manifest, merge_scores, shard
    from appleswap.train.pseudo_gen import PseudoGenerator, generate_pairs, pool_items
    from appleswap.train.scores import build_scorer

    data = load_config_file(args.config)
    from appleswap.parity import apply_parity

    config = resolve_config(PseudoConfig, args, data["pseudo"] if isinstance(data.get("pseudo"), dict) else data)
    config = apply_parity(config, "pseudo")
    if config.dataset_root is None or config.id_cache is None:
        raise ValueError("`dataset_root` and `id_cache` are required (config file or --dataset-root/--id-cache)")
    if config.batch_size is not None and config.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {config.batch_size}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(pick_device(args.device) if world == 1 else f"cuda:{local}"
                          if torch.cuda.is_available() else "cpu")
    root, out_dir = Path(config.dataset_root), Path(config.output_dir)
    pool = pool_items(root, config.condition_folder, config.aes_threshold, IdTokenStore(config.id_cache, "raw")) \
        if rank == 0 else {}
    pairs = load_or_create_manifest(out_dir, pool, config.num_pairs, config.seed) if rank == 0 else None
    pairs = pairs or _wait_for_manifest(out_dir, config)
    dtype = torch_dtype(config.mixed_precision)
    pipeline = SwapPipeline.from_pretrained(
        args.weights_dir, "teacher", flux_path=config.flux, pulid_path=config.pulid, lora_path=config.teacher,
        device=str(device), dtype=dtype, prompt=config.prompt, null_id=IdTokenStore(config.id_cache).null(),
        fp8=config.fp8, compile=config.compile, cuda_graphs=config.cuda_graphs, parity=config.parity,
        speed=config.speed)
    batch_size = config.batch_size or (4 if device.type == "cuda" else 1)
    generator = PseudoGenerator(pipeline, num_steps=config.num_steps, guidance=config.guidance, batch_size=batch_size)
    scorer = build_scorer(config, args.weights_dir, root, device) if config.score else None
    failures: list[str] = []
    mine = shard(pairs, rank, world)
    done = generate_pairs(generator, mine, root=root, out_dir=out_dir, id_cache=Path(config.id_cache),
                          condition_folder=config.condition_folder, resolution=config.size, scorer=scorer,
                          failures=failures)
    if config.score:
        merge_scores(out_dir)
    for line in failures:
        print(f"FAILED: {line}")
    print(f"rank {rank}/{world}: generated {done} (batches of {batch_size}), shard of {len(mine)}"
          + (f", {len(failures)} failed" if failures else "") + f"; output in {out_dir}")
    return exit_status(len(mine) - len(failures), len(failures))


def _wait_for_manifest(out_dir: Path, config: PseudoConfig) -> list:
    """Ranks > 0 wait for rank 0's manifest (drawn once) instead of drawing their own."""
    import time

    from appleswap.train.pairs import MANIFEST, load_or_create_manifest

    for _ in range(600):
        if (out_dir / MANIFEST).is_file():
            return load_or_create_manifest(out_dir, {}, config.num_pairs, config.seed)
        time.sleep(1)
    raise FileNotFoundError(f"{out_dir / MANIFEST} did not appear (is rank 0 running?)")
