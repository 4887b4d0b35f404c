"""A face-parsing class map drawn from the 478-point MediaPipe mesh: the default, weight-free face mask.

It uses the class ids of ``faces/segmap.py`` (skin, brows, eyes, nose, mouth, lips, ears), so condition
building treats it exactly like the BiSeNet parser's output. The face oval covers forehead to chin and cheek to
cheek; hair, neck and background are never included. Glasses are not modelled (use the parser for those).

The mesh has no ear vertices, so each ear is estimated: an egg shape (wider helix, narrower lobe) attached
outside the oval at the tragus vertex (234 on the image-left side, 454 on the image-right side), spanning brow
to just below the nose, its width scaled by face size and head yaw. Yaw comes from the oval's asymmetry (where
the nose tip falls between the two tragus vertices): the near ear widens, the far ear narrows and vanishes
behind the head. Side convention: the reference renamed CelebAMask-HQ's ids 2/4 (``l_brow``/``l_eye`` there)
to ``r_brow``/``r_eye`` (the subject's right, image left) but kept id 7 as ``l_ear``; we take all three as the
same image-left part, so ``l_ear`` (7) is drawn on the image-left side, next to ``r_brow`` (2) and ``r_eye``
(4). Both ear ids are face classes, so the face mask does not depend on this choice, only the colour does.
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
NOSE_TIP, NOSE_BASE = 1, 2
# ear class -> (tragus vertex: the widest face-oval point, in front of that ear; the brow on the same side)
EARS = {"l_ear": (234, RIGHT_BROW), "r_ear": (454, LEFT_BROW)}
EAR_WIDTH = 0.13  # outward reach of a frontal ear, as a fraction of the tragus-to-tragus face width
EAR_NEAR_GAIN = 0.45  # extra reach per unit of oval asymmetry on the near side (the ear turns toward the camera)
EAR_HIDDEN_AT = 0.1  # the far ear is gone when the nose tip is this close (fraction of the width) to its tragus


def _fill(canvas: np.ndarray, points: np.ndarray, value: int, hull: bool = False) -> None:
    poly = np.rint(points).astype(np.int32)
    if hull:
        poly = cv2.convexHull(poly)
    cv2.fillPoly(canvas, [poly.reshape(-1, 1, 2)], int(value))


def _face_frame(mesh: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Origin (image-left tragus), unit axes across (image left to right) and down the face, and the face width."""
    origin, right = mesh[EARS["l_ear"][0]], mesh[EARS["r_ear"][0]]
    across = right - origin
    width = float(np.hypot(*across))
    if width < 1e-6:
        raise ValueError("mesh_classes: degenerate mesh (both tragus vertices coincide)")
    across = across / width
    return origin, across, np.array([-across[1], across[0]]), width


def ear_reach(mesh: np.ndarray) -> dict[str, float]:
    """How far each ear sticks out of the face oval, as a fraction of the face width (0 = hidden by yaw).

    The nose tip sits halfway between the tragus vertices on a frontal face and moves toward the far side as
    the head turns; the half of the face that grows is the near side, whose ear turns toward the camera.
    """
    mesh = np.asarray(mesh, dtype=np.float64)
    origin, across, _, width = _face_frame(mesh)
    nose = float(np.dot(mesh[NOSE_TIP] - origin, across)) / width
    reach = {}
    for name, side in (("l_ear", nose), ("r_ear", 1.0 - nose)):
        visible = float(np.clip((side - EAR_HIDDEN_AT) / (0.5 - EAR_HIDDEN_AT), 0.0, 1.0))
        reach[name] = min(EAR_WIDTH * visible + EAR_NEAR_GAIN * max(side - 0.5, 0.0), 2.5 * EAR_WIDTH)
    return reach


def ear_polygon(mesh: np.ndarray, name: str, reach: float, points: int = 24) -> np.ndarray | None:
    """(N, 2) outline of one ear: half an egg outward from the tragus, brow to below the nose; None if hidden.

    The straight inner edge lies a little inside the oval, so the skin drawn over it leaves no gap.
    """
    if reach < 0.01:
        return None
    mesh = np.asarray(mesh, dtype=np.float64)
    origin, across, down, width = _face_frame(mesh)
    tragus, brow = EARS[name]
    outward = -1.0 if name == "l_ear" else 1.0
    top = float(np.dot(mesh[list(brow)].mean(axis=0) - origin, down))
    bottom = float(np.dot(mesh[NOSE_BASE] - origin, down)) + 0.1 * width
    if bottom <= top:
        return None
    inner = float(np.dot(mesh[tragus] - origin, across)) - outward * 0.08 * width
    angle = np.linspace(-np.pi / 2, np.pi / 2, points)
    lobe = 1.0 - 0.35 * np.clip(np.sin(angle), 0.0, None)  # narrower toward the lobe (down the face)
    u = inner + outward * (reach + 0.08) * width * np.cos(angle) * lobe
    v = (top + bottom) / 2 + (bottom - top) / 2 * np.sin(angle)
    return origin + u[:, None] * across + v[:, None] * down


def mesh_classes(mesh: np.ndarray, shape: tuple[int, ...], ears: bool = True) -> np.ndarray:
    """(H, W) uint8 class ids (``segmap.CLASS_NAMES``) of the face drawn from a (478, 2) or (468, 2) mesh.

    ``ears=False`` leaves the estimated ears out (background), e.g. for a paste-back mask.
    """
    mesh = np.asarray(mesh, dtype=np.float64)
    if mesh.ndim != 2 or mesh.shape[0] < 468 or mesh.shape[1] != 2:
        raise ValueError(f"mesh_classes: expected a (478, 2) MediaPipe mesh, got {mesh.shape}")
    height, width = shape[:2]
    classes = np.zeros((height, width), dtype=np.uint8)
    if ears:
        for name, reach in ear_reach(mesh).items():
            outline = ear_polygon(mesh, name, reach)
            if outline is not None:
                _fill(classes, outline, CLASS_IDS[name])
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
