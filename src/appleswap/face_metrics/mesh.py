"""MediaPipe face-mesh points for the metrics: the embedded, no-download landmark source.

The mesh model ships inside the mediapipe wheel, so the fallbacks (PnP pose, mesh expression, iris gaze, mesh face
mask, 5-point alignment for the recognisers) work with no weight file at all. One mesh per image is computed once
and cached by the runner like any other feature.
"""

from __future__ import annotations

import logging
import threading

import cv2
import numpy as np

log = logging.getLogger(__name__)

# mesh vertices used by the metrics (MediaPipe canonical mesh indices)
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176,
             149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
# per eye: outer corner, inner corner, upper lid, lower lid, iris centre (subject's right eye = image left)
RIGHT_EYE = (33, 133, 159, 145, 468)
LEFT_EYE = (263, 362, 386, 374, 473)
NOSE_TIP, MOUTH_RIGHT, MOUTH_LEFT = 1, 61, 291
NUM_POINTS = 478

_LOCK = threading.Lock()
_MESH = None


def _face_mesh():
    """One static-image FaceMesh per process (building it costs ~100 ms)."""
    global _MESH
    if _MESH is None:
        from appleswap.native_logs import QuietGraph, import_mediapipe

        face_mesh = import_mediapipe().solutions.face_mesh
        _MESH = QuietGraph(lambda: face_mesh.FaceMesh(static_image_mode=True, max_num_faces=4,
                                                      refine_landmarks=True, min_detection_confidence=0.3))
    return _MESH


def face_mesh_points(image: np.ndarray) -> np.ndarray | None:
    """(478, 3) float32 mesh points of the largest face: x, y in pixels, z in pixel units (MediaPipe scale).

    Returns None when no face is found, so a metric can record a miss instead of failing the whole run.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    with _LOCK:
        result = _face_mesh().process(np.ascontiguousarray(image))
    if not result.multi_face_landmarks:
        return None
    faces = [np.array([(p.x * width, p.y * height, p.z * width) for p in face.landmark], dtype=np.float32)
             for face in result.multi_face_landmarks]
    return max(faces, key=lambda pts: float(np.ptp(pts[:, 0]) * np.ptp(pts[:, 1])))


def five_points(mesh: np.ndarray) -> np.ndarray:
    """(5, 2) insightface-order keypoints from a mesh: right eye, left eye (iris centres), nose, mouth corners."""
    return np.stack([mesh[468, :2], mesh[473, :2], mesh[NOSE_TIP, :2], mesh[MOUTH_RIGHT, :2],
                     mesh[MOUTH_LEFT, :2]]).astype(np.float32)


def mesh_face_mask(mesh: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of the face oval polygon (forehead to chin, ears excluded)."""
    mask = np.zeros(shape, dtype=np.uint8)
    polygon = np.round(mesh[list(FACE_OVAL), :2]).astype(np.int32)
    cv2.fillPoly(mask, [polygon], 1)
    return mask.astype(bool)
