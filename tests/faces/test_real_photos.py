"""The derived real-photo corpus (tests/fixtures/derived_photos.py): every face found, none invented, and every
aligned crop is the photo seen through its saved matrix, from thumbnails to a face filling a 6000 px frame.

Expectations are independent of the code under test: face boxes come from the corpus's construction, the
crop is checked by finding the eyes again in it and by pasting it back onto the photo.
"""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from appleswap.faces.align import ALIGNMENT_TOLERANCE, align_face, alignment_error, invert_matrix, paste_back
from appleswap.faces.detect import detect_faces, tile_grid
from tests.fixtures import derived_photos

SIZE = 512


@pytest.fixture(scope="module")
def corpus(faces_dir):
    """name -> (photo, detections): detection runs once per image for every test below."""
    return {photo.name: (photo, detect_faces(photo.image)) for photo in derived_photos.corpus(faces_dir)}


def test_every_face_found_and_no_false_faces(corpus):
    report = {}
    for name, (photo, faces) in corpus.items():
        found, false = derived_photos.match_faces([f.box for f in faces], photo.boxes)
        report[name] = (found, photo.faces, false)
    wrong = {name: r for name, r in report.items() if r[0] != r[1] or r[2]}
    assert not wrong, f"(found, expected, false) per photo: {wrong}"
    assert report["group"] == (8, 8, 0)  # 8 people, faces of 40-190 px, one tilted, one partly hidden
    assert report["contact sheet"] == (6, 6, 0)  # portraits edge to edge, faces near the top border


def _eyes_in_crop(crop: np.ndarray) -> np.ndarray:
    faces = detect_faces(crop, tiles=False)
    assert faces, "no face in the aligned crop"
    return faces[0].keypoints[:2].astype(np.float64)


@pytest.mark.parametrize("name", ["biden2@0.25x", "biden2@1x", "biden2@4x", "obama2@8x", "obama-fills-6000px",
                                  "obama1-cut-left", "biden2-cut-top", "biden2-rot-45"])
def test_crop_is_the_photo_under_its_matrix(corpus, name):
    photo, faces = corpus[name]
    image = photo.image
    aligned = align_face(image, faces[0].keypoints, SIZE)
    # the eyes found again in the crop sit where the saved matrix sends the photo's eyes (a face cut by the
    # frame has guessed keypoints on both sides, so there only the pixel checks below apply)
    mapped = faces[0].keypoints[:2].astype(np.float64) @ aligned.matrix[:, :2].T + aligned.matrix[:, 2]
    if "cut" not in name:
        assert np.abs(_eyes_in_crop(aligned.image) - mapped).max() < 0.03 * SIZE
    # FFHQ geometry: eye distance about a quarter of the crop, at every face size
    assert 0.2 * SIZE < np.hypot(*(mapped[1] - mapped[0])) < 0.32 * SIZE
    # pasting the unchanged crop back reproduces the photo on the face (interpolation error only)
    back = paste_back(image, aligned.image, aligned.matrix, feather=0.02)
    x0, y0, x1, y1 = np.array(photo.boxes[0])
    inset = 0.15 * (x1 - x0)
    if "cut" in name:  # FFHQ's fill blurs the crop a little way into the photo too: compare away from the edge
        x0, y0 = max(x0, 0.25 * (x1 - x0)), max(y0, 0.25 * (x1 - x0))
    rows = slice(max(int(y0 + inset), 0), min(int(y1 - inset), image.shape[0]))
    cols = slice(max(int(x0 + inset), 0), min(int(x1 - inset), image.shape[1]))
    error = np.abs(back[rows, cols].astype(int) - image[rows, cols].astype(int)).mean()
    assert error < 3.0, error
    # the code's own check agrees: well inside its tolerance
    assert alignment_error(image, aligned) < ALIGNMENT_TOLERANCE / 2


def test_alignment_error_catches_a_crop_from_the_wrong_place(corpus):
    photo, faces = corpus["biden2@4x"]
    aligned = align_face(photo.image, faces[0].keypoints, SIZE)
    aligned.matrix = aligned.matrix.copy()
    aligned.matrix[0, 2] += 0.05 * SIZE  # the crop is right, the saved matrix 5 % off
    assert alignment_error(photo.image, aligned) > 2 * ALIGNMENT_TOLERANCE


