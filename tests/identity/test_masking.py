"""PuLID's grey-face step and face masks on a real aligned face (MediaPipe mesh as the class source)."""

from __future__ import annotations

import numpy as np
import pytest

from appleswap.identity.align import face_crop_512
from appleswap.identity.masking import (
    PULID_WHITE_CLASSES,
    FaceRegion,
    apply_mask,
    crop_mask_to_image,
    face_classes_mask,
    gray_face_image,
    template_ellipse_classes,
)


@pytest.fixture(scope="module")
def aligned(photos):
    from appleswap.faces.landmarks import MediaPipeLandmarker

    image = photos["biden2.jpg"]
    mesh = MediaPipeLandmarker().mesh(image)
    kps = mesh[[468, 473, 1, 61, 291]]  # iris centres, nose tip, mouth corners in insightface order
    crop, matrix = face_crop_512(image, kps)
    return image, crop, matrix


def test_mesh_classes_and_gray_face(aligned):
    _, crop, _ = aligned
    classes, source = FaceRegion().classes(crop)
    assert source == "mediapipe-mesh" and classes.shape == (512, 512)
    gray = gray_face_image(crop, classes)
    white = np.isin(classes, PULID_WHITE_CLASSES)
    assert 0.1 < white.mean() < 0.9  # face in the middle, background around it
    assert np.all(gray[white] == 1.0)
    face = gray[~white]
    assert np.allclose(face[:, 0], face[:, 1]) and np.allclose(face[:, 1], face[:, 2])  # grey, not colour
    luma = crop[~white].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    np.testing.assert_allclose(face[:, 0], luma, atol=1e-5)
    assert classes[256, 256] != 0  # the template puts the nose near the crop centre


def test_face_mask_back_in_image(aligned):
    image, crop, matrix = aligned
    classes, _ = FaceRegion().classes(crop)
    mask = crop_mask_to_image(face_classes_mask(classes), matrix, image.shape)
    assert mask.shape == image.shape[:2] and 0.02 < mask.mean() < 0.8
    masked = apply_mask(image, mask)
    assert np.all(masked[~mask] == 0) and np.array_equal(masked[mask], image[mask])
    half = apply_mask(image, np.full(image.shape[:2], 128, np.uint8))
    assert abs(int(half[10, 10, 0]) - round(int(image[10, 10, 0]) * 128 / 255)) <= 1
    with pytest.raises(ValueError, match="does not match"):
        apply_mask(image, mask[:-1])


def test_template_ellipse_fallback(flat_image):
    classes, source = FaceRegion().classes(np.full((512, 512, 3), 128, np.uint8))
    assert source == "template-ellipse"
    np.testing.assert_array_equal(classes, template_ellipse_classes((512, 512)))
