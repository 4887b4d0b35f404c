"""Tiny training datasets in the reference layout, built from the real test photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from appleswap.files import load_image, save_image
from appleswap.preprocess.condition import build_condition
from appleswap.train.config import CONDITION_FOLDER

SIZE = 64
ID_DIM = 64  # tests/fixtures/tiny_flux.TINY_ID_DIM
PHOTOS = {"obama": ["obama", "obama1", "obama2", "obama3"], "biden": ["biden", "biden2"]}
AES = {"obama/obama3": 4.0}  # below the 5.1 threshold: never a target


def face_classes(size: int) -> np.ndarray:
    """A central ellipse labelled skin (class 1): the face region the condition blurs."""
    yy, xx = np.mgrid[:size, :size]
    inside = ((xx - size / 2) / (size * 0.3)) ** 2 + ((yy - size * 0.45) / (size * 0.38)) ** 2 <= 1
    return inside.astype(np.uint8)


def _crop(photo: np.ndarray) -> np.ndarray:
    side = min(photo.shape[:2])
    top, left = (photo.shape[0] - side) // 4, (photo.shape[1] - side) // 2
    square = photo[top:top + side, left:left + side]
    return np.asarray(Image.fromarray(square).resize((SIZE, SIZE), Image.BICUBIC))


def write_dataset(root: Path, cache: Path, faces_dir: Path) -> None:
    from appleswap.identity.store import save_identity

    scores, classes = {}, face_classes(SIZE)
    for identity, names in PHOTOS.items():
        base = torch.randn(1, 32, ID_DIM, generator=torch.Generator().manual_seed(len(identity)))
        for n, name in enumerate(names):
            image = _crop(load_image(faces_dir / f"{name}.jpg"))
            save_image(root / identity / f"{name}.jpg", image)
            save_image(root / identity / CONDITION_FOLDER / f"{name}.png", build_condition(image, classes, None, None))
            scores[f"{identity}/{name}"] = {"aes": AES.get(f"{identity}/{name}", 6.0)}
            for kind in ("masked", "raw"):
                save_identity(cache / kind / identity / f"{name}.safetensors", base + 0.1 * n)
    save_identity(cache / "null.safetensors", torch.zeros(1, 32, ID_DIM))
    (root / "score.json").write_text(json.dumps(scores))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, faces_dir) -> tuple[Path, Path]:
    """(dataset root, prepare-ids cache) with 2 identities, 6 photos, one below the aesthetic threshold."""
    base = tmp_path_factory.mktemp("train_data")
    write_dataset(base / "data", base / "ids", faces_dir)
    return base / "data", base / "ids"