def test_paste_back_leaves_the_rest_of_a_large_photo_alone(corpus):
    photo, faces = corpus["obama-fills-6000px"]
    aligned = align_face(photo.image, faces[0].keypoints, SIZE)
    white = np.full_like(aligned.image, 255)
    back = paste_back(photo.image, white, aligned.matrix, mask=np.ones((SIZE, SIZE), bool), feather=0.02)
    inverse = invert_matrix(aligned.matrix)
    centre = np.array([SIZE / 2, SIZE / 2]) @ inverse[:, :2].T + inverse[:, 2]
    assert (back[int(centre[1]), int(centre[0])] == 255).all()
    corners = np.array([[0, 0], [SIZE, 0], [SIZE, SIZE], [0, SIZE]], np.float64) @ inverse[:, :2].T + inverse[:, 2]
    top = int(corners[:, 1].min()) - 2
    if top > 0:
        assert np.array_equal(back[:top], photo.image[:top])


def test_tiles_cover_the_photo_with_overlap():
    for height, width in ((900, 1600), (1536, 1536), (500, 700)):
        tiles = tile_grid(height, width)
        covered = np.zeros((height, width), bool)
        for x0, y0, side in tiles:
            assert 0 <= x0 and 0 <= y0 and x0 + side <= width and y0 + side <= height
            covered[y0:y0 + side, x0:x0 + side] = True
        assert covered.all() if tiles else max(height, width) < 768


def _photo_under_matrix(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The photo warped by ``matrix`` at 1/8 of ``size`` (an independent reference: blur, then plain warp)."""
    small = size // 8
    to_small = np.array([[1 / 8, 0, 1 / 16 - 0.5], [0, 1 / 8, 1 / 16 - 0.5]])
    matrix = to_small @ np.vstack([matrix, [0, 0, 1]])
    scale = np.sqrt(abs(np.linalg.det(matrix[:, :2])))
    blurred = cv2.GaussianBlur(image, (0, 0), 0.5 / scale)
    return cv2.warpAffine(blurred, matrix, (small, small), flags=cv2.INTER_LINEAR)


def test_preprocess_of_a_4x_photo_saves_a_consistent_crop(faces_dir, tmp_path):
    """The dataset path: crop, matrix, landmarks and mask agree on a phone-sized face (eye distance ~800 px)."""
    from appleswap.faces.landmarks import get_landmark_provider
    from appleswap.files import load_image, save_image
    from appleswap.preprocess.runner import PreprocessConfig, run_preprocess

    folder = tmp_path / "in"
    folder.mkdir()
    photo = derived_photos.scaled(faces_dir, "biden2", 4.0)
    save_image(folder / "big.png", photo.image)
    shutil.copy(faces_dir / "obama1.jpg", folder / "small.jpg")
    out = tmp_path / "out"
    run_preprocess(folder, out, PreprocessConfig(), progress=False)
    for name in ("big", "small"):
        record = json.loads((out / "manifest" / f"{name}.json").read_text())
        face = record["faces"][0]
        assert record["status"] == "ok" and face["status"] == "ok", record
        assert face["align_error"] < ALIGNMENT_TOLERANCE / 2
        image = load_image(next(folder.glob(f"{name}.*")))
        crop = load_image(out / f"{name}.jpg")
        matrix = np.array(face["matrix"])
        expected = _photo_under_matrix(image, matrix, SIZE)
        got = cv2.resize(crop, (SIZE // 8, SIZE // 8), interpolation=cv2.INTER_AREA)
        assert np.abs(got.astype(int) - expected.astype(int))[4:-4, 4:-4].mean() < 3.0, name
        # the saved 68 landmarks (mapped through two matrices) are those of the saved crop itself
        lm68 = np.array(face["lm68"])
        again = get_landmark_provider("mediapipe")(crop).lm68
        assert np.linalg.norm(lm68 - again, axis=1).mean() < 0.01 * SIZE, name
        mask = load_image(out / "mask" / f"{name}.png")[..., 0] > 127
        for point in (lm68[36:48].mean(0), lm68[30], lm68[48:60].mean(0)):  # between the eyes, nose tip, mouth
            assert mask[int(point[1]), int(point[0])], name
        assert not mask[:16, :16].any() and 0.2 < mask.mean() < 0.7, name
