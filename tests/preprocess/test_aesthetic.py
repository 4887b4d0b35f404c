"""LAION aesthetic scorer: head key layouts, hand-computed numerics, imscore preprocessing parity, local CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appleswap.files import load_image
from appleswap.preprocess.aesthetic import CLIP_MEAN, CLIP_STD, AestheticScorer, load_head
from tests.fixtures.tiny_segmenters import aesthetic_head_state, write_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip-vit-large-patch14")


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(aesthetic_head_state(), path)
    return path


@pytest.fixture(scope="module")
def scorer(clip_dir, head_path):
    return AestheticScorer.from_files(clip_dir, head_path, device="cpu")


@pytest.fixture(scope="module")
def photos(faces_dir):
    return [load_image(faces_dir / name) for name in ("obama.jpg", "biden2.jpg", "two_people.jpg")]


def _hand_mlp(state: dict, embeds: np.ndarray) -> np.ndarray:
    x = embeds.astype(np.float64)
    for index in (0, 2, 4, 6, 7):  # Linear layers only; no activations, dropout is off at inference
        x = x @ state[f"layers.{index}.weight"].double().numpy().T + state[f"layers.{index}.bias"].double().numpy()
    return x[:, 0]


def test_scores_equal_hand_computation(scorer, photos):
    scores = scorer.score(photos)
    assert len(scores) == 3 and all(isinstance(s, float) and np.isfinite(s) for s in scores)
    with torch.inference_mode():
        raw = scorer.clip(pixel_values=scorer.pixels(photos)).image_embeds.double().numpy()
    normalised = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, _hand_mlp(aesthetic_head_state(), normalised), rtol=1e-4, atol=1e-4)
    assert len(set(np.round(scores, 5))) == 3  # different photos, different scores
    assert scorer.score(photos, batch_size=2) == pytest.approx(scores, abs=1e-5)
    assert scorer.score([]) == []


def test_embeddings_are_unit_length(scorer, photos):
    norms = torch.linalg.vector_norm(scorer.embed(photos[:2]), dim=-1)
    torch.testing.assert_close(norms, torch.ones(2))


def test_imscore_preprocessing_matches_torchvision(scorer, photos):
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

    for image in photos:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        x = Normalize(CLIP_MEAN, CLIP_STD)(CenterCrop(224)(Resize(224, interpolation=InterpolationMode.BICUBIC)(x)))
        torch.testing.assert_close(scorer.pixels([image]), x, rtol=1e-5, atol=1e-5)


def test_processor_mode_uses_the_folder_image_processor(clip_dir, head_path, scorer, photos):
    alt = AestheticScorer.from_files(clip_dir, head_path, device="cpu", preprocess="processor")
    assert alt.pixels(photos[:1]).shape == (1, 3, 224, 224)
    a, b = alt.score(photos[:2]), scorer.score(photos[:2])
    assert a == pytest.approx(b, abs=0.05) and a != b  # same model, slightly different resampling


def test_imscore_safetensors_layout_loads_the_same_head(tmp_path, head_path):
    from safetensors.torch import save_file

    state = {f"mlp.{k}": v for k, v in aesthetic_head_state().items()}
    state["clip.visual_projection.weight"] = torch.zeros(768, 32)  # imscore stores CLIP next to the MLP
    save_file(state, str(tmp_path / "model.safetensors"))
    a, b = load_head(tmp_path / "model.safetensors"), load_head(head_path)
    e = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    torch.testing.assert_close(a(e), b(e))


def test_bad_files_and_inputs_are_refused(tmp_path, clip_dir, head_path, scorer):
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        load_head(tmp_path / "other.pth")
    torch.save(aesthetic_head_state(embed_dim=512), tmp_path / "b16.pth")
    with pytest.raises(ValueError, match="512-d"):
        AestheticScorer.from_files(clip_dir, tmp_path / "b16.pth", device="cpu")
    with pytest.raises(FileNotFoundError, match="clip_dir"):
        AestheticScorer.from_files(tmp_path / "empty", head_path, device="cpu")
    with pytest.raises(ValueError, match=r"images\[0\]"):
        scorer.score([np.zeros((32, 32, 4), np.uint8)])
