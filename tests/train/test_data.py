"""Dataset indexing, pairing and dropout of the teacher and the student (docs/method.md)."""

from __future__ import annotations

import shutil

import pytest
import torch

from appleswap.files import save_image, save_json
from appleswap.train.config import CONDITION_FOLDER
from appleswap.train.data import Dropout, IdTokenStore, Item, TeacherDataset, index_targets, split_validation
from appleswap.train.pairs import Pair
from appleswap.train.student_data import StudentDataset, index_triplets


def test_index_keeps_scored_targets_with_condition(dataset, tmp_path):
    root, _ = dataset
    targets = index_targets(root, CONDITION_FOLDER, 5.1)
    assert Item("obama", "obama3") not in targets  # aes 4.0
    assert len(targets) == 5
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "biden" / CONDITION_FOLDER / "biden.png").unlink()
    assert Item("biden", "biden") not in index_targets(copy, CONDITION_FOLDER, 5.1)
    with pytest.raises(ValueError, match="no image has aes"):
        index_targets(root, CONDITION_FOLDER, 9.0)


def test_split_is_seeded_and_disjoint(dataset):
    targets = index_targets(dataset[0], CONDITION_FOLDER, 5.1)
    train, val = split_validation(targets, 2, seed=0)
    assert len(val) == 2 and not set(train) & set(val)
    assert (train, val) == split_validation(targets, 2, seed=0)


def test_teacher_sources_same_identity_and_redrawn(dataset):
    root, cache = dataset
    ids = IdTokenStore(cache)
    items = index_targets(root, CONDITION_FOLDER, 5.1)
    data = TeacherDataset(root, items, ids, condition_folder=CONDITION_FOLDER, resolution=64,
                          dropout=Dropout(0, 0, 0))
    index = items.index(Item("obama", "obama"))
    drawn = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        source = data.pick_source(index)
        assert source.identity == "obama"
        drawn.add(source.name)
    assert len(drawn) >= 3  # re-drawn every epoch, source photos are not aesthetic-filtered
    sample = data[index]
    assert sample["target"].shape == (3, 64, 64) and sample["id_tokens"].shape == (32, 64)
    val = TeacherDataset(root, items, ids, condition_folder=CONDITION_FOLDER, resolution=64, validation=True)
    assert val.pick_source(index).identity == "biden"
    assert val.pick_source(index) == val.pick_source(index)


def test_dropout_rates_and_replacements(dataset):
    root, cache = dataset
    ids = IdTokenStore(cache)
    items = index_targets(root, CONDITION_FOLDER, 5.1)
    data = TeacherDataset(root, items, ids, condition_folder=CONDITION_FOLDER, resolution=64,
                          dropout=Dropout(1.0, 1.0, 1.0))
    sample = data[0]
    assert bool(sample["drop_text"]) and sample["condition"].abs().sum() == 0
    assert torch.equal(sample["id_tokens"], ids.null())
    import random
    draws = [Dropout().draw(random.Random(i)) for i in range(4000)]
    for column in range(3):
        rate = sum(d[column] for d in draws) / len(draws)
        assert 0.08 < rate < 0.12


def _pseudo_folder(tmp_path, root):
    pairs = [Pair(Item("biden", "biden"), Item("obama", "obama")),
             Pair(Item("obama", "obama1"), Item("biden", "biden2"))]
    out = tmp_path / "pseudo"
    save_json(out / "pairs.json", {"seed": 0, "num_pairs_requested": 2, "pairs": [p.to_json() for p in pairs]})
    for n, pair in enumerate(pairs):
        save_image(out / pair.file_name, torch.full((64, 64, 3), 40 * (n + 1), dtype=torch.uint8).numpy())
    return out, pairs


def test_student_triplet_roles(dataset, tmp_path):
    root, cache = dataset
    out, pairs = _pseudo_folder(tmp_path, root)
    assert pairs[0].file_name == "biden_biden_obama_obama.png"
    found = index_triplets(out, {})
    data = StudentDataset(root, out, found, IdTokenStore(cache), resolution=64, dropout=Dropout(0, 0, 0))
    for index, pair in enumerate(data.pairs):
        sample = data[index]
        assert torch.allclose(sample["condition"], torch.full_like(sample["condition"], sample["condition"][0, 0, 0]))
        for epoch in range(6):
            data.set_epoch(epoch)
            photo = data.pick_identity_photo(index)
            assert photo.identity == pair.target.identity and photo != pair.target
    proxy = StudentDataset(root, out, found, IdTokenStore(cache), resolution=64, dropout=Dropout(0, 0, 0),
                           proxy_recon_prob=1.0)
    sample = proxy[0]
    assert bool(sample["proxy"]) and torch.equal(sample["condition"], sample["target"])
