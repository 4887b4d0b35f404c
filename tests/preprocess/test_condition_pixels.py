"""The condition image on small synthetic pictures whose every pixel is known: a skin square (blurred), hair
(kept), glasses (tinted 10 % magenta), landmark and iris canvases in both layouts (mono and coloured), NaN
points, and the canvases built from ``FaceLandmarks``; fast, no face detector."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from appleswap.faces.points import FaceLandmarks
from appleswap.faces.segmap import CLASS_IDS, GLASSES
from appleswap.preprocess.condition import (
    IRIS_COLOR,
    LANDMARK_COLOR,
    build_condition,
    canvas_to_rgb,
    draw_iris,
    draw_landmarks,
    intersect_classes,
    landmark_canvases,
    lowfreq_copy,
    teacher_condition,
)

SKIN, HAIR = CLASS_IDS["skin"], CLASS_IDS["hair"]


def _scene(size: int = 48):
    rng = np.random.default_rng(0)
    image = rng.integers(20, 235, (size, size, 3), dtype=np.uint8)
    classes = np.zeros((size, size), np.uint8)
    classes[8:40, 8:40] = SKIN
    classes[:6, :] = HAIR
    return image, classes


def _pil_lanczos(image: np.ndarray, size: int) -> np.ndarray:
    small = Image.fromarray(image).resize((size, size), Image.LANCZOS)
    return np.asarray(small.resize(image.shape[1::-1], Image.LANCZOS))


def test_inside_the_face_the_low_frequency_copy_at_the_requested_size():
    image, classes = _scene()
    face = classes == SKIN
    for downsample in (8, 4):
        cond = build_condition(image, classes, None, None, downsample=downsample)
        assert np.array_equal(cond[face], _pil_lanczos(image, downsample)[face]), downsample
        assert np.array_equal(cond[~face], image[~face])  # hair and background are the target itself
    assert np.array_equal(build_condition(image, classes, None, None), build_condition(image, classes, None, None,
                                                                                      fill="blur", downsample=8))
    assert np.array_equal(lowfreq_copy(image, 4), _pil_lanczos(image, 4))
    assert np.array_equal(lowfreq_copy(image), _pil_lanczos(image, 8))


def test_black_fill_and_the_image_is_not_modified():
    image, classes = _scene()
    before = image.copy()
    cond = build_condition(image, classes, None, None, fill="black")
    assert np.array_equal(image, before)
    assert (cond[classes == SKIN] == 0).all() and np.array_equal(cond[classes != SKIN], image[classes != SKIN])


def test_dots_in_both_canvas_layouts_and_iris_over_landmarks():
    image, classes = _scene()
    mono = np.zeros((48, 48), np.uint8)
    mono[2, 3] = 1  # any non-zero value is a dot, also outside the face
    coloured = np.zeros((48, 48, 3), np.uint8)
    coloured[20, 21] = (0, 1, 0)  # one channel set: a dot
    coloured[30, 30] = (0, 200, 0)
    iris = np.zeros((48, 48), np.uint8)
    iris[30, 30] = 255  # on top of a landmark dot
    iris[10, 11] = 7
    for lm_canvas in (mono, coloured):
        cond = build_condition(image, classes, lm_canvas, iris)
        dots = (lm_canvas.reshape(48, 48, -1).sum(-1) > 0) & (iris == 0)
        assert (cond[dots] == 255).all() and dots.sum() >= 1
        assert (cond[iris > 0] == IRIS_COLOR).all()
        rest = ~dots & (iris == 0)
        assert np.array_equal(cond[rest], build_condition(image, classes, None, None)[rest])
    with pytest.raises(ValueError, match="canvas shape"):
        build_condition(image, classes, None, np.zeros((47, 48), np.uint8))


def test_glasses_are_tinted_ten_percent_magenta():
    image = np.full((24, 24, 3), (101, 57, 203), np.uint8)
    classes = np.zeros((24, 24), np.uint8)
    classes[4:12, 4:20] = GLASSES
    classes[12:20, 4:20] = SKIN
    cond = build_condition(image, classes, None, None, fill="black")
    # 0.9 * 0 + 0.1 * (255, 0, 255) on the black fill: OpenCV rounds 25.5 up
    glasses = classes == GLASSES
    assert (cond[glasses] == (26, 0, 26)).all()
    plain = np.zeros((24, 24), np.uint8)
    plain[4:12, 4:20] = GLASSES  # glasses over a flat picture and outside any skin
    tinted = build_condition(image, plain, None, None, fill="black")
    assert (tinted[4:12, 4:20] == (26, 0, 26)).all()
    kept = build_condition(image, np.zeros((24, 24), np.uint8), None, None)
    assert np.array_equal(kept, image)  # no face, no glasses: the target as it is
    outside = np.full((24, 24, 3), (101, 57, 203), np.uint8)
    classes_keep = np.full((24, 24), GLASSES, np.uint8)
    got = build_condition(outside, classes_keep, None, None, downsample=2)
    want = np.rint(0.9 * _pil_lanczos(outside, 2).astype(float) + 0.1 * np.array([255, 0, 255]))
    assert np.abs(got.astype(int) - want).max() == 0  # 0.9 * 101 + 25.5 = 116.4, 51.3, 208.2: no ties


def test_bad_images_are_refused():
    image, classes = _scene()
    for bad in (image[..., 0], image.astype(np.float32), np.dstack([image, image[..., :1]])):
        with pytest.raises(ValueError, match="image must be"):
            build_condition(bad, classes, None, None)


def test_landmark_and_iris_drawings():
    points = np.array([[np.nan, 5.0], [10.0, np.inf], [20.7, 30.2]])
    canvas = draw_landmarks((100, 300, 3), points)  # radius 1, thickness 2 at the truncated (20, 30)
    expected = np.zeros((100, 300), np.uint8)
    cv2.circle(expected, (20, 30), 1, 255, 2)
    assert np.array_equal(canvas, expected) and canvas.shape == (100, 300)
    iris = draw_iris((40, 50, 3), np.array([[np.nan, 3.0], [7.0, np.nan], [30.4, 20.6]]))
    want = Image.new("L", (50, 40), 0)
    ImageDraw.Draw(want).ellipse((28, 19, 32, 23), fill=255)
    assert np.array_equal(iris, np.asarray(want)) and iris.flags.writeable
    rgb = canvas_to_rgb(np.array([[0, 1], [255, 0]], np.uint8), (1, 2, 3))  # any non-zero value is a dot
    assert rgb.dtype == np.uint8 and rgb.tolist() == [[[0, 0, 0], [1, 2, 3]], [[1, 2, 3], [0, 0, 0]]]


def test_canvases_from_landmarks():
    lm68 = np.array([[10.0, 12.0]] * 68)
    drawn, no_iris = landmark_canvases((40, 50, 3), FaceLandmarks(lm68=lm68))
    assert no_iris is None
    assert np.array_equal(drawn, canvas_to_rgb(draw_landmarks((40, 50), lm68), LANDMARK_COLOR))
    assert LANDMARK_COLOR == (0, 255, 0) and IRIS_COLOR == (255, 0, 0)
    iris_points = np.array([[30.0, 20.0]] * 10)
    _, iris = landmark_canvases((40, 50, 3), FaceLandmarks(lm68=lm68, iris=iris_points))
    assert np.array_equal(iris, canvas_to_rgb(draw_iris((40, 50), iris_points), IRIS_COLOR))
    given_lm, given_iris = np.ones((40, 50, 3), np.uint8), np.full((40, 50, 3), 2, np.uint8)
    kept = landmark_canvases((40, 50, 3), FaceLandmarks(lm68=lm68, iris=iris_points, lm68_canvas=given_lm,
                                                        iris_canvas=given_iris))
    assert kept[0] is given_lm and kept[1] is given_iris


def test_teacher_condition_draws_the_landmarks_and_passes_the_fill():
    image, classes = _scene()
    found = FaceLandmarks(lm68=np.array([[20.0, 20.0]] * 68), iris=np.array([[30.0, 30.0]] * 10))
    lm, iris = landmark_canvases(image.shape, found)
    for fill in ("blur", "black"):
        assert np.array_equal(teacher_condition(image, classes, found, fill=fill),
                              build_condition(image, classes, lm, iris, fill=fill))
    assert np.array_equal(teacher_condition(image, classes, found), build_condition(image, classes, lm, iris))


def test_intersection_is_uint8_background_where_not_visible():
    classes = np.full((4, 5), SKIN, np.int32)
    visible = np.zeros((4, 5), bool)
    visible[:, 2:] = True
    inter = intersect_classes(classes, visible)
    assert inter.dtype == np.uint8 and (inter[:, :2] == 0).all() and (inter[:, 2:] == SKIN).all()
