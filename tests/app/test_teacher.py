"""Teacher mode: the target crop becomes its condition image, then inversion + regeneration; paste-back holds."""

from __future__ import annotations

import numpy as np
import pytest

from appleswap.app.swapper import teacher_condition
from appleswap.faces.align import align_face
from appleswap.faces.detect import detect_faces
from appleswap.faces.landmarks import get_landmark_provider
from appleswap.files import load_image
from tests.app.conftest import FAST


@pytest.fixture(scope="module")
def crop(faces_dir):
    image = load_image(faces_dir / "biden2.jpg")
    return align_face(image, detect_faces(image)[0].keypoints, 512).image


def test_condition_blurs_face_and_draws_landmarks(crop):
    condition = teacher_condition(crop, get_landmark_provider("mediapipe"))
    assert condition.shape == crop.shape
    assert np.array_equal(condition[:20, :20], crop[:20, :20])  # outside the face: the target itself
    centre = (slice(200, 330), slice(180, 330))
    assert np.abs(condition[centre].astype(int) - crop[centre]).mean() > 5  # the face is the low-pass copy
    white = (condition == 255).all(axis=2).sum()
    red = ((condition[..., 0] == 255) & (condition[..., 1] == 0) & (condition[..., 2] == 0)).sum()
    assert white > 68 * 4 and red >= 10  # 68 landmark dots and 10 iris dots


def test_teacher_swap(app_weights, faces_dir):
    from appleswap.app.swap import SwapEngine
    from appleswap.app.swapper import SwapConfig

    engine = SwapEngine.load(SwapConfig(model="teacher", **FAST), app_weights, device="cpu")
    identity = engine.source_identity([faces_dir / "obama1.jpg"])
    target = load_image(faces_dir / "biden2.jpg")
    outcome = engine.swap_image(identity, target, "biden2.jpg")
    assert "teacher" in engine.model_name and len(outcome.swapped) == 1
    outside = outcome.mask == 0
    assert np.array_equal(outcome.image[outside], target[outside])
    assert np.abs(outcome.image[outcome.mask > 0.99].astype(int) - target[outcome.mask > 0.99]).mean() > 5
