"""Detection and FFHQ alignment + paste-back on the real test photos."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from appleswap.faces.align import align_face, ffhq_quad, invert_matrix, paste_back
from appleswap.faces.detect import detect_faces
from appleswap.files import load_image


@pytest.fixture(scope="module")
def photos(faces_dir):
    names = ("obama1", "biden2", "obama_and_biden", "two_people", "obama_partial_face")
    return {name: load_image(faces_dir / f"{name}.jpg") for name in names}


def test_detects_one_face_with_ordered_keypoints(photos):
    for name in ("obama1", "biden2"):
        faces = detect_faces(photos[name])
        assert len(faces) == 1, name
        face = faces[0]
        x0, y0, x1, y1 = face.box
        kp = face.keypoints
        assert kp.shape == (5, 2) and 0.5 < face.score <= 1.0
        assert np.all((kp[:, 0] > x0) & (kp[:, 0] < x1) & (kp[:, 1] > y0) & (kp[:, 1] < y1))
        # insightface order: right eye (image left) left of left eye; eyes above nose above mouth corners
        assert kp[0, 0] < kp[1, 0] and kp[3, 0] < kp[4, 0]
        assert max(kp[0, 1], kp[1, 1]) < kp[2, 1] < min(kp[3, 1], kp[4, 1])


def test_multi_face_photos_sorted_largest_first(photos):
    # obama_and_biden: the two men and, bottom right, a girl whose face is half in shadow (x 1600-1750)
    for name, count in (("obama_and_biden", 3), ("two_people", 2)):
        faces = detect_faces(photos[name])
        assert len(faces) == count, name
        assert all(a.area >= b.area for a, b in itertools.pairwise(faces))
        # the boxes are distinct people, side by side
        spans = sorted((f.box[0], f.box[2]) for f in faces)
        assert all(left[1] < right[0] for left, right in itertools.pairwise(spans))
    girl = detect_faces(photos["obama_and_biden"])[2]
    assert 1580 < (girl.box[0] + girl.box[2]) / 2 < 1780 and girl.box[1] > 1000


def test_no_face_and_bad_input():
    rng = np.random.default_rng(0)
    assert detect_faces(np.full((256, 256, 3), 127, np.uint8)) == []
    assert detect_faces(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect_faces(np.zeros((64, 64), np.float32))


def test_alignment_puts_eyes_at_ffhq_positions(photos):
    face = detect_faces(photos["obama1"])[0]
    aligned = align_face(photos["obama1"], face.keypoints, size=512)
    assert aligned.image.shape == (512, 512, 3) and aligned.image.dtype == np.uint8
    assert aligned.matrix.shape == (2, 3)
    kp = face.keypoints.astype(np.float64) @ aligned.matrix[:, :2].T + aligned.matrix[:, 2]
    # FFHQ: eyes level, centred horizontally, eye distance about a quarter of the crop, mouth below
    assert abs(kp[0, 1] - kp[1, 1]) < 0.04 * 512  # FFHQ also weighs the mouth in the rotation
    assert abs((kp[0, 0] + kp[1, 0]) / 2 - 256) < 6
    # FFHQ's square has a half side of max(2 |eye_to_eye|, 1.8 |eye_to_mouth|), mapped onto 512 / 2 pixels
    source = face.keypoints.astype(np.float64)
    eyes = np.hypot(*(source[1] - source[0]))
    half = max(2.0 * eyes, 1.8 * np.hypot(*((source[3] + source[4]) / 2 - (source[0] + source[1]) / 2)))
    assert np.hypot(*(kp[1] - kp[0])) == pytest.approx(eyes * 256 / half, rel=1e-6)
    assert 0.35 * 512 < kp[0, 1] < 0.5 * 512 and kp[3, 1] > 0.6 * 512
    # similarity: the linear part is a scaled rotation
    a = aligned.matrix[:, :2]
    assert np.allclose(a[0, 0], a[1, 1]) and np.allclose(a[0, 1], -a[1, 0])


def test_face_at_border_is_padded_not_cropped(photos):
    image = photos["obama_partial_face"]
    face = detect_faces(image)[0]
    aligned = align_face(image, face.keypoints, size=256)
    assert aligned.padded and aligned.image.shape == (256, 256, 3)
    quad = ffhq_quad(face.keypoints)
    assert quad[:, 0].min() < 0  # the crop really leaves the photo on the left
    # the filled area is smooth (blurred reflection), not a hard black border
    assert aligned.image[:, :8].mean() > 20


def test_align_then_paste_back_reproduces_the_photo(photos):
    image = photos["biden2"]
    face = detect_faces(image)[0]
    aligned = align_face(image, face.keypoints, size=512)
    back = paste_back(image, aligned.image, aligned.matrix, feather=0.02)
    x0, y0, x1, y1 = face.box.astype(int)
    inner = (slice(y0 + 40, y1 - 40), slice(x0 + 40, x1 - 40))
    error = np.abs(back[inner].astype(int) - image[inner].astype(int))
    assert error.mean() < 3.0, error.mean()
    # outside the pasted square the frame is untouched, exactly
    corners = np.array([[0, 0], [511, 0], [511, 511], [0, 511]], np.float64)
    inv = invert_matrix(aligned.matrix)
    corners_src = corners @ inv[:, :2].T + inv[:, 2]
    far = (slice(0, max(int(corners_src[:, 1].min()) - 2, 1)), slice(None))
    assert np.array_equal(back[far], image[far])


def test_paste_back_respects_the_mask(photos):
    image = photos["obama1"]
    aligned = align_face(image, detect_faces(image)[0].keypoints, size=256)
    mask = np.zeros((256, 256), bool)
    mask[96:160, 96:160] = True
    white = np.full_like(aligned.image, 255)
    back = paste_back(image, white, aligned.matrix, mask=mask, feather=0.02)
    changed = np.any(back != image, axis=-1)
    inv = invert_matrix(aligned.matrix)
    centre = np.array([128.0, 128.0]) @ inv[:, :2].T + inv[:, 2]
    assert changed[int(centre[1]), int(centre[0])]
    # the pasted area is about the mask's area mapped back (scale^2), never the whole square
    scale2 = abs(np.linalg.det(inv[:, :2]))
    assert 0.3 * 64 * 64 * scale2 < changed.sum() < 1.05 * 64 * 64 * scale2


def test_align_input_validation(photos):
    with pytest.raises(ValueError, match=r"\(5, 2\), \(68, 2\) or \(478, 2\)"):
        align_face(photos["obama1"], np.zeros((7, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        align_face(photos["obama1"], np.zeros((5, 2)))
    m = np.array([[0.5, 0.2, 10.0], [-0.2, 0.5, -3.0]])
    assert np.allclose(invert_matrix(invert_matrix(m)), m)
