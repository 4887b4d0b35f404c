"""Tiny training datasets made by the real preprocessing (`run_preprocess`) from the real test photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

ID_DIM = 64  # tests/fixtures/tiny_flux.TINY_ID_DIM
PHOTOS = {"obama": ["obama", "obama1", "obama2", "obama3"], "biden": ["biden", "biden2"]}
AES = {"obama/obama3": 4.0}  # below the 5.1 threshold: never a target


def write_dataset(root: Path, cache: Path, faces_dir: Path) -> None:
    """`appleswap preprocess` on an identity tree of the photos (detection, alignment, mesh landmarks and masks,
    condition images; no optional networks), then score.json (the aesthetic model needs CLIP weights, so the
    scores are written here) and ID tokens in the prepare-ids cache format (tiny width, per-identity base)."""
    from appleswap.identity.store import save_identity
    from appleswap.preprocess.runner import run_preprocess

    photos = root.parent / f"{root.name}_photos"
    for identity, names in PHOTOS.items():
        (photos / identity).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(faces_dir / f"{name}.jpg", photos / identity / f"{name}.jpg")
    summary = run_preprocess(photos, root, progress=False)
    assert summary["status"] == {"ok": 6}, summary
    scores = {}
    for identity, names in PHOTOS.items():
        base = torch.randn(1, 32, ID_DIM, generator=torch.Generator().manual_seed(len(identity)))
        for n, name in enumerate(names):
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
