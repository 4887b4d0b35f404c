"""68 landmarks + iris from the MediaPipe mesh, the mesh face mask and the reference-layout adapter."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest

from appleswap.faces.align import align_face, invert_matrix
from appleswap.faces.detect import detect_faces
from appleswap.faces.landmarks import (
    MESH_TO_IBUG68,
    FaceLandmarks,
    ReferenceLandmarks,
    blob_centroids,
    get_landmark_provider,
)
from appleswap.faces.mesh_mask import landmark_classes, mesh_classes
from appleswap.faces.segmap import CLASS_IDS, colorize, face_mask
from appleswap.files import load_image, save_image
from appleswap.preprocess.condition import canvas_to_rgb, draw_iris, draw_landmarks

NAMES = ("obama1", "biden2", "obama2", "two_people")


@pytest.fixture(scope="module")
def provider():
    return get_landmark_provider("mediapipe")


@pytest.fixture(scope="module")
def faces(faces_dir, provider):
    """name -> (photo, detection, aligned crop, landmarks on the crop, landmarks in the photo)."""
    out = {}
    for name in NAMES:
        photo = load_image(faces_dir / f"{name}.jpg")
        detection = detect_faces(photo)[0]
        aligned = align_face(photo, detection.keypoints, size=512)
        found = provider(aligned.image)
        out[name] = (photo, detection, aligned, found, found.transformed(invert_matrix(aligned.matrix)))
    return out


def test_shapes_and_table():
    assert MESH_TO_IBUG68.shape == (68,) and len(set(MESH_TO_IBUG68.tolist())) == 68
    assert MESH_TO_IBUG68.max() < 468


def test_landmarks_inside_face_box(faces):
    for name, (_, detection, _, found, in_photo) in faces.items():
        assert found.lm68.shape == (68, 2) and found.lm68.dtype == np.float32
        assert found.iris.shape == (10, 2) and found.mesh.shape == (478, 2)
        x0, y0, x1, y1 = detection.box
        w, h = x1 - x0, y1 - y0
        pts = in_photo.lm68
        inside = (pts[:, 0] > x0 - 0.15 * w) & (pts[:, 0] < x1 + 0.15 * w) & (pts[:, 1] > y0 - 0.15 * h) & (
            pts[:, 1] < y1 + 0.2 * h)
        assert inside.all(), name


def test_landmarks_in_anatomical_order(faces):
    for name, (_, _, _, found, _) in faces.items():
        lm = found.lm68
        jaw_x = lm[:17, 0]
        assert np.all(np.diff(jaw_x[::4]) > 0), name  # from the subject's right side to the left
        assert np.all(np.diff(lm[:9, 1]) > -2) and np.all(np.diff(lm[8:17, 1]) < 2), name  # down to the chin, up
        assert lm[8, 1] == pytest.approx(lm[:17, 1].max(), abs=3)  # chin is the lowest jaw point
        brows_y, eyes_y = lm[17:27, 1].mean(), lm[36:48, 1].mean()
        assert brows_y < eyes_y < lm[30, 1] < lm[51, 1] < lm[57, 1] < lm[8, 1], name
        assert lm[36:42, 0].mean() < lm[27, 0] < lm[42:48, 0].mean(), name  # subject's right eye on image left
        assert lm[48, 0] < lm[51, 0] < lm[54, 0] and lm[31, 0] < lm[33, 0] < lm[35, 0]
        assert lm[17:22, 0].max() < lm[22:27, 0].min()


def test_iris_points_inside_eye_contours(faces):
    for name, (_, _, _, found, _) in faces.items():
        lm, iris = found.lm68, found.iris
        for eye, points in ((lm[36:42], iris[:5]), (lm[42:48], iris[5:])):
            contour = eye.reshape(-1, 1, 2).astype(np.float32)
            centre = tuple(float(v) for v in points[0])
            assert cv2.pointPolygonTest(contour, centre, True) > -2.0, name
            ring = np.linalg.norm(points[1:] - points[0], axis=1)
            eye_width = np.linalg.norm(eye[3] - eye[0])
            assert np.all(ring > 0.05 * eye_width) and np.all(ring < 0.5 * eye_width), name


def test_no_face_raises(provider):
    with pytest.raises(ValueError, match="no face"):
        provider(np.full((256, 256, 3), 90, np.uint8))


def test_mesh_mask_covers_face_not_background(faces):
    _, _, aligned, found, _ = faces["obama1"]
    classes = mesh_classes(found.mesh, aligned.image.shape)
    assert classes.shape == (512, 512) and classes.dtype == np.uint8
    present = set(np.unique(classes).tolist())
    for cls in ("skin", "r_brow", "l_brow", "r_eye", "l_eye", "nose", "u_lip", "l_lip"):
        assert CLASS_IDS[cls] in present, cls
    mask = face_mask(classes)
    assert 0.15 < mask.mean() < 0.6
    # FFHQ crop corners are background/hair/shoulders: never in the mask
    for corner in ((0, 0), (0, 511), (511, 0), (511, 511), (20, 256)):
        assert not mask[corner]
    lm = found.lm68
    for idx, cls in ((30, "nose"), (8, None)):
        x, y = lm[idx].astype(int)
        if cls:
            assert classes[y, x] == CLASS_IDS[cls]
    eye_centre = found.iris[0].astype(int)
    assert classes[eye_centre[1], eye_centre[0]] == CLASS_IDS["r_eye"]


def test_landmark_only_classes(faces):
    _, _, aligned, found, _ = faces["biden2"]
    classes = landmark_classes(found.lm68, aligned.image.shape)
    mesh_mask = face_mask(mesh_classes(found.mesh, aligned.image.shape))
    lm_mask = face_mask(classes)
    iou = (mesh_mask & lm_mask).sum() / (mesh_mask | lm_mask).sum()
    assert iou > 0.7
    with pytest.raises(ValueError, match="68"):
        landmark_classes(np.zeros((5, 2)), (64, 64))


def test_reference_adapter_round_trip(tmp_path, faces):
    """Drawings written in the authors' layout come back identical, with the dot centres as points."""
    _, _, aligned, found, _ = faces["obama1"]
    shape = aligned.image.shape
    lm_rgb = canvas_to_rgb(draw_landmarks(shape, found.lm68), (0, 255, 0))
    iris_rgb = canvas_to_rgb(draw_iris(shape, found.iris), (255, 0, 0))
    classes = mesh_classes(found.mesh, shape)
    root = tmp_path / "dataset"
    save_image(root / "n000001" / "3dmm" / "0001_01" / "0001_01_ldm68.png", lm_rgb)
    save_image(root / "n000001" / "iris" / "0001_01.png", iris_rgb)
    save_image(root / "n000001" / "segmap_intersection" / "0001_01.png", colorize(classes))
    ref = get_landmark_provider("reference", root=root)
    assert isinstance(ref, ReferenceLandmarks)
    got = ref(aligned.image, key="n000001/0001_01")
    assert np.array_equal(got.lm68_canvas, lm_rgb) and np.array_equal(got.iris_canvas, iris_rgb)
    assert np.array_equal(got.segmap_intersection, classes) and got.segmap is None  # no full segmap/ written
    # every recovered dot centre sits on a true landmark (dots may merge, so N <= 68)
    assert 30 <= len(got.lm68) <= 68
    nearest = np.min(np.linalg.norm(got.lm68[:, None] - found.lm68[None].astype(int), axis=-1), axis=1)
    assert np.all(nearest < 6)
    assert len(got.iris) >= 2
    with pytest.raises(ValueError, match="no face"):
        ref(aligned.image, key="n000001/missing")
    with pytest.raises(ValueError, match="key"):
        ref(aligned.image)


def test_blob_centroids_separates_dots():
    canvas = draw_landmarks((128, 128), np.array([[20.0, 20.0], [100.0, 30.0], [60.0, 90.0]]))
    pts = blob_centroids(canvas)
    assert np.allclose(pts, [[20, 20], [100, 30], [60, 90]], atol=0.01)


def test_provider_names():
    with pytest.raises(ValueError, match="unknown landmark provider"):
        get_landmark_provider("dlib")
    with pytest.raises(ValueError, match="root"):
        get_landmark_provider("reference")
    if importlib.util.find_spec("appleswap.faces.tddfa") is None:
        with pytest.raises(ImportError):
            get_landmark_provider("3ddfa-v3")


def test_transformed_maps_points():
    lm = FaceLandmarks(lm68=np.ones((68, 2), np.float32), iris=np.zeros((10, 2), np.float32))
    moved = lm.transformed(np.array([[2.0, 0, 1], [0, 2.0, -1]]))
    assert np.allclose(moved.lm68, [3, 1]) and np.allclose(moved.iris, [1, -1]) and moved.mesh is None
