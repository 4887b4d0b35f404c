"""FFHQ alignment against the FFHQ recipe written out independently (angle + half-side + centre), and the crop's
pixels against a linear ramp sampled by hand: a changed constant of the recipe (2.0, 1.8, 0.1) moves the crop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from appleswap.faces.align import align_face, ffhq_quad, paste_back

# a frontal-ish face with a slight roll, in a 1000 x 900 photo: right eye, left eye, nose, mouth corners
KEYPOINTS = np.array([[420.0, 380.0], [520.0, 372.0], [470.0, 440.0], [432.0, 500.0], [515.0, 494.0]])


def _recipe(right_eye, left_eye, mouth, size):
    """FFHQ's crop as a similarity: rotate by the face's angle, scale the half side to size / 2, centre it.

    The square's x axis is eye_to_eye plus eye_to_mouth turned 90 degrees clockwise (FFHQ's ``x``); its half side
    is max(2 * |eye_to_eye|, 1.8 * |eye_to_mouth|); its centre is 10 % of the way from the eyes to the mouth.
    Returns the 2x3 matrix (photo -> crop pixels, corners on the outer pixel edges).
    """
    eye_to_eye = left_eye - right_eye
    eye_centre = (left_eye + right_eye) / 2
    eye_to_mouth = mouth - eye_centre
    axis = (eye_to_eye[0] + eye_to_mouth[1], eye_to_eye[1] - eye_to_mouth[0])
    angle = math.atan2(axis[1], axis[0])
    half = max(2.0 * math.dist(left_eye, right_eye), 1.8 * math.hypot(*eye_to_mouth))
    centre = eye_centre + 0.1 * eye_to_mouth
    scale = size / (2 * half)
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    linear = np.array([[cos, sin], [-sin, cos]])  # rotation by -angle, scaled
    offset = (size - 1) / 2 - linear @ centre
    return np.hstack([linear, offset[:, None]])


def _expected(points, size):
    return _recipe(points[0], points[1], (points[3] + points[4]) / 2, size)


@pytest.mark.parametrize("size", [256, 512])
def test_matrix_is_the_ffhq_recipe(size):
    aligned = align_face(np.zeros((900, 1000, 3), np.uint8), KEYPOINTS, size=size)
    np.testing.assert_allclose(aligned.matrix, _expected(KEYPOINTS, size), rtol=0, atol=1e-6 * size)


def test_matrix_when_the_mouth_sets_the_size():
    # a long face: 1.8 |eye_to_mouth| > 2 |eye_to_eye|, the other branch of FFHQ's max
    points = KEYPOINTS.copy()
    points[3:, 1] += 150
    assert 1.8 * np.hypot(*((points[3] + points[4]) / 2 - (points[0] + points[1]) / 2)) > 2 * 100
    aligned = align_face(np.zeros((1200, 1000, 3), np.uint8), points, size=256)
    np.testing.assert_allclose(aligned.matrix, _expected(points, 256), rtol=0, atol=1e-4)


def test_quad_corners_follow_the_recipe():
    quad = ffhq_quad(KEYPOINTS)
    matrix = _expected(KEYPOINTS, 512)
    corners = quad @ matrix[:, :2].T + matrix[:, 2]
    # top-left, bottom-left, bottom-right, top-right on the crop's outer pixel edges
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [-0.5, 511.5], [511.5, 511.5], [511.5, -0.5]], atol=1e-6)


def test_68_landmarks_use_eye_means_and_mouth_corners():
    rng = np.random.default_rng(0)
    lm68 = rng.uniform(300, 600, (68, 2))
    lm68[36:42] = KEYPOINTS[0] + rng.normal(0, 4, (6, 2))
    lm68[42:48] = KEYPOINTS[1] + rng.normal(0, 4, (6, 2))
    lm68[48], lm68[54] = KEYPOINTS[3], KEYPOINTS[4]
    expected = _recipe(lm68[36:42].mean(0), lm68[42:48].mean(0), (lm68[48] + lm68[54]) / 2, 256)
    aligned = align_face(np.zeros((900, 1000, 3), np.uint8), lm68, size=256)
    np.testing.assert_allclose(aligned.matrix, expected, rtol=0, atol=1e-4)


def _ramp(height, width):
    """A photo whose channels are linear in x and y (cubic interpolation reproduces it exactly)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([20 + 0.2 * xs, 30 + 0.22 * ys, 200 - 0.1 * xs - 0.08 * ys], axis=-1)


