"""Student triplets (docs/method.md): for a pseudo image ``{B}_{b}_{A}_{a}.png`` (B's identity on A/a's
attributes), condition = the pseudo image, ID = another photo of A, ground truth = the real A/a.
With probability ``proxy_recon_prob`` the condition is the real target itself (proxy reconstruction)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from appleswap.train.data import (
    Dropout,
    IdTokenStore,
    Item,
    _EpochDataset,
    apply_dropout,
    image_path,
    list_identities,
    load_rgb,
)
from appleswap.train.pairs import Pair, filter_pairs, read_manifest, read_scores

log = logging.getLogger(__name__)


def index_triplets(pseudo_root: str | Path, thresholds: dict[str, float | None], train_size: int | None = None,
                   seed: int = 0) -> list[Pair]:
    """Generated triplets of the manifest, score-filtered, then (optionally) a seeded random subset."""
    pseudo_root = Path(pseudo_root)
    pairs = [p for p in read_manifest(pseudo_root) if (pseudo_root / p.file_name).is_file()]
    if not pairs:
        raise ValueError(f"pseudo_root {pseudo_root}: no generated triplet found (run `appleswap pseudo`)")
    pairs = filter_pairs(pairs, read_scores(pseudo_root), thresholds)
    if train_size is not None and train_size < len(pairs):
        pairs = sorted(random.Random(seed).sample(pairs, train_size), key=lambda p: p.file_name)
    if not pairs:
        raise ValueError(f"pseudo_root {pseudo_root}: every triplet was filtered out ({thresholds})")
    return pairs


class StudentDataset(_EpochDataset):
    """Pseudo triplets for the student; the ID photo is redrawn every epoch among A's other photos."""

    def __init__(self, root: str | Path, pseudo_root: str | Path, pairs: list[Pair], ids: IdTokenStore, *,
                 resolution: int = 512, dropout: Dropout | None = None, proxy_recon_prob: float = 0.0,
                 seed: int = 0, validation: bool = False) -> None:
        self.root, self.pseudo_root, self.ids = Path(root), Path(pseudo_root), ids
        self.resolution, self.seed, self.validation = resolution, seed, validation
        self.dropout = None if validation else (dropout or Dropout())
        self.proxy_recon_prob = 0.0 if validation else proxy_recon_prob
        groups = list_identities(root)
        self.others: dict[Item, list[Item]] = {}
        kept = []
        for pair in pairs:
            target = pair.target
            others = [i for i in groups.get(target.identity, []) if i != target and ids.has(i)]
            if others:
                self.others[target] = others
                kept.append(pair)
        if len(kept) < len(pairs):
            log.warning("%d triplets skipped: their target identity has no other photo with ID tokens",
                        len(pairs) - len(kept))
        if not kept:
            raise ValueError("no usable triplet: every target identity needs a second photo with ID tokens")
        self.pairs = kept

    def __len__(self) -> int:
        return len(self.pairs)

    def pick_identity_photo(self, index: int) -> Item:
        """Another photo of the target identity (never the target photo itself)."""
        key = "val" if self.validation else str(self.epoch)
        return random.Random(f"{self.seed}:{key}:{index}").choice(self.others[self.pairs[index].target])

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}:drop")
        id_photo = self.pick_identity_photo(index)
        target = load_rgb(image_path(self.root, pair.target), self.resolution)
        proxy = rng.random() < self.proxy_recon_prob
        condition = target.clone() if proxy else load_rgb(self.pseudo_root / pair.file_name, self.resolution)
        sample = {
            "target": target,
            "condition": condition,
            "source": load_rgb(image_path(self.root, id_photo), self.resolution),
            "id_tokens": self.ids.tokens(id_photo),
            "drop_text": torch.tensor(False),
            "proxy": torch.tensor(proxy),
            "index": torch.tensor(index),
        }
        if self.dropout is not None:
            apply_dropout(sample, self.dropout.draw(rng), self.ids.null())
        return sample
