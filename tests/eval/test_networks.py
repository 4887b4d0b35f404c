"""The network files load with their real key names; models compute what the protocol needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appleswap.eval import fid, glint
from appleswap.face_metrics import arcface, expression, pose
from appleswap.files import load_image
from appleswap.identity.align import ARCFACE_TEMPLATE_112, arcface_crop
from tests.eval import tiny_weights


def test_irse50_has_the_psp_checkpoint_layout():
    state = arcface.IRSE50().state_dict()
    for key, shape in {"input_layer.0.weight": (64, 3, 3, 3), "body.0.shortcut_layer": None,
                       "body.2.res_layer.5.fc1.weight": (4, 64, 1, 1),
                       "body.3.shortcut_layer.0.weight": (128, 64, 1, 1),
                       "body.23.res_layer.3.weight": (512, 512, 3, 3), "output_layer.3.weight": (512, 25088),
                       "output_layer.4.running_var": (512,)}.items():
        if shape is None:
            assert not any(k.startswith(key) for k in state)  # MaxPool shortcut: no parameters
        else:
            assert tuple(state[key].shape) == shape
    assert "body.24.res_layer.0.weight" not in state
    assert arcface._architecture_from_state(state) == (arcface.REAL_UNITS, arcface.REAL_CHANNELS)


def test_load_irse50_and_identity_embedding_is_a_differentiable_unit_vector(tmp_path):
    model = arcface.load_irse50(tiny_weights.tiny_irse50(tmp_path / "model_ir_se50.pth"))
    images = torch.rand(2, 3, 512, 512, requires_grad=True)
    embedding = arcface.identity_embedding(images, model)
    assert embedding.shape == (2, 512)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(2), atol=1e-5)
    (1 - (embedding[0] * embedding[1]).sum()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="IR-SE50"):
        arcface.load_irse50(tmp_path / "absent.pth")


def test_reface_input_zeroes_outside_the_mask(faces_dir):
    image = load_image(faces_dir / "biden2.jpg")
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[:, : image.shape[1] // 2] = True
    tensor = arcface.reface_input(image, mask)
    assert tensor.shape == (3, 112, 112) and tensor.min() >= -1 - 1e-5 and tensor.max() <= 1 + 1e-5
    assert tensor[:, :, 60:].abs().max() == 0 and tensor[:, :, :50].abs().max() > 0


def test_hopenet_layout_and_angle_decoding(tmp_path, faces_dir):
    state = pose.HopeNet().state_dict()
    assert tuple(state["fc_yaw.weight"].shape) == (66, 2048) and tuple(state["fc_finetune.weight"].shape) == (3, 2051)
    assert "layer3.5.conv3.weight" in state and "fc.weight" not in state
    logits = torch.full((1, 66), -1e4)
    logits[0, 33] = 0.0  # all mass on bin 33 -> 33 * 3 - 99 = 0 degrees
    assert pose.bins_to_degrees(logits).item() == pytest.approx(0.0, abs=1e-4)
    logits[0, 33], logits[0, 43] = -1e4, 0.0
    assert pose.bins_to_degrees(logits).item() == pytest.approx(30.0, abs=1e-4)
    model = pose.load_hopenet(tiny_weights.tiny_hopenet(tmp_path / "hopenet_robust_alpha1.pkl"))
    angles = pose.hopenet_angles(model, [load_image(faces_dir / "obama1.jpg")] * 2)
    assert angles.shape == (2, 3) and np.all(np.abs(angles) <= 99)
    np.testing.assert_allclose(angles[0], angles[1], atol=1e-4)


def test_deep3d_layout_split_and_alignment(tmp_path, faces_dir):
    state = expression.ReconNet().state_dict()
    assert tuple(state["final_layers.1.weight"].shape) == (64, 2048, 1, 1)
    assert tuple(state["backbone.layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert sum(size for _, size in expression.COEFF_SPLIT) == 257
    model = expression.load_reconnet(tiny_weights.tiny_deep3d(tmp_path / "epoch_20.pth"))
    image = load_image(faces_dir / "obama1.jpg")
    coefficients = expression.expression_coefficients(model, expression.reconnet_input([image, image[:, ::-1]]))
    assert coefficients.shape == (2, 64) and np.abs(coefficients[0] - coefficients[1]).max() > 0
    # the POS fit recovers a planted scale and translation
    scale, shift = 180.0, np.array([250.0, 300.0])
    points = expression.BFM_LM5[:, :2] * scale + shift
    points[:, 1] = 511 - points[:, 1]  # image y grows downwards
    translation, fitted = expression._pos_fit(points, 512)
    assert fitted == pytest.approx(scale, rel=1e-6) and np.allclose(translation, shift)
    crop = expression.aligned_crop(np.zeros((512, 512, 3), np.uint8), points)
    assert crop.shape == (224, 224, 3)


def test_fid_inception_matches_pytorch_fid(eval_weights, monkeypatch):
    import pytorch_fid.inception as reference

    path = eval_weights / "eval" / "pt_inception-2015-12-05-6726825d.pth"
    ours = fid.load_fid_inception(path)
    state = torch.load(path, weights_only=True)
    monkeypatch.setattr(reference, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = reference.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    batch = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        features = ours(batch).numpy()
        np.testing.assert_allclose(features, theirs(batch)[0].flatten(1).numpy(), rtol=1e-4, atol=1e-5)
    assert features.shape == (2, 2048) and np.abs(features[0] - features[1]).mean() > 1e-3 * np.abs(features).mean()
    assert np.abs(features).mean() > 1e-3


def test_frechet_and_kid_numbers():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.5, 1.2, size=(200, 16))
    expected = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions (1,000 swaps vs 2,048 features): the n x n route equals the d x d route
    x, y = rng.normal(size=(20, 64)), rng.normal(0.3, 1.1, size=(30, 64))
    xc, yc = x - x.mean(0), y - y.mean(0)
    from scipy.linalg import sqrtm

    direct = np.trace(np.real(sqrtm(np.cov(x, rowvar=False) @ np.cov(y, rowvar=False))))
    assert fid._trace_sqrt_product(xc, np.cov(y, rowvar=False)) == pytest.approx(direct, rel=1e-4)
    assert fid._trace_sqrt_product(yc, np.cov(x, rowvar=False)) == pytest.approx(direct, rel=1e-4)
    assert fid.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    same = fid.kernel_inception_distance(a[:100], a[100:], subsets=10, subset_size=100)
    shifted = fid.kernel_inception_distance(a, b, subsets=10, subset_size=100)
    assert abs(same) < 0.05 < shifted


def test_glint_onnx_recogniser_and_arcface_crop(tmp_path, faces_dir):
    recogniser = glint.GlintRecognizer(tiny_weights.tiny_glint_onnx(tmp_path / "glintr100.onnx"))
    image = load_image(faces_dir / "biden2.jpg")
    points = ARCFACE_TEMPLATE_112 * 4 + 100  # a face 4x the template size at (100, 100)
    crop = arcface_crop(image, points)
    np.testing.assert_allclose(crop, image[100:100 + 448:4, 100:100 + 448:4], atol=40)
    embeddings = recogniser.embed([crop, crop[:, ::-1].copy()])
    assert embeddings.shape == (2, 512) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert embeddings[0] @ embeddings[1] < 0.9999