@pytest.mark.parametrize("size", [128, 256])  # 128: a downscaled warp of a large face (area pre-scale)
def test_crop_pixels_sample_the_photo_where_the_recipe_says(size):
    photo = _ramp(900, 1000)
    aligned = align_face(np.rint(photo).astype(np.uint8), KEYPOINTS, size=size)
    assert not aligned.padded
    inverse = np.linalg.inv(np.vstack([_expected(KEYPOINTS, size), [0, 0, 1]]))
    vs, us = np.mgrid[0:size, 0:size].astype(np.float64)
    xs = inverse[0, 0] * us + inverse[0, 1] * vs + inverse[0, 2]
    ys = inverse[1, 0] * us + inverse[1, 1] * vs + inverse[1, 2]
    want = np.stack([20 + 0.2 * xs, 30 + 0.22 * ys, 200 - 0.1 * xs - 0.08 * ys], axis=-1)
    error = np.abs(aligned.image.astype(np.float64) - want)[2:-2, 2:-2]
    assert error.max() <= 1.5, error.max()


def test_crop_outside_the_photo_is_flagged_and_filled():
    points = KEYPOINTS - [400, 0]  # the face at the left edge
    aligned = align_face(np.full((900, 1000, 3), 90, np.uint8), points, size=128)
    assert aligned.padded
    assert np.abs(aligned.image.astype(int) - 90).max() <= 1  # filled with the photo's own (median) colour
    inside = align_face(np.full((900, 1000, 3), 90, np.uint8), KEYPOINTS, size=128)
    assert not inside.padded


def test_paste_back_covers_exactly_the_crop_square():
    frame = np.full((900, 1000, 3), 10, np.uint8)
    matrix = _expected(KEYPOINTS, 128)
    out = paste_back(frame, np.full((128, 128, 3), 250, np.uint8), matrix, feather=0.0)
    # where each photo pixel lands in the crop, by the recipe
    ys, xs = np.mgrid[0:900, 0:1000].astype(np.float64)
    us = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    vs = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    inside = (us >= 0) & (us <= 127) & (vs >= 0) & (vs <= 127)
    far = (us < -1) | (us > 128) | (vs < -1) | (vs > 128)
    assert inside.sum() > 100_000
    assert (out[inside] == 250).all() and (out[far] == 10).all()


def test_default_size_and_saved_size():
    aligned = align_face(np.zeros((900, 1000, 3), np.uint8), KEYPOINTS)
    assert aligned.image.shape == (512, 512, 3) and aligned.size == 512
    assert align_face(np.zeros((900, 1000, 3), np.uint8), KEYPOINTS, size=8).size == 8  # the smallest size


@pytest.mark.parametrize("count", [478, 468])
def test_mesh_points_use_their_68_landmarks(count):
    from appleswap.faces.landmarks import MESH_TO_IBUG68

    rng = np.random.default_rng(1)
    mesh = rng.uniform(350, 550, (478, 2))
    lm68 = mesh[MESH_TO_IBUG68]
    lm68[36:42] = KEYPOINTS[0] + rng.normal(0, 3, (6, 2))
    lm68[42:48] = KEYPOINTS[1] + rng.normal(0, 3, (6, 2))
    lm68[48], lm68[54] = KEYPOINTS[3], KEYPOINTS[4]
    mesh[MESH_TO_IBUG68] = lm68
    if count == 468:
        assert max(MESH_TO_IBUG68) < 468
    expected = _recipe(lm68[36:42].mean(0), lm68[42:48].mean(0), (lm68[48] + lm68[54]) / 2, 256)
    aligned = align_face(np.zeros((900, 1000, 3), np.uint8), mesh[:count], size=256)
    np.testing.assert_allclose(aligned.matrix, expected, rtol=0, atol=1e-3)  # the mesh is read as float32


@pytest.mark.parametrize("shape", [(4, 2), (100, 2), (478, 3), (5, 3), (68, 3)])
def test_other_point_layouts_are_refused(shape):
    with pytest.raises(ValueError, match=r"keypoints must be \(5, 2\), \(68, 2\) or \(478, 2\)"):
        align_face(np.zeros((900, 1000, 3), np.uint8), np.ones(shape) * 400, size=64)


