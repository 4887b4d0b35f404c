"""Pseudo pairs: distinct identities, seeded, manifest reuse, sharding, and score thresholds that apply."""

from __future__ import annotations

import pytest

from appleswap.train.data import Item
from appleswap.train.pairs import Pair, draw_pairs, filter_pairs, load_or_create_manifest, shard

GROUPS = {f"id{k}": [Item(f"id{k}", f"{n:04d}") for n in range(3)] for k in range(6)}


@pytest.mark.parametrize("count", [5, 30])  # sparse and dense (all 30 ordered pairs) paths
def test_draw_pairs_distinct_and_seeded(count):
    pairs = draw_pairs(GROUPS, count, seed=42)
    assert len(pairs) == count
    assert all(p.source.identity != p.target.identity for p in pairs)
    assert len({(p.source.identity, p.target.identity) for p in pairs}) == count
    assert pairs == draw_pairs(GROUPS, count, seed=42)
    assert pairs != draw_pairs(GROUPS, count, seed=7) or count == 30


def test_manifest_is_reused_and_guarded(tmp_path):
    first = load_or_create_manifest(tmp_path, GROUPS, 10, 42)
    assert load_or_create_manifest(tmp_path, {}, 10, 42) == first  # read back, not redrawn
    with pytest.raises(ValueError, match="seed=42"):
        load_or_create_manifest(tmp_path, GROUPS, 10, 1)


def test_shards_cover_every_pair_once():
    pairs = draw_pairs(GROUPS, 17, seed=0)
    shards = [shard(pairs, r, 3) for r in range(3)]
    assert sorted(p.file_name for s in shards for p in s) == sorted(p.file_name for p in pairs)


def test_each_threshold_filters_on_its_own_score():
    pairs = [Pair(Item("a", str(n)), Item("b", str(n))) for n in range(4)]
    scores = {pairs[0].file_name[:-4]: {"aes": 6.0, "id_similarity": 0.7, "pose_error": 2.0, "expression_error": 0.5},
              pairs[1].file_name[:-4]: {"aes": 4.0, "id_similarity": 0.7, "pose_error": 2.0, "expression_error": 0.5},
              pairs[2].file_name[:-4]: {"aes": 6.0, "id_similarity": 0.2, "pose_error": 9.0, "expression_error": 0.5},
              pairs[3].file_name[:-4]: {"aes": 6.0}}
    none = dict.fromkeys(("min_aes", "min_id_similarity", "max_pose_error", "max_expression_error"))
    assert filter_pairs(pairs, scores, none) == pairs
    assert filter_pairs(pairs, scores, none | {"min_aes": 5.0}) == [pairs[0], pairs[2], pairs[3]]
    assert filter_pairs(pairs, scores, none | {"min_id_similarity": 0.5}) == [pairs[0], pairs[1]]
    assert filter_pairs(pairs, scores, none | {"max_pose_error": 5.0}) == [pairs[0], pairs[1]]
    assert filter_pairs(pairs, scores, none | {"min_aes": 5.0, "max_expression_error": 1.0}) == [pairs[0], pairs[2]]


def test_manifest_with_another_pair_count_is_refused(tmp_path):
    """A restart asking for another number of pairs must not silently reuse (or mix in) the old pair set."""
    import json

    first = load_or_create_manifest(tmp_path, GROUPS, 10, 42)
    saved = json.loads((tmp_path / "pairs.json").read_text())
    assert saved["seed"] == 42 and saved["num_pairs_requested"] == 10 and len(saved["pairs"]) == 10
    for other in (5, 11):
        with pytest.raises(ValueError, match="num_pairs=10"):
            load_or_create_manifest(tmp_path, GROUPS, other, 42)
    assert json.loads((tmp_path / "pairs.json").read_text()) == saved  # the refused restart changed nothing
    assert load_or_create_manifest(tmp_path, GROUPS, 10, 42) == first
