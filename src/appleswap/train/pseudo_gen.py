"""Pseudo-triplet generation: pseudo-triplets from the teacher with attribute-aware inversion (docs/method.md).

For each manifest pair (source B/b, target A/a): invert A/a to noise with A/a's condition and the null ID,
regenerate with B's (unmasked) ID tokens and the same condition, write ``{B}_{b}_{A}_{a}.png``. The manifest
``pairs.json`` is drawn once with the seed; ranks take strided shards; finished files are skipped, so a killed
job restarted with the same command ends with every pair exactly once. Launch over GPUs with
``torchrun --nproc_per_node N -m appleswap pseudo ...`` (RANK / WORLD_SIZE are read from the environment).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def pool_items(root: Path, condition_folder: str, aes_threshold: float, ids: Any = None) -> dict[str, list]:
    """Images above the aesthetic threshold that have a condition image (and, when ``ids`` is given, raw ID
    tokens to serve as a source), grouped by identity."""
    from appleswap.train.data import index_targets

    groups: dict[str, list] = {}
    for item in index_targets(root, condition_folder, aes_threshold):
        if ids is None or ids.has(item):
            groups.setdefault(item.identity, []).append(item)
    return groups


class PseudoGenerator:
    """Teacher + attribute-aware inversion for one pair at a time, run by the swap pipeline (teacher mode,
    ``invert=True``, ``noID_trgCond``): the same sampler as ``appleswap swap`` and with its speed options (fused
    projections, compiled blocks and VAE, CUDA graphs, per-swap rows), since this is the job that runs 100,000 times.
    Deterministic: the condition latent is drawn from the VAE posterior with the seeded generator."""

    def __init__(self, pipeline: Any, *, num_steps: int = 28, guidance: float = 1.0, seed: int = 0) -> None:
        if pipeline.mode != "teacher":
            raise ValueError(f"pseudo-triplets come from the teacher; the pipeline is in {pipeline.mode!r} mode")
        self.pipeline, self.num_steps, self.guidance, self.seed = pipeline, num_steps, guidance, seed

    @torch.no_grad()
    def swap(self, target: torch.Tensor, condition: torch.Tensor, source_tokens: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) target and condition in [0, 1], source tokens (32, D) -> (1, 3, H, W) swap in [0, 1]."""
        source = source_tokens.reshape(1, *source_tokens.shape[-2:])
        return self.pipeline(source, target, condition=condition, invert=True, inverse_cond="noID_trgCond",
                             inversion_order=1, parity_wrong_midpoint=False,  # the release's pseudo script: Euler
                             num_steps=self.num_steps, guidance_scale=self.guidance, seed=self.seed,
                             output_type="pt").cpu()


def label_training_output(path: Path, image: np.ndarray, parent: Path) -> Path:
    """A pseudo-triplet written with the AI-generated label and signed C2PA credentials, but no pixel watermark:
    the student learns from these pixels, and a keyed pattern in every target would teach it to paint the mark."""
    from appleswap.provenance.labels import write_labelled_output

    return write_labelled_output(path, image, model="appleswap-teacher (pseudo-triplet)", parent=parent,
                                 watermark_key=None)


def generate_pairs(generator: PseudoGenerator, pairs: list, *, root: Path, out_dir: Path, id_cache: Path,
                   condition_folder: str, resolution: int, scorer: Callable | None = None,
                   failures: list[str] | None = None) -> int:
    """Write every missing output of ``pairs`` (one rank's shard); returns how many were generated.

    A pair whose inputs are bad (unreadable image or condition, missing ID tokens) is logged, appended to
    ``failures`` and skipped; a fault of the machine (disk full, permission) stops the run, and a rerun resumes."""
    from tqdm import tqdm

    from appleswap.files import raise_if_environment, save_json
    from appleswap.train.data import IdTokenStore, image_path, load_rgb
    from appleswap.train.pairs import SCORE_DIR

    raw = IdTokenStore(id_cache, "raw")
    done = 0
    for pair in tqdm(pairs, desc="pseudo", unit="pair"):
        out = out_dir / pair.file_name
        if out.is_file():
            continue
        try:
            target = load_rgb(image_path(root, pair.target), resolution)[None]
            condition = load_rgb(root / pair.target.identity / condition_folder / f"{pair.target.name}.png",
                                 resolution)[None]
            tokens = raw.tokens(pair.source)
        except (ValueError, FileNotFoundError) as error:
            raise_if_environment(error, out)
            log.error("%s: %s", pair.file_name, error)
            if failures is not None:
                failures.append(f"{pair.file_name}: {error}")
            continue
        result = generator.swap(target, condition, tokens)
        image = (result[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        if scorer is not None:  # scores first: an existing PNG always has its scores
            save_json(out_dir / SCORE_DIR / f"{out.stem}.json", scorer(pair, image))
        label_training_output(out, image, parent=image_path(root, pair.target))
        done += 1
    return done