def test_bad_image_or_size_is_refused():
    for image in (np.zeros((900, 1000), np.uint8), np.zeros((900, 1000, 4), np.uint8)):
        with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image"):
            align_face(image, KEYPOINTS)
    with pytest.raises(ValueError, match="size must be >= 8, got 7"):
        align_face(np.zeros((900, 1000, 3), np.uint8), KEYPOINTS, size=7)


def test_crop_is_the_cubic_warp_of_the_whole_photo():
    """On noise (where linear and cubic interpolation differ by tens of grey levels) the crop equals OpenCV's
    cubic warp of the uncut photo by the saved matrix (the cut region only moves the origin)."""
    import cv2

    noise = np.random.default_rng(2).integers(0, 256, (900, 1000, 3), dtype=np.uint8)
    aligned = align_face(noise, KEYPOINTS, size=512)
    want = cv2.warpAffine(noise, aligned.matrix, (512, 512), flags=cv2.INTER_CUBIC)
    diff = np.abs(aligned.image.astype(int) - want)
    assert diff.max() <= 1, diff.max()
    linear = cv2.warpAffine(noise, aligned.matrix, (512, 512), flags=cv2.INTER_LINEAR)
    assert np.abs(linear.astype(int) - want).mean() > 5  # the comparison can tell the filters apart


@pytest.mark.parametrize(("xs", "ys", "outside"), [
    ((0.0, 999.0), (0.0, 899.0), False),  # exactly on the corner pixels' centres: inside
    ((-0.01, 999.0), (0.0, 899.0), True), ((0.0, 999.01), (0.0, 899.0), True),
    ((0.0, 999.0), (-0.01, 899.0), True), ((0.0, 999.0), (0.0, 899.01), True),
    ((0.5, 998.5), (0.5, 898.5), False),
])
def test_outside_means_past_a_corner_pixel_centre(xs, ys, outside):
    from appleswap.faces.align import _outside

    quad = np.array([[xs[0], ys[0]], [xs[0], ys[1]], [xs[1], ys[1]], [xs[1], ys[0]]])
    assert _outside(quad, (900, 1000, 3)) is outside


def test_matrix_when_the_eyes_set_the_size():
    # a wide face: 2 |eye_to_eye| > 1.8 |eye_to_mouth|, the eyes' branch of FFHQ's max
    points = KEYPOINTS.copy()
    points[3:, 1] -= 60
    assert 2 * np.hypot(*(points[1] - points[0])) > 1.8 * np.hypot(*((points[3] + points[4] - points[0] - points[1]) / 2))
    aligned = align_face(np.zeros((900, 1000, 3), np.uint8), points, size=256)
    np.testing.assert_allclose(aligned.matrix, _expected(points, 256), rtol=0, atol=1e-4)


def test_tiny_faces_align_and_coincident_points_are_refused():
    small = KEYPOINTS * 0.004  # a face under 2 px across is still a face
    aligned = align_face(np.zeros((20, 20, 3), np.uint8), small, size=64)
    np.testing.assert_allclose(aligned.matrix, _expected(small, 64), rtol=1e-4)
    with pytest.raises(ValueError, match=r"^align_face: degenerate keypoints \(eyes and mouth coincide\)$"):
        align_face(np.zeros((20, 20, 3), np.uint8), np.full((5, 2), 10.0), size=64)


def test_keypoint_dtype_does_not_change_the_crop():
    points = (KEYPOINTS + 0.123).astype(np.float32)
    photo = np.random.default_rng(3).integers(0, 256, (900, 1000, 3), dtype=np.uint8)
    single = align_face(photo, points, size=128)
    double = align_face(photo, points.astype(np.float64), size=128)
    assert np.array_equal(single.matrix, double.matrix) and np.array_equal(single.image, double.image)


def test_inverse_matrix_is_float64_and_inverts():
    from appleswap.faces.align import invert_matrix

    matrix = np.array([[0.5, 0.1, 3.0], [-0.1, 0.5, -7.0]], np.float32)
    inverse = invert_matrix(matrix)
    assert inverse.dtype == np.float64
    np.testing.assert_allclose(np.vstack([inverse, [0, 0, 1]]) @ np.vstack([matrix, [0, 0, 1]]), np.eye(3),
                               atol=1e-6)
