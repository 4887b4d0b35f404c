"""Pair lists (shipped FFHQ list, stem matching, missing swaps), parser masks, video flicker from files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from appleswap.eval.masks import ID_CLASSES, FaceMasker
from appleswap.eval.pairs import load_pairs, read_pair_rows
from appleswap.files import load_image


def test_shipped_ffhq_list_is_the_protocol():
    rows = read_pair_rows("ffhq")
    assert len(rows) == 1000
    assert rows[0] == {"id": "000000", "source": "69000.png", "target": "68000.png"}
    assert rows[-1] == {"id": "000999", "source": "69999.png", "target": "68999.png"}


def test_pairs_resolve_by_stem_and_record_missing_swaps(tmp_path, faces_dir):
    for folder in ("src", "trg", "swap"):
        (tmp_path / folder).mkdir()
    shutil.copy(faces_dir / "obama.jpg", tmp_path / "src" / "69000.jpg")  # list says .png, file is .jpg
    shutil.copy(faces_dir / "biden2.jpg", tmp_path / "trg" / "68000.jpg")
    shutil.copy(faces_dir / "obama1.jpg", tmp_path / "src" / "69001.jpg")
    shutil.copy(faces_dir / "obama2.jpg", tmp_path / "trg" / "68001.jpg")
    shutil.copy(faces_dir / "obama1.jpg", tmp_path / "swap" / "000000.png")
    csv = tmp_path / "pairs.csv"
    csv.write_text("id,source,target\n000000,69000.png,68000.png\n000001,69001.png,68001.png\n")
    pairs = load_pairs(csv, tmp_path / "swap", tmp_path / "src", tmp_path / "trg")
    assert pairs[0].source.name == "69000.jpg" and pairs[0].swap.name == "000000.png"
    assert pairs[1].swap is None
    csv.write_text("id,source,target\n000000,69000.png,99999.png\n")
    with pytest.raises(FileNotFoundError, match="99999"):
        load_pairs(csv, tmp_path / "swap", tmp_path / "src", tmp_path / "trg")
    csv.write_text("id,source\n0,a\n")
    with pytest.raises(ValueError, match="target"):
        read_pair_rows(csv)


def test_parser_weights_drive_the_masks(tmp_path, faces_dir):
    from appleswap.faces.parsing import BiSeNet

    torch.manual_seed(0)
    torch.save(BiSeNet(19).state_dict(), tmp_path / "79999_iter.pth")
    masker = FaceMasker(tmp_path / "79999_iter.pth")
    image = load_image(faces_dir / "biden2.jpg")[::4, ::4].copy()
    classes = masker.classes(image, None)
    assert masker.source == "parser" and classes.shape == image.shape[:2] and classes.max() < 19
    assert FaceMasker(None).classes(image, None).max() == 0  # no mesh, no parser: empty map, not a crash
    assert set(ID_CLASSES) == {1, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13}


def test_video_flicker_reads_files(tmp_path, faces_dir):
    import imageio.v3 as iio

    from appleswap.eval.flicker import video_flicker

    frame = load_image(faces_dir / "biden2.jpg")[::4, ::4][:288, :288].copy()
    rng = np.random.default_rng(0)
    shaky = np.stack([np.clip(frame.astype(int) + rng.integers(-30, 30, frame.shape), 0, 255).astype(np.uint8)
                      for _ in range(4)])
    iio.imwrite(tmp_path / "target.mp4", np.stack([frame] * 4), fps=10, codec="libx264", quality=10)
    iio.imwrite(tmp_path / "swap.mp4", shaky, fps=10, codec="libx264", quality=10)
    steady = video_flicker(tmp_path / "target.mp4", tmp_path / "target.mp4")
    noisy = video_flicker(tmp_path / "swap.mp4", tmp_path / "target.mp4")
    assert steady.shape == (3,) and np.all(steady == 0) and np.all(noisy > 1.0)
