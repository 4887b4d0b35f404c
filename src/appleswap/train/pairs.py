"""Pseudo-triplet pairs: distinct-identity (source, target) pairs drawn with a seed, their manifest, and
per-triplet score filtering (docs/method.md, with thresholds that actually apply, unlike the reference)."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appleswap.files import save_json
from appleswap.train.data import Item

log = logging.getLogger(__name__)
MANIFEST = "pairs.json"
SCORES = "scores.json"
SCORE_DIR = "scores"


@dataclass(frozen=True)
class Pair:
    """One pseudo-triplet to generate: the source's identity onto the target's attributes."""

    source: Item
    target: Item

    @property
    def file_name(self) -> str:
        """``{src}_{n}_{trg}_{n}.png`` as in the reference."""
        return f"{self.source.identity}_{self.source.name}_{self.target.identity}_{self.target.name}.png"

    def to_json(self) -> dict[str, str]:
        return {"source": self.source.key, "target": self.target.key, "file": self.file_name}

    @staticmethod
    def from_json(entry: dict[str, str]) -> Pair:
        src_id, src_name = entry["source"].split("/", 1)
        trg_id, trg_name = entry["target"].split("/", 1)
        return Pair(Item(src_id, src_name), Item(trg_id, trg_name))


def draw_pairs(groups: dict[str, list[Item]], num_pairs: int, seed: int) -> list[Pair]:
    """``num_pairs`` distinct ordered identity pairs (src != trg, each identity pair at most once), one random
    photo per side, all from one ``random.Random(seed)``; sorted by file name. Memory stays O(num_pairs)."""
    identities = sorted(k for k, v in groups.items() if v)
    n = len(identities)
    if n < 2:
        raise ValueError(f"pseudo pairs need at least 2 identities with usable photos, found {n}")
    total = n * (n - 1)
    if num_pairs > total:
        log.warning("num_pairs=%d > %d distinct identity pairs; drawing all of them", num_pairs, total)
        num_pairs = total
    rng = random.Random(seed)
    if num_pairs * 2 > total:  # dense: shuffle the full list
        chosen = [(i, j) for i in range(n) for j in range(n) if i != j]
        rng.shuffle(chosen)
        chosen = chosen[:num_pairs]
    else:  # sparse: rejection-sample without building n^2 tuples
        seen: set[tuple[int, int]] = set()
        chosen = []
        while len(chosen) < num_pairs:
            i, j = rng.randrange(n), rng.randrange(n)
            if i != j and (i, j) not in seen:
                seen.add((i, j))
                chosen.append((i, j))
    pairs = [Pair(rng.choice(groups[identities[i]]), rng.choice(groups[identities[j]])) for i, j in chosen]
    return sorted(pairs, key=lambda p: p.file_name)


def load_or_create_manifest(out_dir: Path, groups: dict[str, list[Item]], num_pairs: int, seed: int) -> list[Pair]:
    """The manifest ``pairs.json`` of ``out_dir``: created once, then reused so a restart regenerates nothing new.
    A manifest drawn with other settings raises instead of silently mixing two pair sets."""
    path = out_dir / MANIFEST
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("seed") != seed or data.get("num_pairs_requested") != num_pairs:
            raise ValueError(f"{path} was drawn with seed={data.get('seed')}, num_pairs="
                             f"{data.get('num_pairs_requested')}; use another output_dir or the same settings")
        return [Pair.from_json(e) for e in data["pairs"]]
    pairs = draw_pairs(groups, num_pairs, seed)
    save_json(path, {"seed": seed, "num_pairs_requested": num_pairs, "pairs": [p.to_json() for p in pairs]})
    return pairs


def read_manifest(out_dir: str | Path) -> list[Pair]:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"pseudo_root {out_dir}: {MANIFEST} not found (run `appleswap pseudo`)")
    return [Pair.from_json(e) for e in json.loads(path.read_text())["pairs"]]


def shard(pairs: list[Pair], rank: int, world_size: int) -> list[Pair]:
    """This rank's pairs: a strided split, stable across restarts."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return pairs[rank::world_size]


def merge_scores(out_dir: str | Path) -> dict[str, dict[str, float]]:
    """Collect ``scores/<stem>.json`` (one per triplet, written by any rank) into ``scores.json``."""
    out_dir = Path(out_dir)
    merged = {p.stem: json.loads(p.read_text()) for p in sorted((out_dir / SCORE_DIR).glob("*.json"))}
    save_json(out_dir / SCORES, merged)
    return merged


def read_scores(out_dir: str | Path) -> dict[str, dict[str, float]]:
    """Scores of a pseudo folder: ``scores.json`` plus any per-triplet file not merged yet."""
    out_dir = Path(out_dir)
    scores: dict[str, dict[str, float]] = {}
    if (out_dir / SCORES).is_file():
        scores.update(json.loads((out_dir / SCORES).read_text()))
    for path in sorted((out_dir / SCORE_DIR).glob("*.json")) if (out_dir / SCORE_DIR).is_dir() else []:
        scores.setdefault(path.stem, json.loads(path.read_text()))
    return scores


# (score key, threshold config name, keep when value >= threshold?)
FILTERS = (("aes", "min_aes", True), ("id_similarity", "min_id_similarity", True),
           ("pose_error", "max_pose_error", False), ("expression_error", "max_expression_error", False))


def filter_pairs(pairs: list[Pair], scores: dict[str, dict[str, Any]],
                 thresholds: dict[str, float | None]) -> list[Pair]:
    """Keep pairs whose scores pass every threshold that is set. A set threshold whose score is missing for a
    triplet drops that triplet (counted in the log), so an unscored set never passes a filter by accident."""
    active = [(key, thresholds[name], keep_high) for key, name, keep_high in FILTERS
              if thresholds.get(name) is not None]
    if not active:
        return list(pairs)
    kept, unscored = [], 0
    for pair in pairs:
        entry = scores.get(Path(pair.file_name).stem)
        if entry is None or any(key not in entry for key, _, _ in active):
            unscored += 1
            continue
        if all((entry[key] >= limit) if keep_high else (entry[key] <= limit) for key, limit, keep_high in active):
            kept.append(pair)
    log.info("pseudo filter %s: kept %d of %d (%d without the needed scores)",
             {k: v for k, v, _ in active}, len(kept), len(pairs), unscored)
    return kept
