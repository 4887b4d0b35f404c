"""A face-parsing class map drawn from the 478-point MediaPipe mesh: the default, weight-free face mask.

It uses the class ids of ``faces/segmap.py`` (skin, brows, eyes, nose, mouth, lips), so condition building
treats it exactly like the BiSeNet parser's output. The face oval covers forehead to chin and cheek to cheek;
hair, neck and background are never included. Ears and glasses are not modelled (use the parser for those).
"""

from __future__ import annotations

import cv2
import numpy as np

from appleswap.faces.segmap import CLASS_IDS

# ordered vertex loops of the MediaPipe mesh (from mediapipe's face_mesh_connections edge sets)
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176,
    149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
RIGHT_EYE = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
LEFT_EYE = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)
RIGHT_BROW = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
LEFT_BROW = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
NOSE = (168, 193, 245, 188, 174, 217, 198, 209, 129, 64, 98, 97, 2, 326, 327, 294, 358, 429, 420, 437, 399,
        412, 465, 417)


def _fill(canvas: np.ndarray, points: np.ndarray, value: int, hull: bool = False) -> None:
    poly = np.rint(points).astype(np.int32)
    if hull:
        poly = cv2.convexHull(poly)
    cv2.fillPoly(canvas, [poly.reshape(-1, 1, 2)], int(value))


def mesh_classes(mesh: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) uint8 class ids (``segmap.CLASS_NAMES``) of the face drawn from a (478, 2) or (468, 2) mesh."""
    mesh = np.asarray(mesh, dtype=np.float64)
    if mesh.ndim != 2 or mesh.shape[0] < 468 or mesh.shape[1] != 2:
        raise ValueError(f"mesh_classes: expected a (478, 2) MediaPipe mesh, got {mesh.shape}")
    height, width = shape[:2]
    classes = np.zeros((height, width), dtype=np.uint8)
    _fill(classes, mesh[list(FACE_OVAL)], CLASS_IDS["skin"])
    _fill(classes, mesh[list(NOSE)], CLASS_IDS["nose"], hull=True)
    _fill(classes, mesh[list(RIGHT_BROW)], CLASS_IDS["r_brow"])
    _fill(classes, mesh[list(LEFT_BROW)], CLASS_IDS["l_brow"])
    _fill(classes, mesh[list(RIGHT_EYE)], CLASS_IDS["r_eye"])
    _fill(classes, mesh[list(LEFT_EYE)], CLASS_IDS["l_eye"])
    upper = np.concatenate([mesh[list(LIPS_OUTER_UPPER)], mesh[list(LIPS_INNER_UPPER)][::-1]])
    lower = np.concatenate([mesh[list(LIPS_OUTER_LOWER)], mesh[list(LIPS_INNER_LOWER)][::-1]])
    _fill(classes, upper, CLASS_IDS["u_lip"])
    _fill(classes, lower, CLASS_IDS["l_lip"])
    inner = np.concatenate([mesh[list(LIPS_INNER_UPPER)], mesh[list(LIPS_INNER_LOWER)][::-1][1:-1]])
    _fill(classes, inner, CLASS_IDS["mouth"])
    return classes


def landmark_classes(lm68: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Coarse class map from 68 points only (3DMM providers without a mesh): skin hull, brows, eyes, nose, lips.

    The skin region is the hull of the jaw and the brows lifted by a fifth of the face height (forehead).
    """
    lm = np.asarray(lm68, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"landmark_classes: expected (68, 2) landmarks, got {lm.shape}")
    height, width = shape[:2]
    classes = np.zeros((height, width), dtype=np.uint8)
    up = (lm[27] - lm[8]) * 0.2
    _fill(classes, np.concatenate([lm[:17], lm[17:27] + up]), CLASS_IDS["skin"], hull=True)
    _fill(classes, np.concatenate([lm[27:28], lm[31:36]]), CLASS_IDS["nose"], hull=True)
    _fill(classes, lm[36:42], CLASS_IDS["r_eye"])
    _fill(classes, lm[42:48], CLASS_IDS["l_eye"])
    _fill(classes, np.concatenate([lm[48:55], lm[60:65][::-1]]), CLASS_IDS["u_lip"])
    _fill(classes, np.concatenate([lm[54:60], lm[48:49], lm[60:61], lm[64:68][::-1]]), CLASS_IDS["l_lip"])
    _fill(classes, lm[60:68], CLASS_IDS["mouth"])
    return classes
