"""The condition image against the reference recipe (docs/method.md: Preprocessing), on a real aligned face."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from appleswap.faces.align import align_face
from appleswap.faces.detect import detect_faces
from appleswap.faces.landmarks import get_landmark_provider
from appleswap.faces.mesh_mask import mesh_classes
from appleswap.faces.segmap import CLASS_IDS, GLASSES, face_mask
from appleswap.files import load_image
from appleswap.preprocess.condition import (
    build_condition,
    draw_iris,
    draw_landmarks,
    intersect_classes,
    landmark_radius,
    lowfreq_copy,
)


@pytest.fixture(scope="module")
def face(faces_dir):
    photo = load_image(faces_dir / "biden2.jpg")
    aligned = align_face(photo, detect_faces(photo)[0].keypoints, size=512).image
    found = get_landmark_provider("mediapipe")(aligned)
    return aligned, found, mesh_classes(found.mesh, aligned.shape)


def test_landmark_dots_as_the_reference_draws_them():
    assert landmark_radius((512, 512)) == 2 and landmark_radius((100, 300)) == 1 and landmark_radius((1024, 1024)) == 5
    canvas = draw_landmarks((512, 512, 3), np.array([[100.9, 200.2]]))
    ys, xs = np.nonzero(canvas)
    # cv2.circle r=2, thickness 4 at the truncated point -> solid disk 9 px across centred on (100, 200)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (96, 104, 196, 204)
    assert canvas[200, 100] == 255 and canvas[200, 96] == 255
    assert canvas.dtype == np.uint8 and canvas.shape == (512, 512)


def test_iris_dots_are_pil_ellipses_radius_2():
    canvas = draw_iris((64, 64), np.array([[10.6, 20.4]]))
    expected = Image.new("L", (64, 64), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(expected).ellipse((9, 18, 13, 22), fill=255)  # np.rint -> (11, 20), box +-2
    assert np.array_equal(canvas, np.asarray(expected))
    assert canvas[20, 11] == 255 and canvas[20, 9] == 255 and canvas[18, 9] == 0


def test_lowfreq_copy_is_pil_lanczos_8x8():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((8, 8), Image.LANCZOS).resize((80, 96), Image.LANCZOS))
    out = lowfreq_copy(image)
    assert out.shape == image.shape and np.array_equal(out, expected)
    assert np.abs(np.diff(out.astype(int), axis=0)).mean() < np.abs(np.diff(image.astype(int), axis=0)).mean() / 5


def test_condition_is_target_outside_and_blur_inside(face):
    image, found, classes = face
    lm = draw_landmarks(image.shape, found.lm68)
    iris = draw_iris(image.shape, found.iris)
    cond = build_condition(image, classes, lm, iris)
    mask = face_mask(classes)
    dots = (lm > 0) | (iris > 0)
    blur = lowfreq_copy(image)
    assert np.array_equal(cond[~mask & ~dots], image[~mask & ~dots])
    assert np.array_equal(cond[mask & ~dots], blur[mask & ~dots])
    assert np.all(cond[(lm > 0) & (iris == 0)] == 255)  # white landmarks, also outside the mask
    assert np.all(cond[iris > 0] == [255, 0, 0])  # red iris wins over landmarks
    assert mask.mean() > 0.15 and (lm > 0).sum() > 68 * 20


def test_glasses_tint_and_inpainting_fill(face):
    image, _, classes = face
    classes = classes.copy()
    glasses = np.zeros_like(classes, dtype=bool)
    glasses[200:230, 150:360] = True
    glasses &= face_mask(classes)
    classes[glasses] = GLASSES
    cond = build_condition(image, classes, None, None)
    tint = np.zeros_like(image)
    tint[glasses] = (255, 0, 255)
    blur = lowfreq_copy(image)
    expected = cv2.addWeighted(blur, 0.9, tint, 0.1, 0)
    assert np.array_equal(cond[glasses], expected[glasses])
    black = build_condition(image, classes, None, None, fill="black")
    mask = face_mask(classes)
    assert np.all(black[mask & ~glasses] == 0)
    assert np.all(black[glasses] == [26, 0, 26])  # 0.1 * 255 rounded: the faint magenta cue on black
    assert np.array_equal(black[~mask], image[~mask])


def test_intersection_and_validation(face):
    image, _, classes = face
    visible = np.ones(classes.shape, bool)
    visible[:, :256] = False  # an occluder over the left half
    inter = intersect_classes(classes, visible)
    assert not face_mask(inter)[:, :256].any() and np.array_equal(inter[:, 256:], classes[:, 256:])
    assert intersect_classes(classes, None) is classes
    with pytest.raises(ValueError, match="fill"):
        build_condition(image, classes, None, None, fill="gauss")
    with pytest.raises(ValueError, match="classes shape"):
        build_condition(image, classes[:10], None, None)
    with pytest.raises(ValueError, match="canvas shape"):
        build_condition(image, classes, np.zeros((5, 5), np.uint8), None)
    with pytest.raises(ValueError, match="occlusion mask shape"):
        intersect_classes(classes, visible[:5])
    assert CLASS_IDS["hair"] not in np.unique(classes)
