"""Ears estimated from the MediaPipe mesh (issue 2): placement on real photos, yaw, clipping at the image edge.

Ground truth from the pictures: biden2.jpg faces the camera; obama1.jpg is turned toward the image right (his
image-left ear is in full view, the other barely shows); obama2.jpg is turned the other way.
"""

from __future__ import annotations

import numpy as np
import pytest

from appleswap.faces.align import align_face
from appleswap.faces.detect import detect_faces
from appleswap.faces.landmarks import get_landmark_provider
from appleswap.faces.mesh_mask import FACE_OVAL, ear_polygon, ear_reach, mesh_classes
from appleswap.faces.segmap import CLASS_IDS, face_mask
from appleswap.files import load_image

L_EAR, R_EAR = CLASS_IDS["l_ear"], CLASS_IDS["r_ear"]


@pytest.fixture(scope="module")
def meshes(faces_dir):
    """name -> (aligned 512 crop, (478, 2) mesh on it)."""
    provider = get_landmark_provider("mediapipe")
    out = {}
    for name in ("biden2", "obama1", "obama2"):
        photo = load_image(faces_dir / f"{name}.jpg")
        aligned = align_face(photo, detect_faces(photo)[0].keypoints, size=512)
        out[name] = (aligned.image, provider(aligned.image).mesh)
    return out


def _oval_mask(mesh: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import cv2

    canvas = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(canvas, [np.rint(mesh[list(FACE_OVAL)]).astype(np.int32).reshape(-1, 1, 2)], 1)
    return canvas.astype(bool)


@pytest.mark.parametrize("name", ["biden2", "obama1"])
def test_ears_at_plausible_places(meshes, name):
    image, mesh = meshes[name]
    classes = mesh_classes(mesh, image.shape)
    oval = _oval_mask(mesh, image.shape)
    width = float(np.linalg.norm(mesh[454] - mesh[234]))
    brow_y, mouth_y = mesh[[105, 334]][:, 1].mean(), mesh[[61, 291]][:, 1].mean()
    for ear, side in ((L_EAR, -1), (R_EAR, 1)):
        ys, xs = np.nonzero(classes == ear)
        assert len(xs) > 200, (name, ear)  # both ears show on these faces
        assert not oval[ys, xs].any()  # outside the face oval, never over the face
        assert brow_y - 0.1 * width < ys.mean() < mouth_y, (name, ear)  # eye-to-mouth height
        assert ys.min() > mesh[10, 1] and ys.max() < mesh[152, 1]  # below the forehead top, above the chin
        tragus = mesh[234 if side < 0 else 454]
        assert side * (xs.mean() - tragus[0]) > 0, (name, ear)  # outward of its own tragus
        assert np.abs(xs - tragus[0]).max() < 0.4 * width, (name, ear)  # not far out into the background
    assert face_mask(classes)[classes == L_EAR].all()  # ears join the face (blur) mask
    for corner in ((0, 0), (0, 511), (511, 0), (511, 511), (256, 5), (256, 506)):
        assert classes[corner] == 0


def test_far_ear_shrinks_with_yaw(meshes):
    areas = {}
    for name, (image, mesh) in meshes.items():
        classes = mesh_classes(mesh, image.shape)
        areas[name] = ((classes == L_EAR).sum(), (classes == R_EAR).sum())
    frontal = areas["biden2"][1] / areas["biden2"][0]
    assert 0.5 < frontal < 2.0
    assert areas["obama1"][1] / areas["obama1"][0] < 0.3 * frontal  # turned to the image right: right ear hides
    assert areas["obama2"][0] / areas["obama2"][1] < 0.3 / frontal  # turned the other way
    reach = ear_reach(meshes["obama1"][1])
    assert reach["l_ear"] > ear_reach(meshes["biden2"][1])["l_ear"] > reach["r_ear"]  # near ear grows


def test_yaw_is_mirror_symmetric_and_hides_the_far_ear(meshes):
    image, mesh = meshes["biden2"]
    mirrored = mesh.copy()
    mirrored[:, 0] = image.shape[1] - 1 - mesh[:, 0]
    # mirroring swaps the sides, and the vertex pairs swap with them (234 <-> 454)
    swapped = mirrored.copy()
    swapped[[234, 454]] = mirrored[[454, 234]]
    a, b = ear_reach(mesh), ear_reach(swapped)
    assert a["l_ear"] == pytest.approx(b["r_ear"]) and a["r_ear"] == pytest.approx(b["l_ear"])
    turned = mesh.copy()
    turned[1] = mesh[454] + 0.05 * (mesh[234] - mesh[454])  # nose tip next to the image-right tragus
    reach = ear_reach(turned)
    assert reach["r_ear"] == 0.0 and ear_polygon(turned, "r_ear", reach["r_ear"]) is None
    classes = mesh_classes(turned, image.shape)
    assert not (classes == R_EAR).any() and (classes == L_EAR).sum() > (mesh_classes(mesh, image.shape) == L_EAR).sum()


def test_mask_stays_inside_the_image(meshes):
    image, mesh = meshes["biden2"]
    width = float(np.linalg.norm(mesh[454] - mesh[234]))
    shifted = mesh - np.array([mesh[234, 0] + 0.1 * width, 0.0])  # image-left ear entirely off the left edge
    classes = mesh_classes(shifted, image.shape)
    assert classes.shape == image.shape[:2]
    assert not (classes == L_EAR).any() and (classes == R_EAR).any()
    small = mesh_classes(mesh / 4, (128, 128))  # the same face in a small crop
    assert small.shape == (128, 128) and (small == L_EAR).any() and (small == R_EAR).any()


def test_ears_can_be_left_out(meshes):
    image, mesh = meshes["biden2"]
    with_ears, without = mesh_classes(mesh, image.shape), mesh_classes(mesh, image.shape, ears=False)
    ears = np.isin(with_ears, (L_EAR, R_EAR))
    assert ears.any() and not np.isin(without, (L_EAR, R_EAR)).any()
    assert np.array_equal(with_ears[~ears], without[~ears]) and not without[ears].any()
