"""paste_back's blend against a hand-computed feather: with a crop that maps pixel for pixel onto the frame (a pure
translation), every output pixel is frame * (1 - a) + face * a, where ``a`` is the crop square eroded by
``radius + 1`` (its outer pixel ring first set to 0) and blurred by a Gaussian of reach ``radius``, sigma
``radius / 2``, written out here in 1-D (the blur is separable)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from appleswap.faces.align import paste_back

SIZE, X0, Y0 = 64, 30, 20
FRAME, FACE = 10, 250


def _translation() -> np.ndarray:
    return np.array([[1.0, 0.0, -X0], [0.0, 1.0, -Y0]])


def _feather_profile(size: int, radius: int) -> np.ndarray:
    """Alpha along one row far from the other edges: the eroded step, blurred by the normalised Gaussian taps."""
    step = np.zeros(size)
    step[radius + 2:size - radius - 2] = 1.0  # ring 0 and an erosion of radius + 1
    if radius == 0:
        return step
    taps = np.array([math.exp(-k * k / (2 * (radius / 2) ** 2)) for k in range(-radius, radius + 1)])
    taps /= taps.sum()
    padded = np.concatenate([step[radius:0:-1], step, step[-2:-radius - 2:-1]])  # mirrored, edge not repeated
    return np.array([np.dot(taps, padded[i:i + 2 * radius + 1]) for i in range(size)])


def _paste(**kwargs) -> np.ndarray:
    frame = np.full((120, 140, 3), FRAME, np.uint8)
    return paste_back(frame, np.full((SIZE, SIZE, 3), FACE, np.uint8), _translation(), **kwargs)


@pytest.mark.parametrize("feather", [0.02, 0.04, 0.1])  # radius 1, 3, 6
def test_feathered_edge_follows_the_eroded_and_blurred_square(feather):
    radius = round(feather * SIZE)
    out = _paste(feather=feather)
    alpha = _feather_profile(SIZE, radius)
    row = out[Y0 + SIZE // 2, X0:X0 + SIZE, 0]
    np.testing.assert_allclose(row, np.rint(FRAME + (FACE - FRAME) * alpha), atol=1)
    col = out[Y0:Y0 + SIZE, X0 + SIZE // 2, 1]  # the same profile down a column
    np.testing.assert_allclose(col, np.rint(FRAME + (FACE - FRAME) * alpha), atol=1)
    assert row[0] == row[1] == FRAME and row[2 * radius + 2] == FACE  # 0 on the ring, 1 past the ramp
    assert FRAME < row[radius + 1] < FACE


def test_default_feather_is_four_percent():
    assert np.array_equal(_paste(), _paste(feather=0.04))
    assert not np.array_equal(_paste(), _paste(feather=0.06))


def test_pixels_outside_the_crop_are_the_frame_and_the_frame_is_not_changed():
    frame = np.random.default_rng(0).integers(0, 256, (120, 140, 3), dtype=np.uint8)
    before = frame.copy()
    out = paste_back(frame, np.full((SIZE, SIZE, 3), FACE, np.uint8), _translation())
    assert np.array_equal(frame, before) and out is not frame
    outside = np.ones(frame.shape[:2], bool)
    outside[Y0:Y0 + SIZE, X0:X0 + SIZE] = False
    assert np.array_equal(out[outside], frame[outside])
    assert (out[Y0 + 20:Y0 + 44, X0 + 20:X0 + 44] == FACE).all()


def test_mask_limits_and_weights_the_paste():
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, 32:] = 1.0
    out = _paste(mask=mask, feather=0.0)
    assert (out[Y0:Y0 + SIZE, X0:X0 + 32] == FRAME).all() and (out[Y0:Y0 + SIZE, X0 + 32:X0 + SIZE] == FACE).all()
    half = _paste(mask=np.full((SIZE, SIZE), 0.25, np.float32), feather=0.0)
    assert (half[Y0:Y0 + SIZE, X0:X0 + SIZE] == FRAME + (FACE - FRAME) // 4).all()  # 10 + 60: no rounding tie
    boolean = _paste(mask=mask > 0.5, feather=0.0)
    assert np.array_equal(boolean, out)
    feathered = _paste(mask=mask)
    assert (feathered[Y0:Y0 + SIZE, X0:X0 + 33] == FRAME).all()  # feathered inside the mask, never outside it
    assert (feathered[Y0 + 20:Y0 + 44, X0 + 40:X0 + 56] == FACE).all()


def test_crop_partly_or_wholly_outside_the_frame():
    frame = np.full((50, 60, 3), FRAME, np.uint8)
    face = np.full((SIZE, SIZE, 3), FACE, np.uint8)
    corner = paste_back(frame, face, np.array([[1.0, 0, 30], [0, 1.0, 40]]), feather=0.0)  # crop from (-30, -40)
    assert (corner[:24, :34] == FACE).all() and (corner[25:, 35:] == FRAME).all()
    away = paste_back(frame, face, np.array([[1.0, 0, -500], [0, 1.0, -500]]))
    assert np.array_equal(away, frame)


def test_bad_shapes_are_refused():
    frame = np.zeros((50, 60, 3), np.uint8)
    with pytest.raises(ValueError, match="square"):
        paste_back(frame, np.zeros((32, 16, 3), np.uint8), _translation())
    with pytest.raises(ValueError, match="mask shape"):
        paste_back(frame, np.zeros((32, 32, 3), np.uint8), _translation(), mask=np.ones((16, 16)))


def test_face_pixels_land_where_the_matrix_says():
    """A non-constant face through a rotated, scaled matrix: each frame pixel well inside the crop shows the face
    pixel the matrix maps it to (bilinear between the 4 neighbours, so within the face's local range)."""
    angle, scale = math.radians(30), 0.8  # crop px per frame px
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    matrix = np.array([[cos, sin, -40.0], [-sin, cos, 30.0]])
    vs, us = np.mgrid[0:SIZE, 0:SIZE]
    face = np.stack([4 * us, 4 * vs, 200 - 2 * us - 1 * vs], axis=-1).clip(0, 255).astype(np.uint8)
    frame = np.full((150, 150, 3), FRAME, np.uint8)
    out = paste_back(frame, face, matrix, feather=0.0)
    ys, xs = np.mgrid[0:150, 0:150].astype(np.float64)
    u = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    v = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    inside = (u >= 0) & (u <= SIZE - 1) & (v >= 0) & (v <= SIZE - 1)
    deep = (u >= 2) & (u <= SIZE - 3) & (v >= 2) & (v <= SIZE - 3)
    assert deep.sum() > 1500
    want = np.stack([4 * u, 4 * v, 200 - 2 * u - v], axis=-1)  # the face is linear there: bilinear is exact
    assert np.abs(out[deep].astype(float) - want[deep]).max() <= 1.0
    assert (out[inside] != FRAME).any(axis=-1).all()  # every pixel of the square is pasted
    outside = (u < -1) | (u > SIZE) | (v < -1) | (v > SIZE)
    assert (out[outside] == FRAME).all()
    corner_pixels = inside & ((u < 1.5) | (u > SIZE - 2.5)) & ((v < 1.5) | (v > SIZE - 2.5))
    assert corner_pixels.any() and (out[corner_pixels] != FRAME).any(axis=-1).all()  # the corners are reached


def test_half_covered_edge_pixels_blend_with_the_face_edge_not_black():
    """Magnified 2x, the frame pixel half a crop pixel outside the square gets alpha 0.5 and the face's own edge
    colour (replicated), so 10 / 2 + 250 / 2 = 130."""
    frame = np.full((120, 140, 3), FRAME, np.uint8)
    matrix = np.array([[0.5, 0.0, -0.5 * X0], [0.0, 0.5, -0.5 * Y0]])
    out = paste_back(frame, np.full((SIZE, SIZE, 3), FACE, np.uint8), matrix, feather=0.0)
    assert out[Y0 + 10, X0 - 1, 0] == 130 and out[Y0 - 1, X0 + 10, 0] == 130
    assert out[Y0 + 10, X0 - 2, 0] == FRAME and out[Y0 + 10, X0, 0] == FACE


def test_crop_beside_the_frame_in_one_direction_only():
    frame = np.full((50, 60, 3), FRAME, np.uint8)
    face = np.full((SIZE, SIZE, 3), FACE, np.uint8)
    right = paste_back(frame, face, np.array([[1.0, 0, -200], [0, 1.0, 0]]))  # rows overlap, columns do not
    below = paste_back(frame, face, np.array([[1.0, 0, 0], [0, 1.0, -200]]))
    assert np.array_equal(right, frame) and np.array_equal(below, frame)


def test_every_frame_pixel_is_the_bilinear_blend_by_hand():
    """Rotated and scaled, no feather: alpha is the bilinear sample of a square of ones with a zero border,
    a(u) a(v) with a(t) = clip(1 + t, 0, 1) * clip(size - t, 0, 1), and the face is sampled at its clamped
    coordinates (edge replicated); the frame pixel is rint(frame (1 - alpha) + face alpha) everywhere (within
    OpenCV's 1/32 interpolation steps)."""
    angle, scale = math.radians(-35), 0.7
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    matrix = np.array([[cos, sin, -20.0], [-sin, cos, -45.0]])
    vs, us = np.mgrid[0:SIZE, 0:SIZE]
    face = np.stack([3 * us + 20, 3 * vs + 10, 240 - 3 * us], axis=-1).astype(np.uint8)
    frame = np.full((140, 160, 3), 60, np.uint8)
    out = paste_back(frame, face, matrix, feather=0.0)
    ys, xs = np.mgrid[0:140, 0:160].astype(np.float64)
    u = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    v = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]

    def edge(t):
        return np.clip(1 + t, 0, 1) * np.clip(SIZE - t, 0, 1)

    alpha = (edge(u) * edge(v))[..., None]
    uc, vc = np.clip(u, 0, SIZE - 1), np.clip(v, 0, SIZE - 1)
    face_value = np.stack([3 * uc + 20, 3 * vc + 10, 240 - 3 * uc], axis=-1)
    want = 60 * (1 - alpha) + face_value * alpha
    assert (alpha > 0).sum() > 1500 and ((alpha > 0) & (alpha < 1)).sum() > 100
    # OpenCV interpolates with weights in 1/32 steps: allow that much of the face-frame contrast, plus rounding
    tolerance = 1.01 + np.abs(face_value - 60) / 32
    assert (np.abs(out.astype(float) - want) <= tolerance).all()


def test_black_stays_black():
    frame = np.zeros((120, 140, 3), np.uint8)
    out = paste_back(frame, np.zeros((SIZE, SIZE, 3), np.uint8), _translation())
    assert not out.any()
