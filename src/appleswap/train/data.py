"""Training data: the preprocessed dataset index, the teacher and student datasets, and classifier-free dropout.

Layout read (written by ``appleswap preprocess``): ``<root>/<id>/<name>.jpg``, the condition
``<root>/<id>/<condition_folder>/<name>.png`` and ``<root>/score.json`` = ``{"<id>/<name>": {"aes": float}}``.
ID tokens come from the ``prepare-ids`` cache: ``<cache>/<masked|raw>/<id>/<name>.safetensors`` and
``<cache>/null.safetensors``. Randomness per sample is keyed by (seed, epoch, index), so a run is reproducible
and resumable whatever the number of workers or processes. Data errors raise: nothing is silently resampled.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from appleswap.files import load_image

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True, order=True)
class Item:
    """One photo of the dataset: ``<root>/<identity>/<name>.<suffix>``."""

    identity: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.identity}/{self.name}"


def read_scores(root: str | Path) -> dict[str, dict[str, float]]:
    """``score.json`` at the dataset root, or FileNotFoundError naming it and the command that writes it."""
    path = Path(root) / "score.json"
    if not path.is_file():
        raise FileNotFoundError(missing_scores_message(root))
    return json.loads(path.read_text())


def missing_scores_message(root: str | Path) -> str:
    return (f"dataset_root {root}: score.json not found; it holds the aesthetic scores that --aes-threshold filters "
            f"on and is written by `appleswap preprocess PHOTOS {root} --aesthetic` (or set `--aes-threshold none` "
            f"to use every face)")


def image_path(root: str | Path, item: Item) -> Path:
    """The photo of ``item`` (jpg preferred, png/jpeg accepted)."""
    folder = Path(root) / item.identity
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{item.name}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"dataset image {folder}/{item.name}.jpg not found")


def list_identities(root: str | Path) -> dict[str, list[Item]]:
    """Every photo of every identity folder, sorted (sources are not aesthetic-filtered, as in the reference)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_root {root} is not a folder")
    groups: dict[str, list[Item]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        names = sorted({p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES})
        if names:
            groups[folder.name] = [Item(folder.name, n) for n in names]
    return groups


def index_targets(root: str | Path, condition_folder: str, aes_threshold: float | None) -> list[Item]:
    """Targets: aesthetic score above the threshold (None: no filter, no score.json needed) AND a condition image
    present (sorted)."""
    scores = read_scores(root) if aes_threshold is not None else {}
    kept, no_condition = [], 0
    for items in list_identities(root).values():
        for item in items:
            entry = scores.get(item.key)
            if aes_threshold is not None and (entry is None or float(entry.get("aes", float("-inf"))) <= aes_threshold):
                continue
            if not (Path(root) / item.identity / condition_folder / f"{item.name}.png").is_file():
                no_condition += 1
                continue
            kept.append(item)
    if no_condition:
        log.warning("%d images pass the aesthetic filter but have no condition image; skipped", no_condition)
    if not kept:
        passing = "" if aes_threshold is None else f"aes > {aes_threshold} and "
        raise ValueError(f"dataset_root {root}: no image has {passing}a {condition_folder} file")
    return sorted(kept)


def split_validation(items: list[Item], num_validation: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Shuffle with ``seed`` and hold out the last ``num_validation`` items."""
    shuffled = sorted(items)
    random.Random(seed).shuffle(shuffled)
    if num_validation >= len(shuffled):
        raise ValueError(f"num_validation={num_validation} leaves no training image (only {len(shuffled)} targets)")
    cut = len(shuffled) - num_validation
    return shuffled[:cut], shuffled[cut:]


class IdTokenStore:
    """Reads the ``prepare-ids`` cache: per-photo ID tokens (32, 2048) and the null-ID tokens."""

    def __init__(self, cache: str | Path, id_from: str = "masked") -> None:
        self.root = Path(cache)
        self.folder = self.root / id_from
        if not self.folder.is_dir():
            raise FileNotFoundError(f"id_cache {cache}: folder {id_from}/ not found (run `appleswap prepare-ids`)")
        self._null: torch.Tensor | None = None

    def path(self, item: Item) -> Path:
        return self.folder / item.identity / f"{item.name}.safetensors"

    def has(self, item: Item) -> bool:
        return self.path(item).is_file()

    def tokens(self, item: Item) -> torch.Tensor:
        return read_id_tokens(self.path(item))

    def null(self) -> torch.Tensor:
        if self._null is None:
            self._null = read_id_tokens(self.root / "null.safetensors")
        return self._null


def read_id_tokens(path: Path) -> torch.Tensor:
    """One (32, D) token tensor from an identity file (``appleswap.identity.store`` format)."""
    from appleswap.identity.store import load_identity

    if not path.is_file():
        raise FileNotFoundError(f"ID tokens {path} not found (run `appleswap prepare-ids`)")
    return load_identity(path)[0][0].float()


def load_rgb(path: str | Path, size: int) -> torch.Tensor:
    """A photo as a (3, size, size) float tensor in [0, 1] (bicubic resize when needed, as the reference)."""
    array = load_image(path)
    if array.shape[:2] != (size, size):
        array = np.asarray(Image.fromarray(array).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The per-sample RNG: the same (seed, epoch, index) always gives the same draws."""
    return random.Random(f"{seed}:{epoch}:{index}")


@dataclass(frozen=True)
class Dropout:
    """Classifier-free dropout probabilities (independent draws)."""

    text: float = 0.1
    condition: float = 0.1
    identity: float = 0.1

    def draw(self, rng: random.Random) -> tuple[bool, bool, bool]:
        return rng.random() < self.text, rng.random() < self.condition, rng.random() < self.identity


def apply_dropout(sample: dict[str, Any], drops: tuple[bool, bool, bool], null_tokens: torch.Tensor) -> None:
    """Replace text / condition / ID in place: empty prompt flag, black condition, null-ID tokens."""
    drop_text, drop_condition, drop_id = drops
    sample["drop_text"] = torch.tensor(drop_text)
    if drop_condition:
        sample["condition"] = torch.zeros_like(sample["condition"])
    if drop_id:
        sample["id_tokens"] = null_tokens.clone()


class _EpochDataset(torch.utils.data.Dataset):
    """Shared epoch bookkeeping (the sampler calls set_epoch; the workers see it through the sampler's index)."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class TeacherDataset(_EpochDataset):
    """Teacher samples: target = a photo, condition = its condition PNG, source = a photo of the same identity
    redrawn every time (held-out validation: a source of another identity, fixed per index, no dropout)."""

    def __init__(self, root: str | Path, items: list[Item], ids: IdTokenStore, *, condition_folder: str,
                 resolution: int = 512, dropout: Dropout | None = None, seed: int = 0,
                 validation: bool = False) -> None:
        self.root, self.items, self.ids = Path(root), list(items), ids
        self.condition_folder, self.resolution, self.seed = condition_folder, resolution, seed
        self.dropout = None if validation else (dropout or Dropout())
        self.validation = validation
        groups = list_identities(root)
        self.sources = {k: [i for i in v if ids.has(i)] for k, v in groups.items()}
        self.sources = {k: v for k, v in self.sources.items() if v}
        missing = sorted({i.identity for i in self.items} - set(self.sources))
        if missing:
            raise ValueError(f"id_cache {ids.root}: no ID tokens for identities {missing[:5]} (run prepare-ids)")
        if validation and len(self.sources) < 2:
            raise ValueError("validation needs sources of another identity: the dataset has only one identity")

    def __len__(self) -> int:
        return len(self.items)

    def pick_source(self, index: int) -> Item:
        target = self.items[index]
        if self.validation:
            rng = random.Random(f"{self.seed}:val:{index}")
            others = sorted(k for k in self.sources if k != target.identity)
            return rng.choice(self.sources[rng.choice(others)])
        return sample_rng(self.seed, self.epoch, index).choice(self.sources[target.identity])

    def __getitem__(self, index: int) -> dict[str, Any]:
        target = self.items[index]
        source = self.pick_source(index)
        sample = {
            "target": load_rgb(image_path(self.root, target), self.resolution),
            "condition": load_rgb(self.root / target.identity / self.condition_folder / f"{target.name}.png",
                                  self.resolution),
            "source": load_rgb(image_path(self.root, source), self.resolution),
            "id_tokens": self.ids.tokens(source),
            "drop_text": torch.tensor(False),
            "index": torch.tensor(index),
        }
        if self.dropout is not None:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}:drop")
            apply_dropout(sample, self.dropout.draw(rng), self.ids.null())
        return sample
