"""``appleswap generate``: swaps over preprocessed pairs, sharded across processes and resumable.

Inputs are either the FFHQ evaluation layout (``<data>/src/<name>.jpg`` + ``<data>/trg/<name>.jpg``, matched by
file name; the teacher's condition images in ``<data>/trg/<condition-dir>/<name>.png``) or a pairs CSV with
columns ``source,target[,condition][,name]`` (paths relative to the CSV). A source may be a photo or an identity
file (``.safetensors``); ``--ids-dir`` supplies ``<name>.safetensors`` identity files for photo sources.
Outputs: ``<output>/<name>.png`` (done files are skipped, so re-running resumes), ``<output>/grid/<name>_grid.png``
(source | condition | result) and ``<output>/generate_config.json``. Each process takes pairs ``rank::world``
(torchrun / accelerate environment, or ``--shard i/n`` for separate nodes or jobs).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

from appleswap.cli_common import HelpFormatter, common_parser, progress_enabled
from appleswap.config import SPEED_HELP, Dtype, SpeedProfile, option

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    data: Path | None = option(None, "FFHQ-layout folder with src/ and trg/ (matched by file name)")
    pairs: Path | None = option(None, "CSV with columns source,target[,condition][,name] (instead of --data)")
    output: Path | None = option(None, "output folder (<name>.png, grid/, generate_config.json)", short="-o")
    mode: Literal["student", "teacher"] = option("student", "student: clean target as condition; teacher: "
                                                 "condition image", flag="model")
    condition_dir: str | None = option(None, "teacher: subfolder of trg/ holding <name>.png condition images")
    ids_dir: Path | None = option(None, "folder of <source name>.safetensors identity files (skips ID encoding)")
    lora: Path | None = option(None, "LoRA file that replaces the model's registry LoRA")
    invert: bool = option(False, "attribute-aware inversion of the target before regeneration")
    inverse_steps: int | None = option(None, "inversion depth in steps (default: --steps)")
    inverse_cond: Literal["noID_trgCond", "noID_noCond", "trgID_noCond", "trgID_trgCond"] = option(
        "noID_trgCond", "conditions during inversion")
    inversion_order: int = option(1, "1 = Euler (reference), 2 = midpoint")
    parity_wrong_midpoint: bool = option(False, "reproduce the reference's --second_order inversion (parity)")
    num_steps: int = option(28, "sampling steps", flag="steps")
    guidance_scale: float = option(1.0, "FLUX distilled guidance (not CFG)")
    image_guidance_scale: float = option(1.0, "guidance against a black condition")
    id_guidance_scale: float = option(1.0, "guidance against the null ID")
    seed: int = option(0, "noise seed, the same for every image (as the reference)")
    kv_cache: bool = option(False, "independent-condition mode with cached condition keys/values (faster, not the "
                            "paper's model)")
    fp8: bool = option(False, "fp8 (e4m3, row-wise scaled, fast accumulation) transformer block weights: half "
                       "the memory, faster on Hopper; changes numerics slightly")
    compile: bool = option(True, "torch.compile the transformer blocks and the VAE on a GPU (regional: ~10-20 s once per "
                           "process and batch shape, then ~1.5x faster passes; same function)")
    cuda_graphs: bool = option(True, "replay each transformer pass as one CUDA graph (GPU only)")
    speed: SpeedProfile | None = option(None, SPEED_HELP)
    offload: Literal["none", "model", "sequential"] = option(
        "none", "memory tier: model = VAE in host memory between uses; sequential = also the transformer blocks")
    batch_size: int = option(1, "pairs per transformer call")
    size: int = option(512, "images are resized to size x size", aliases=("resolution",))
    dtype: Dtype = option("bf16", "model precision")
    grid: bool = option(True, "also write grid/<name>_grid.png (source | condition | result)")
    shard: str | None = option(None, "'i/n': take pairs i::n (default: RANK/WORLD_SIZE from torchrun)")
    limit: int | None = option(None, "only the first N pairs (after sorting, before sharding)")
    watermark: bool = option(True, "embed the invisible watermark that `appleswap verify` detects")
    watermark_key: int | None = option(None, "private watermark key (default: appleswap's public key)")
    c2pa_key: str | None = option(None, "PEM private key that signs the C2PA content credentials (with --c2pa-cert; "
                                  "default: a local self-signed key in the cache folder)")
    c2pa_cert: str | None = option(None, "PEM certificate chain of --c2pa-key, signer first")
    parity: bool = option(False, "do what the authors' scripts do, quirks included (docs/fidelity.md): their "
                          "--second_order inversion for the teacher, bf16 ID encoder, sampled black latent")


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    source: Path
    target: Path
    condition: Path | None = None


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in (".png", ".jpg", ".jpeg", ".webp"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def pairs_from_layout(data: Path, condition_dir: str | None = None) -> list[Pair]:
    """Pairs of ``data/src/<name>.*`` and ``data/trg/<name>.*`` (+ ``trg/<condition_dir>/<name>.*``)."""
    src, trg = data / "src", data / "trg"
    for folder in (src, trg):
        if not folder.is_dir():
            raise FileNotFoundError(f"--data {data}: missing folder {folder}")
    pairs = []
    for source in sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + (".safetensors",)):
        target = _find_image(trg, source.stem)
        if target is None:
            logger.warning("no target for %s in %s; skipped", source.name, trg)
            continue
        condition = None
        if condition_dir:
            condition = _find_image(trg / condition_dir, source.stem)
            if condition is None:
                raise FileNotFoundError(f"no condition image {trg / condition_dir / source.stem}.png")
        pairs.append(Pair(source.stem, source, target, condition))
    if not pairs:
        raise ValueError(f"--data {data}: no src/trg pairs matched by name")
    return pairs


def pairs_from_csv(path: Path) -> list[Pair]:
    """Pairs from a CSV with a header: source, target, optional condition and name (relative paths allowed)."""
    if not path.is_file():
        raise FileNotFoundError(f"--pairs {path} does not exist")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"source", "target"} <= set(rows[0]):
        raise ValueError(f"--pairs {path}: needs a header with at least 'source' and 'target' columns")
    base, pairs = path.parent, []
    for row in rows:
        source, target = base / row["source"], base / row["target"]
        condition = base / row["condition"] if row.get("condition") else None
        name = row.get("name") or f"{source.stem}_{target.stem}"
        pairs.append(Pair(name, source, target, condition))
    if len({p.name for p in pairs}) != len(pairs):
        raise ValueError(f"--pairs {path}: output names are not unique (add a 'name' column)")
    return pairs


def shard_of(shard: str | None) -> tuple[int, int]:
    """(rank, world_size) from ``--shard i/n`` or the torchrun / accelerate environment."""
    if shard:
        try:
            rank, world = (int(v) for v in shard.split("/"))
        except ValueError as error:
            raise ValueError(f"--shard must look like 'i/n', got {shard!r}") from error
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"shard rank {rank} is not in 0..{world - 1}")
    return rank, world


def select_work(pairs: list[Pair], output: Path, rank: int, world: int, limit: int | None) -> list[Pair]:
    """This process's share (``rank::world`` of the sorted pairs), minus outputs that already exist."""
    pairs = sorted(pairs, key=lambda p: p.name)[:limit]
    return [p for p in pairs[rank::world] if not (output / f"{p.name}.png").is_file()]


