"""The full encode path on real photos with tiny weights; averaging; null ID; identity files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appleswap.identity.store import load_identity, load_reference_npy, save_identity
from appleswap.weights import MissingWeightError
from tests.fixtures.tiny_identity import TINY_ID_DIM


def test_encode_real_photos_deterministic(encoder, photos):
    images = [photos["obama.jpg"], photos["biden2.jpg"]]
    tokens = encoder.encode(images)
    assert tokens.shape == (2, 32, TINY_ID_DIM) and tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all()
    assert not torch.allclose(tokens[0], tokens[1])  # different photos, different tokens
    torch.testing.assert_close(encoder.encode(images[::-1]), tokens.flip(0), atol=1e-5, rtol=1e-5)
    assert encoder.features(images[:1]).mask_sources[0] in ("mediapipe-mesh", "template-ellipse")
    layer = torch.nn.Linear(TINY_ID_DIM, 1)  # tokens feed trainable modules (not inference-mode tensors)
    layer(tokens).sum().backward()
    assert layer.weight.grad is not None and not tokens.requires_grad


def test_masked_differs_from_raw_and_masks_are_applied(encoder, photos):
    image = photos["obama.jpg"]
    raw = encoder.encode([image])
    masked = encoder.encode([image], masked=True)
    assert not torch.allclose(raw, masked)
    full = np.full(image.shape[:2], 255, np.uint8)
    torch.testing.assert_close(encoder.encode([image], masks=[full]), raw, atol=1e-5, rtol=1e-5)
    mask, source = encoder.face_mask(image)
    assert mask.shape == image.shape[:2] and 0 < mask.mean() < 1 and source


def test_no_face_names_the_image(encoder, photos, flat_image):
    with pytest.raises(ValueError, match=r"blank\.png: no face found"):
        encoder.encode([photos["obama.jpg"], flat_image], names=["a.jpg", "blank.png"])
    assert encoder.detect(flat_image) == []
    box, kps, score = encoder.detect(photos["obama.jpg"])[0]
    assert box.shape == (4,) and kps.shape == (5, 2) and 0.5 <= score <= 1


def test_identity_average_is_encoder_input_mean(encoder, photos):
    a, b = photos["obama.jpg"], photos["obama1.jpg"]
    single = encoder.encode([a])
    torch.testing.assert_close(encoder.encode_identity([a, a]), single, atol=1e-5, rtol=1e-5)
    both = encoder.encode_identity([a, b])
    feats = encoder.features([a, b])
    assert both.shape == (1, 32, TINY_ID_DIM)
    arc = feats.id_cond[:, :encoder.arcface_dim].mean(0, keepdim=True)
    cls = torch.nn.functional.normalize(feats.id_cond[:, encoder.arcface_dim:].mean(0, keepdim=True), dim=-1)
    manual = encoder.idformer(torch.cat([arc, cls], -1), [h.mean(0, keepdim=True) for h in feats.hidden])
    torch.testing.assert_close(both, manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, single) and not torch.allclose(both, encoder.encode([b]))


def test_null_tokens_constant(encoder):
    null = encoder.null_tokens()
    assert null.shape == (1, 32, TINY_ID_DIM)
    grid = encoder.eva.config.image_size // encoder.eva.config.patch_size
    zeros = [torch.zeros(1, grid * grid + 1, encoder.idformer.config.vit_dim)] * 5
    with torch.no_grad():
        torch.testing.assert_close(null, encoder.idformer(torch.zeros(1, encoder.idformer.config.id_dim), zeros))


def test_arcface_embedding(encoder, photos):
    emb = encoder.arcface_embedding([photos["obama.jpg"], photos["biden2.jpg"]])
    assert emb.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    raw = encoder.arcface_embedding([photos["obama.jpg"]], normalize=False)
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw[0]), emb[0], rtol=1e-4, atol=1e-6)


def test_save_load_identity_and_npy(tmp_path):
    tokens = torch.randn(1, 32, 8)
    path = save_identity(tmp_path / "me.safetensors", tokens, {"sources": ["a.jpg", "b.jpg"], "masked": "false"})
    loaded, meta = load_identity(path)
    torch.testing.assert_close(loaded, tokens)
    assert meta["sources"] == '["a.jpg", "b.jpg"]' and meta["format"].startswith("appleswap-identity")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_identity(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="must be"):
        save_identity(tmp_path / "bad.safetensors", torch.zeros(2, 32, 8), {})
    np.save(tmp_path / "x.npy", tokens.numpy())
    torch.testing.assert_close(load_reference_npy(tmp_path / "x.npy"), tokens)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        load_reference_npy(tmp_path / "obj.npy")


def test_missing_weights_message(tmp_path):
    from appleswap.identity.encoder import IdentityEncoder

    with pytest.raises(MissingWeightError, match="antelopev2"):
        IdentityEncoder.from_pretrained(tmp_path, device="cpu")


def test_bisenet_parser_path_is_used(tmp_path, tiny_weights, photos):
    """A BiSeNet checkpoint given as parser_path draws the grey face (recorded as 'bisenet')."""
    from safetensors.torch import save_file

    from appleswap.faces.parsing import BiSeNet
    from appleswap.identity.encoder import IdentityEncoder

    torch.manual_seed(0)
    parser_file = tmp_path / "parsing_bisenet.safetensors"
    save_file({k: v.contiguous() for k, v in BiSeNet().state_dict().items()}, str(parser_file))
    encoder = IdentityEncoder.from_pretrained(tiny_weights, device="cpu", parser_path=parser_file)
    feats = encoder.features([photos["obama.jpg"]])
    assert feats.mask_sources == ["bisenet"]
    assert encoder.metadata(masked=False, mask_source="bisenet")["model.parser"].startswith("parsing_bisenet")


def test_arcface_normalisation_probe(tiny_weights):
    from appleswap.identity.arcface import ArcFaceONNX

    model = ArcFaceONNX(tiny_weights / "antelopev2" / "glintr100.onnx")
    assert (model.mean, model.std) == (127.5, 127.5)  # no Sub/Mul prologue in the graph: normalise outside
