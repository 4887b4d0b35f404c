"""The ``3ddfa-v3`` provider end to end on the real test photos with tiny checkpoints (real names and layouts)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from appleswap.faces.tddfa import Tddfa3Landmarker, coefficient_distances, landmarks_from_coeffs, load_fit, save_fit
from appleswap.faces.tddfa.checkpoints import load_checkpoint
from appleswap.files import load_image
from appleswap.weights import MissingWeightError
from tests.fixtures.tiny_tddfa import tiny_tddfa_dir  # noqa: F401  (pytest fixture)

PHOTOS = ("obama.jpg", "biden2.jpg", "obama_partial_face.jpg")
MAX_SIDE = 400  # the photos are shrunk first to keep the CPU test fast (RetinaFace works at 512 anyway)


@pytest.fixture(scope="module")
def landmarker(tiny_tddfa_dir):  # noqa: F811
    return Tddfa3Landmarker.from_weights(tiny_tddfa_dir, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def photos(faces_dir):
    images = [load_image(faces_dir / name) for name in PHOTOS]
    return [cv2.resize(im, None, fx=MAX_SIDE / max(im.shape[:2]), fy=MAX_SIDE / max(im.shape[:2]),
                       interpolation=cv2.INTER_AREA) for im in images]


@pytest.fixture(scope="module")
def fits(landmarker, photos):
    return landmarker.fit_batch(photos)


def test_fits_have_the_documented_shapes(fits, photos):
    assert len(fits) == len(photos) and all(fit is not None for fit in fits)
    for fit, image in zip(fits, photos):
        assert fit.lm68.shape == (68, 2) and fit.lm68.dtype == np.float32
        assert fit.lm106.shape == (106, 2) and fit.box.shape == (4,) and fit.trans_params.shape == (5,)
        assert {k: tuple(v.shape) for k, v in fit.coeffs.items()} == {
            "id": (80,), "exp": (64,), "angle": (3,), "trans": (3,), "alb": (80,), "sh": (27,)}
        assert np.isfinite(fit.lm68).all()
        assert tuple(fit.trans_params[:2]) == (image.shape[1], image.shape[0])


def test_points_follow_ibug68_order_in_image_coordinates(fits):
    for fit in fits:
        lm = fit.lm68.astype(np.float64)
        assert lm[0, 0] < lm[4, 0] < lm[8, 0] < lm[12, 0] < lm[16, 0], "jaw runs from image left to image right"
        assert (np.diff(lm[0:17, 0]) > 0).sum() >= 14
        assert np.argmax(lm[0:17, 1]) == 8, "the chin is the lowest jaw point (y grows downwards)"
        assert lm[36:42, 0].mean() < lm[42:48, 0].mean(), "subject's right eye is on the image left"
        assert lm[17:27, 1].mean() < lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean()


def test_landmarks_lie_on_the_fitted_face(fits):
    for fit in fits:
        x1, y1, x2, y2 = fit.box
        side = max(x2 - x1, y2 - y1)
        centre = fit.lm68.mean(axis=0)
        assert abs(centre[0] - (x1 + x2) / 2) < 1.5 * side and abs(centre[1] - (y1 + y2) / 2) < 1.5 * side


def test_registered_provider_is_deterministic_and_batch_equals_single(tiny_tddfa_dir, photos, fits):  # noqa: F811
    """A second load through the preprocess provider lookup, one image alone, gives the batched result again."""
    landmarks = pytest.importorskip("appleswap.faces.landmarks")
    provider = landmarks.get_landmark_provider("3ddfa-v3", weights_dir=tiny_tddfa_dir, device="cpu")
    assert isinstance(provider, Tddfa3Landmarker)
    result = provider(photos[1])
    assert isinstance(result, landmarks.FaceLandmarks)
    assert result.iris is None and result.mesh is None and result.segmap is None
    np.testing.assert_allclose(result.lm68, fits[1].lm68, atol=1e-3)


def test_no_face_gives_none_and_a_clear_error(landmarker, photos):
    strict = Tddfa3Landmarker(landmarker.detector.__class__(landmarker.detector.net, "cpu", confidence=1.0),
                              landmarker.landmark106, landmarker.recon, landmarker.bfm, landmarker.lm3d)
    assert strict.fit_batch([photos[0]]) == [None]
    pytest.importorskip("appleswap.faces.landmarks")
    with pytest.raises(ValueError, match="no face"):
        strict(photos[0], key="n000001/0001_01")


def test_coefficients_are_saved_and_can_be_mixed(tmp_path, landmarker, fits):
    path = save_fit(tmp_path / "fit.safetensors", fits[0])
    loaded = load_fit(path)
    for key, value in fits[0].coeffs.items():
        torch.testing.assert_close(loaded.coeffs[key], value)
    np.testing.assert_array_equal(loaded.lm68, fits[0].lm68)
    np.testing.assert_array_equal(loaded.trans_params, fits[0].trans_params)
    redrawn = landmarks_from_coeffs(landmarker.bfm, loaded.coeffs, loaded.trans_params)
    np.testing.assert_allclose(redrawn, fits[0].lm68, atol=1e-2)
    target, source = fits[0], fits[1]
    mixed = landmarks_from_coeffs(landmarker.bfm, {**target.coeffs, "id": source.coeffs["id"]}, target.trans_params)
    assert mixed.shape == (68, 2) and not np.allclose(mixed, target.lm68, atol=1e-3)
    record = target.to_record()
    assert [len(record[k]) for k in ("id", "exp", "angle", "trans", "trans_params", "box")] == [80, 64, 3, 3, 5, 4]
    assert coefficient_distances(target, target) == {"id_l2": 0.0, "exp_l2": 0.0, "pose_deg": 0.0, "trans_l2": 0.0}
    dist = coefficient_distances(target, source)
    expected_exp = float(np.linalg.norm((target.coeffs["exp"] - source.coeffs["exp"]).double().numpy()))
    assert dist["exp_l2"] == pytest.approx(expected_exp) and dist["pose_deg"] > 0
    with pytest.raises(ValueError, match="not a 3DDFA-V3 fit"):
        from appleswap.files import save_tensors

        load_fit(save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)}))


def test_drawing_matches_reference_dots(fits, photos):
    condition = pytest.importorskip("appleswap.preprocess.condition")
    drawn = 0
    for fit, image in zip(fits, photos):
        ours = condition.draw_landmarks(image.shape, fit.lm68)
        reference = np.zeros_like(image)  # black BGR canvas, green dots, as the reference plot_kpts
        radius = max(int(min(image.shape[0], image.shape[1]) / 200), 1)
        for x, y in fit.lm68:
            reference = cv2.circle(reference, (int(x), int(y)), radius, (0, 255, 0), radius * 2)
        np.testing.assert_array_equal(ours > 0, reference.sum(axis=-1) > 0)
        drawn += int((ours > 0).any())
    assert drawn, "no landmark fell inside any photo"


def test_missing_weights_name_the_file_and_source(tmp_path):
    with pytest.raises(MissingWeightError, match="(?s)3ddfa-v3/face_model.npy.*Zidu-Wang/3DDFA-V3"):
        Tddfa3Landmarker.from_weights(tmp_path, device="cpu")


def test_bad_checkpoints_are_refused(tmp_path, tiny_tddfa_dir):  # noqa: F811
    wrong = tmp_path / "net_recon.pth"
    torch.save({"weights": {"a": torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match="net_recon"):
        load_checkpoint(wrong, key="net_recon")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"net_recon": Payload()}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(evil, key="net_recon")
    broken = tmp_path / "weights"
    shutil.copytree(tiny_tddfa_dir, broken)
    torch.save({"state_dict": {"module.block1.0.weight": torch.zeros(8, 3, 3, 3)}},
               broken / "3ddfa-v3" / "large_base_net.pth")
    with pytest.raises(ValueError, match="missing .* weights for LargeBaseLmksNet"):
        Tddfa3Landmarker.from_weights(broken, device="cpu")


REAL_ASSETS = os.environ.get("APPLESWAP_TDDFA_WEIGHTS")  # a weights folder with the real 3ddfa-v3/ assets
REFERENCE_DIR = os.environ.get("APPLESWAP_TDDFA_REFERENCE")  # images + 3dmm/<name>/<name>_ldm68.png from the authors


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_ASSETS and REFERENCE_DIR), reason="needs APPLESWAP_TDDFA_WEIGHTS and _REFERENCE")
def test_real_assets_match_reference_drawings():
    condition = pytest.importorskip("appleswap.preprocess.condition")
    model = Tddfa3Landmarker.from_weights(REAL_ASSETS)
    images = sorted(p for p in Path(REFERENCE_DIR).glob("*") if p.suffix.lower() in (".jpg", ".png"))
    assert images, f"no images in {REFERENCE_DIR}"
    fits = model.fit_batch([load_image(p) for p in images])
    for path, fit in zip(images, fits):
        drawing = Path(REFERENCE_DIR) / "3dmm" / path.stem / f"{path.stem}_ldm68.png"
        assert fit is not None and drawing.is_file(), path
        ref = load_image(drawing, min_side=1).sum(axis=-1) > 0
        ours = condition.draw_landmarks(ref.shape, fit.lm68) > 0
        iou = (ref & ours).sum() / max((ref | ours).sum(), 1)
        assert iou > 0.9, f"{path.name}: IoU {iou:.3f} with the reference drawing"