SOURCE_LONG_SIDE = 1024  # PuLID's resize_numpy_image_long(image, 1024) before face detection


def load_source(path: Path, long_side: int = SOURCE_LONG_SIDE) -> np.ndarray:
    """A source photo as uint8 (H, W, 3) with its aspect ratio, shrunk only when its long side exceeds
    ``long_side`` (Lanczos, sides truncated), as the authors' scripts do before face detection, ArcFace and
    EVA-CLIP; never squashed to a square."""
    import cv2

    from appleswap.files import load_image

    image = load_image(path)
    scale = long_side / max(image.shape[:2])
    if scale < 1:
        size = (int(image.shape[1] * scale), int(image.shape[0] * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LANCZOS4)
    return image


def load_rgb(path: Path, size: int) -> np.ndarray:
    """An image as uint8 (size, size, 3), bicubic-resized when needed (as the reference's PIL resize)."""
    from PIL import Image

    from appleswap.files import load_image

    image = load_image(path)
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image


def preview_grid(images: list[np.ndarray], size: int) -> np.ndarray:
    """Side-by-side panels (size x size each): source | condition | result."""
    from PIL import Image

    panels = [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images]
    return np.concatenate(panels, axis=1)


class SourceTokens:
    """ID tokens per source (identity file, ``--ids-dir`` entry, or photo via the pipeline), cached by path."""

    def __init__(self, pipe, ids_dir: Path | None, size: int):
        self.pipe, self.ids_dir, self.size, self.cache = pipe, ids_dir, size, {}

    def __call__(self, pair: Pair):
        import torch

        if pair.source not in self.cache:
            source = pair.source
            if source.suffix != ".safetensors" and self.ids_dir is not None:
                candidate = self.ids_dir / f"{source.stem}.safetensors"
                if not candidate.is_file():
                    raise FileNotFoundError(f"--ids-dir: {candidate} missing for source {source}")
                source = candidate
            if source.suffix != ".safetensors":
                source = load_source(source)
            self.cache[pair.source] = self.pipe.encode_source(source if not isinstance(source, Path) else str(source))
        return self.cache[pair.source].to(torch.float32)


def _source_picture(pair: Pair, size: int) -> np.ndarray:
    if pair.source.suffix == ".safetensors":
        return np.zeros((size, size, 3), np.uint8)  # no picture of an identity file
    return load_rgb(pair.source, size)


def _pair_inputs(pair: Pair, tokens: SourceTokens, cfg: GenerateConfig) -> tuple:
    """(target, condition or None, ID tokens) of one pair; ValueError / FileNotFoundError for a bad pair."""
    target = load_rgb(pair.target, cfg.size)
    condition = None
    if cfg.mode == "teacher":
        if pair.condition is None:
            raise ValueError("teacher mode needs condition images (--condition-dir or a 'condition' CSV column)")
        condition = load_rgb(pair.condition, cfg.size)
    return target, condition, tokens(pair)


def _ready_pairs(pairs: list[Pair], tokens: SourceTokens, cfg: GenerateConfig,
                 failures: list[str] | None) -> tuple[list[Pair], list[tuple]]:
    """The pairs whose inputs load, with those inputs; a bad pair is logged and appended to ``failures``."""
    from appleswap.files import raise_if_environment

    ready, inputs = [], []
    for pair in pairs:
        try:
            inputs.append(_pair_inputs(pair, tokens, cfg))
            ready.append(pair)
        except (ValueError, FileNotFoundError) as error:
            raise_if_environment(error, pair.target)
            logger.error("pair %s: %s", pair.name, error)
            if failures is not None:
                failures.append(f"{pair.name}: {error}")
    return ready, inputs


def _swap_batch(pipe, inputs: list[tuple], cfg: GenerateConfig, progress: bool = False) -> np.ndarray:
    import torch

    targets = [target for target, _, _ in inputs]
    conditions = [condition for _, condition, _ in inputs] if cfg.mode == "teacher" else None
    ids = torch.cat([ids for _, _, ids in inputs])
    return pipe(ids, targets, condition=conditions, invert=cfg.invert, num_steps=cfg.num_steps,
                inverse_steps=cfg.inverse_steps, inverse_cond=cfg.inverse_cond, inversion_order=cfg.inversion_order,
                parity_wrong_midpoint=cfg.parity_wrong_midpoint, guidance_scale=cfg.guidance_scale,
                image_guidance_scale=cfg.image_guidance_scale, id_guidance_scale=cfg.id_guidance_scale,
                seed=cfg.seed, kv_cache=cfg.kv_cache, progress=progress)


def output_labeller(cfg: GenerateConfig):
    """``label(path, image, pair)``: write a result watermarked (unless --no-watermark), labelled and C2PA-signed."""
    from appleswap.provenance import watermark
    from appleswap.provenance.credentials import configure_credentials
    from appleswap.provenance.labels import write_labelled_output

    configure_credentials(cfg.c2pa_key, cfg.c2pa_cert)
    key = (watermark.DEFAULT_KEY if cfg.watermark_key is None else cfg.watermark_key) if cfg.watermark else None
    model = f"appleswap-{cfg.mode}" + (f" + {cfg.lora.name}" if cfg.lora else "")

    def label(path: Path, image: np.ndarray, pair: Pair) -> Path:
        return write_labelled_output(path, image, model=model, parent=pair.target, watermark_key=key,
                                     source=pair.source.name, target=pair.target.name, steps=cfg.num_steps,
                                     seed=cfg.seed, id_guidance_scale=cfg.id_guidance_scale)
    return label


def _pending_pairs(cfg: GenerateConfig, config_dict: dict | None) -> list[Pair]:
    """This shard's pairs without an output yet (the run's settings written once, by rank 0); usage errors are
    raised here, before any model loads."""
    from appleswap.files import save_json

    if (cfg.data is None) == (cfg.pairs is None):
        raise ValueError("give exactly one of --data (src/ + trg/ folder) or --pairs (CSV)")
    if cfg.output is None:
        raise ValueError("--output is required")
    pairs = pairs_from_layout(cfg.data, cfg.condition_dir) if cfg.data else pairs_from_csv(cfg.pairs)
    rank, world = shard_of(cfg.shard)
    work = select_work(pairs, cfg.output, rank, world, cfg.limit)
    logger.info("shard %d/%d: %d of %d pairs to do", rank, world, len(work), len(pairs))
    if rank == 0 and config_dict is not None:
        save_json(cfg.output / "generate_config.json", config_dict)
    if work and cfg.mode == "teacher" and all(p.condition is None for p in work):  # a usage error, not a bad pair
        raise ValueError("teacher mode needs condition images (--condition-dir or a 'condition' CSV column)")
    return work


def generate(cfg: GenerateConfig, *, weights_dir: str | None = None, device: str | None = None,
             config_dict: dict | None = None, failures: list[str] | None = None,
             progress: bool = False) -> list[Path]:
    """Run the swaps this process owns; returns the written result paths. ``progress``: a bar over the batches
    and one over each batch's sampling steps (with ETA), on stderr.

    A bad pair (unreadable image, no face in the source) is logged, appended to ``failures`` and skipped (it has no
    output, so the next run tries it again); a fault of the machine (disk full, permission) stops the run."""
    import torch
    from tqdm.auto import tqdm

    from appleswap.config import torch_dtype
    from appleswap.parity import apply_parity
    from appleswap.pipeline import SwapPipeline

    cfg = apply_parity(cfg, "generate")
    work = _pending_pairs(cfg, config_dict)
    if not work:
        return []
    rank, world = shard_of(cfg.shard)
    label = output_labeller(cfg)  # before the model loads: an unusable --c2pa-key fails at once
    if device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    dtype = torch_dtype(cfg.dtype)
    pipe = SwapPipeline.from_pretrained(weights_dir, cfg.mode, lora_path=cfg.lora, device=device, dtype=dtype,
                                        fp8=cfg.fp8, offload=cfg.offload, compile=cfg.compile,
                                        cuda_graphs=cfg.cuda_graphs, parity=cfg.parity, speed=cfg.speed)
    tokens, written = SourceTokens(pipe, cfg.ids_dir, cfg.size), []
    for start in tqdm(range(0, len(work), cfg.batch_size), desc=f"generate [{rank}/{world}]", unit="batch",
                      disable=not progress):
        batch, inputs = _ready_pairs(work[start:start + cfg.batch_size], tokens, cfg, failures)
        if not batch:
            continue
        results = _swap_batch(pipe, inputs, cfg, progress)
        for pair, result in zip(batch, results):
            if cfg.grid:
                condition = pair.condition if cfg.mode == "teacher" else pair.target
                panels = [_source_picture(pair, cfg.size), load_rgb(condition, cfg.size), result]
                label(cfg.output / "grid" / f"{pair.name}_grid.png", preview_grid(panels, cfg.size), pair)
            written.append(label(cfg.output / f"{pair.name}.png", result, pair))  # last: marks the pair done
    return written


def add_parser(subparsers) -> None:
    from appleswap.config import add_config_args

    parser = subparsers.add_parser(
        "generate", parents=[common_parser()], formatter_class=HelpFormatter,
        help="swap faces over preprocessed pairs (sharded, resumable)",
        description=__doc__ + "\nExamples:\n  appleswap generate --data ffhq_eval -o out/student\n"
        "  appleswap generate --model teacher --data ffhq_eval --condition-dir condition --invert -o out/t\n"
        "  torchrun --nproc_per_node 8 -m appleswap.cli generate --data ffhq_eval -o out/student",
    )
    add_config_args(parser.add_argument_group("generate options (config file section [generate])"), GenerateConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from appleswap.cli_common import EXIT_OK, exit_status
    from appleswap.config import config_to_dict, load_config_file, resolve_config
    from appleswap.parity import apply_parity

    file_data = load_config_file(args.config)
    section = file_data.get("generate", file_data) if isinstance(file_data.get("generate"), dict) else file_data
    cfg = apply_parity(resolve_config(GenerateConfig, args, section), "generate")
    failures: list[str] = []
    written = generate(cfg, weights_dir=args.weights_dir, device=args.device, config_dict=config_to_dict(cfg),
                       failures=failures, progress=progress_enabled(args))
    for line in failures:
        print(f"FAILED: {line}")
    print(f"appleswap generate: wrote {len(written)} result(s) to {cfg.output}"
          + (f"; {len(failures)} pair(s) failed" if failures else ""))
    if not failures:
        return EXIT_OK  # every pair of this shard has its output (this run's or an earlier one's)
    return exit_status(len(written), len(failures))
