"""Pseudo-triplet scores on real photos: pose/expression agreement and ArcFace similarity to the source."""

from __future__ import annotations

import numpy as np
import torch

from appleswap.files import load_image, save_tensors
from appleswap.train.arcface import ArcFaceResNet
from appleswap.train.config import PseudoConfig
from appleswap.train.data import Item
from appleswap.train.pairs import Pair
from appleswap.train.scores import build_scorer, mesh_agreement


def test_mesh_agreement_zero_for_same_face(faces_dir):
    face = load_image(faces_dir / "obama.jpg")
    same = mesh_agreement(face, face)
    assert same["pose_error"] < 1e-3 and same["expression_error"] < 1e-6
    other = mesh_agreement(face, load_image(faces_dir / "biden2.jpg"))
    assert other["pose_error"] > same["pose_error"] and other["expression_error"] > 0.01


def test_scorer_writes_available_scores(dataset, tmp_path):
    root, _ = dataset
    torch.manual_seed(0)
    save_tensors(tmp_path / "arc.safetensors", ArcFaceResNet((1, 1, 1, 1)).state_dict())
    config = PseudoConfig(arcface=str(tmp_path / "arc.safetensors"))
    scorer = build_scorer(config, str(tmp_path / "no_weights"), root, torch.device("cpu"))
    pair = Pair(Item("biden", "biden2"), Item("obama", "obama"))
    source = (load_image(root / "biden" / "biden2.jpg")).astype(np.uint8)
    scores = scorer(pair, source)
    assert "aes" not in scores  # no aesthetic weights in that folder: left out, not invented
    assert scores["id_similarity"] > 0.999  # the swap equals the source photo
    assert scorer(pair, load_image(root / "obama" / "obama.jpg"))["id_similarity"] < scores["id_similarity"]
