"""Pseudo-triplet generation: pseudo-triplets from the teacher with attribute-aware inversion (spec §7, §8).

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
    """Teacher + attribute-aware inversion for one pair at a time (batch 1, deterministic)."""

    def __init__(self, transformer: Any, vae: Any, text: Any, null_tokens: torch.Tensor, *, num_steps: int = 28,
                 guidance: float = 1.0) -> None:
        self.transformer, self.vae, self.text = transformer, vae, text
        self.null = null_tokens
        self.num_steps, self.guidance = num_steps, guidance

    def _velocity(self, condition: torch.Tensor, id_tokens: torch.Tensor, ids: torch.Tensor) -> Callable:
        model = self.transformer
        dtype, device = model.dtype, model.device
        g = torch.full((1,), self.guidance, device=device, dtype=dtype)

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return model(x.to(dtype), sigma.to(dtype), text=self.text, img_ids=ids, condition=condition,
                         id_tokens=id_tokens, guidance=g).float()
        return velocity

    @torch.no_grad()
    def swap(self, target: torch.Tensor, condition: torch.Tensor, source_tokens: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) target and condition in [0, 1], source tokens (1, 32, D) -> (1, 3, H, W) swap in [0, 1]."""
        from appleswap.model.latents import decode_tokens, encode_images, image_ids, vae_scale_factor
        from appleswap.sampling.samplers import invert, sample_euler
        from appleswap.sampling.schedule import get_schedule

        model = self.transformer
        device, dtype = model.device, model.dtype
        height, width = target.shape[-2:]
        ids = image_ids(height, width, device=device, vae_scale=vae_scale_factor(self.vae))
        x0 = encode_images(self.vae, target).float().to(device)
        cond = encode_images(self.vae, condition).to(device, dtype)
        sigmas = get_schedule(self.num_steps, x0.shape[1])
        null = self.null.to(device, dtype).reshape(1, *self.null.shape[-2:])
        noise = invert(self._velocity(cond, null, ids), x0, sigmas, disable=True)
        source = source_tokens.to(device, dtype).reshape(1, *source_tokens.shape[-2:])
        latents = sample_euler(self._velocity(cond, source, ids), noise, sigmas, disable=True)
        return decode_tokens(self.vae, latents, height, width).cpu()


def generate_pairs(generator: PseudoGenerator, pairs: list, *, root: Path, out_dir: Path, id_cache: Path,
                   condition_folder: str, resolution: int, scorer: Callable | None = None) -> int:
    """Write every missing output of ``pairs`` (one rank's shard); returns how many were generated."""
    from tqdm import tqdm

    from appleswap.files import save_image, save_json
    from appleswap.train.data import IdTokenStore, image_path, load_rgb
    from appleswap.train.pairs import SCORE_DIR

    raw = IdTokenStore(id_cache, "raw")
    done = 0
    for pair in tqdm(pairs, desc="pseudo"):
        out = out_dir / pair.file_name
        if out.is_file():
            continue
        target = load_rgb(image_path(root, pair.target), resolution)[None]
        condition = load_rgb(root / pair.target.identity / condition_folder / f"{pair.target.name}.png",
                             resolution)[None]
        result = generator.swap(target, condition, raw.tokens(pair.source))
        image = (result[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        if scorer is not None:  # scores first: an existing PNG always has its scores
            save_json(out_dir / SCORE_DIR / f"{out.stem}.json", scorer(pair, image))
        save_image(out, image)
        done += 1
    return done


