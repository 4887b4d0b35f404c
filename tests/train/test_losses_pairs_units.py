"""Loss formulas against numpy, the face box against its pixel indices, and the pseudo-pair helpers (names,
manifest files, shards, score files, threshold edges) against values written out by hand."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from appleswap.train import losses
from appleswap.train.data import Item
from appleswap.train.pairs import (
    Pair,
    draw_pairs,
    filter_pairs,
    load_or_create_manifest,
    merge_scores,
    read_manifest,
    read_scores,
    shard,
)


def test_timesteps_are_the_sigmoid_of_a_scaled_shifted_normal():
    t = losses.sample_timesteps(4000, mean=1.0, std=0.5, generator=torch.Generator().manual_seed(3))
    normal = torch.randn(4000, generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_allclose(t.numpy(), 1 / (1 + np.exp(-(normal * 0.5 + 1.0))), rtol=1e-6)
    logit = np.log(t.numpy() / (1 - t.numpy()))
    assert abs(logit.mean() - 1.0) < 0.05 and abs(logit.std() - 0.5) < 0.03
    torch.manual_seed(0)
    unseeded = losses.sample_timesteps(8)
    assert unseeded.shape == (8,) and unseeded.device.type == "cpu" and 0 < unseeded.min() < unseeded.max() < 1


def test_noisy_latents_and_x0_estimate_per_sample():
    rng = np.random.default_rng(0)
    x0, noise, velocity = (rng.normal(size=(3, 2, 4, 4)) for _ in range(3))
    t = np.array([0.1, 0.5, 0.9])
    x_t = losses.noisy_latents(torch.tensor(x0), torch.tensor(noise), torch.tensor(t))
    np.testing.assert_allclose(x_t.numpy(), (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise)
    x0_hat = losses.predicted_x0(torch.tensor(x0), torch.tensor(t), torch.tensor(velocity))
    np.testing.assert_allclose(x0_hat.numpy(), x0 - t[:, None, None, None] * velocity)
    half = losses.noisy_latents(torch.tensor(x0, dtype=torch.bfloat16), torch.tensor(noise, dtype=torch.bfloat16),
                                torch.tensor(t, dtype=torch.float32))
    assert half.dtype == torch.bfloat16  # t follows the latents' dtype


def test_flow_matching_loss_is_the_mean_squared_velocity_error_in_float32():
    rng = np.random.default_rng(1)
    velocity, noise, x0 = (rng.normal(size=(2, 3, 5)) for _ in range(3))
    loss = losses.flow_matching_loss(torch.tensor(velocity), torch.tensor(noise), torch.tensor(x0))
    assert loss.item() == pytest.approx(np.mean((velocity - (noise - x0)) ** 2), rel=1e-6)
    low = losses.flow_matching_loss(*(torch.tensor(a, dtype=torch.bfloat16) for a in (velocity, noise, x0)))
    assert low.dtype == torch.float32


def test_gated_mean_keeps_samples_at_the_gate_and_has_a_graph_when_empty():
    per = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    assert losses.gated_mean(per, torch.tensor([0.35, 0.2, 0.5]), 0.35).item() == pytest.approx(1.5)
    assert losses.gated_mean(per, torch.tensor([0.5, 0.1, 0.9]), 0.35).item() == 2.0  # one sample: its value
    empty = losses.gated_mean(per, torch.tensor([0.5, 0.6, 0.7]), 0.35)
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(per.grad, torch.zeros(3))


def test_face_box_is_psp_crop_of_the_aligned_frame():
    images = torch.rand(2, 3, 256, 256)
    torch.testing.assert_close(losses.crop_face(images, 188), images[..., 35:223, 32:220])
    large = torch.rand(1, 3, 512, 512)
    torch.testing.assert_close(losses.crop_face(large, 376), large[..., 70:446, 64:440])
    assert losses.crop_face(images, 112).shape == (2, 3, 112, 112)
    ramp = torch.arange(256.0).view(1, 1, 1, 256).expand(1, 3, 256, 256) / 255  # a ramp stays a ramp
    row = losses.crop_face(ramp, 94)[0, 0, 47]
    np.testing.assert_allclose(row[2:-2].numpy(), ((32.5 + 2 * np.arange(94)) / 255)[2:-2], atol=1e-4)


def test_pair_names_and_json_round_trip():
    pair = Pair(Item("idA", "y/0001"), Item("idB", "x/0002"))
    assert pair.file_name == "idA_y/0001_idB_x/0002.png"
    entry = pair.to_json()
    assert entry == {"source": "idA/y/0001", "target": "idB/x/0002", "file": pair.file_name}
    assert Pair.from_json(entry) == pair  # the name may hold a '/': only the first one splits
    assert Pair(Item("a", "1"), Item("b", "2")).file_name == "a_1_b_2.png"


def test_draw_pairs_edges(caplog):
    groups = {"a": [Item("a", "1"), Item("a", "2")], "b": [Item("b", "1")], "c": [Item("c", "9")], "empty": []}
    with caplog.at_level(logging.WARNING, logger="appleswap.train.pairs"):
        every = draw_pairs(groups, 50, seed=0)
    assert caplog.messages == ["num_pairs=50 > 6 distinct identity pairs; drawing all of them"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="appleswap.train.pairs"):
        assert len(draw_pairs(groups, 6, seed=0)) == 6
    assert not caplog.messages  # exactly all pairs: nothing to warn about
    assert sorted((p.source.identity, p.target.identity) for p in every) == [
        ("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b")]
    assert [p.file_name for p in every] == sorted(p.file_name for p in every)
    assert all(p.source in groups[p.source.identity] and p.target in groups[p.target.identity] for p in every)
    for count in (3, 4):  # 3 * 2 <= 6: rejection sampling; 4 * 2 > 6: a shuffled full list
        drawn = draw_pairs(groups, count, seed=1)
        assert len({(p.source.identity, p.target.identity) for p in drawn}) == count
    with pytest.raises(ValueError, match="at least 2 identities with usable photos, found 1"):
        draw_pairs({"a": [Item("a", "1")], "empty": []}, 1, seed=0)
    two = draw_pairs({"a": [Item("a", "1")], "b": [Item("b", "1")]}, 2, seed=0)  # 2 identities are enough
    assert [(p.source.identity, p.target.identity) for p in two] == [("a", "b"), ("b", "a")]
    many = {f"i{k}": [Item(f"i{k}", str(n)) for n in range(4)] for k in range(40)}
    photos = {p.source.name for p in draw_pairs(many, 200, seed=5)}
    assert photos == {"0", "1", "2", "3"}  # a random photo of each identity, not always the first


def test_manifest_file_and_reading_it(tmp_path):
    groups = {f"id{k}": [Item(f"id{k}", "0")] for k in range(4)}
    pairs = load_or_create_manifest(tmp_path, groups, 5, 9)
    saved = json.loads((tmp_path / "pairs.json").read_text())
    assert saved == {"seed": 9, "num_pairs_requested": 5, "pairs": [p.to_json() for p in pairs]}
    assert read_manifest(tmp_path) == pairs and read_manifest(str(tmp_path)) == pairs
    assert pairs == draw_pairs(groups, 5, seed=9)  # drawn with the manifest's seed
    with pytest.raises(FileNotFoundError, match="pairs.json not found"):
        read_manifest(tmp_path / "nothing")


def test_shard_is_strided_and_checks_the_rank():
    pairs = [Pair(Item("a", str(n)), Item("b", str(n))) for n in range(7)]
    assert shard(pairs, 1, 3) == [pairs[1], pairs[4]] and shard(pairs, 0, 1) == pairs
    for rank in (-1, 3):
        with pytest.raises(ValueError, match=f"rank {rank} is outside world_size 3"):
            shard(pairs, rank, 3)


def test_score_files_merge_and_read(tmp_path):
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "b.json").write_text(json.dumps({"aes": 2.0}))
    (tmp_path / "scores" / "a.json").write_text(json.dumps({"aes": 1.0}))
    merged = merge_scores(tmp_path)
    assert merged == {"a": {"aes": 1.0}, "b": {"aes": 2.0}} and list(merged) == ["a", "b"]
    assert json.loads((tmp_path / "scores.json").read_text()) == merged
    (tmp_path / "scores" / "a.json").write_text(json.dumps({"aes": 9.0}))  # not merged yet: the merged file wins
    (tmp_path / "scores" / "c.json").write_text(json.dumps({"aes": 3.0}))
    assert read_scores(str(tmp_path)) == {"a": {"aes": 1.0}, "b": {"aes": 2.0}, "c": {"aes": 3.0}}
    assert read_scores(tmp_path / "none") == {}
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "scores.json").write_text(json.dumps({"z": {"aes": 5.0}}))
    assert read_scores(tmp_path / "only") == {"z": {"aes": 5.0}}  # no per-triplet folder


def test_thresholds_keep_values_at_the_limit_and_drop_unscored(caplog):
    pairs = [Pair(Item("a", str(n)), Item("b", str(n))) for n in range(3)]
    stem = [p.file_name[:-4] for p in pairs]
    scores = {stem[0]: {"aes": 5.0, "pose_error": 3.0}, stem[1]: {"aes": 5.0}}
    assert filter_pairs(pairs, scores, {"min_aes": 5.0}) == pairs[:2]  # >= keeps the limit; pair 2 is unscored
    assert filter_pairs(pairs, scores, {"max_pose_error": 3.0}) == pairs[:1]  # <= keeps the limit
    assert filter_pairs(pairs, scores, {"max_pose_error": 2.9}) == []
    assert filter_pairs(pairs, scores, {"min_aes": None}) == pairs
    with caplog.at_level(logging.INFO, logger="appleswap.train.pairs"):
        filter_pairs(pairs, scores, {"min_aes": 5.0, "max_pose_error": 3.0})
    message = "pseudo filter {'aes': 5.0, 'pose_error': 3.0}: kept 1 of 3 (2 without the needed scores)"
    assert caplog.messages == [message]


def _seeded_draw(identities, count, seed, dense):
    """The docstring's recipe by hand: one random.Random(seed); a shuffled full list (dense) or rejection-sampled
    index pairs (sparse); then one photo per side in pair order (here: one photo each, so the order is all)."""
    import random

    rng, n = random.Random(seed), len(identities)
    if dense:
        chosen = [(i, j) for i in range(n) for j in range(n) if i != j]
        rng.shuffle(chosen)
        chosen = chosen[:count]
    else:
        chosen = []
        while len(chosen) < count:
            i, j = rng.randrange(n), rng.randrange(n)
            if i != j and (i, j) not in chosen:
                chosen.append((i, j))
    return sorted(f"{identities[i]}_0_{identities[j]}_0.png" for i, j in chosen)


@pytest.mark.parametrize(("count", "dense"), [(3, False), (4, True), (6, True)])  # 6 pairs in all: 2 x 3 = 6
def test_seeded_draw_uses_the_documented_path(count, dense):
    groups = {name: [Item(name, "0")] for name in ("p", "q", "r")}
    for seed in range(6):
        drawn = [p.file_name for p in draw_pairs(groups, count, seed)]
        assert drawn == _seeded_draw(["p", "q", "r"], count, seed, dense), seed
