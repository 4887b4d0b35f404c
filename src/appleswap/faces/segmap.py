"""The 19 CelebAMask-HQ face-parsing classes and the reference's colour table (docs/method.md: Preprocessing).

Every face-mask source (the BiSeNet parser, the occlusion intersection, the landmark-mesh default) produces a
class map with these ids, so condition building and the saved ``segmap*/`` pictures do not depend on the source.
Any class whose colour is not black joins the face ("blur") mask: skin, brows, eyes, glasses, ears, nose, mouth,
lips. Earrings, neck, cloth, hair and hat stay outside.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = (
    "background", "skin", "r_brow", "l_brow", "r_eye", "l_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)
CLASS_IDS = {name: index for index, name in enumerate(CLASS_NAMES)}
GLASSES = CLASS_IDS["eye_g"]

# RGB colour per class as written by the reference condition script; black = not part of the face mask
COLORS = np.array(
    [
        (0, 0, 0), (255, 0, 0), (0, 204, 204), (0, 0, 204), (255, 153, 51), (204, 0, 204), (255, 0, 255),
        (204, 0, 0), (102, 51, 0), (0, 0, 0), (76, 153, 0), (102, 204, 0), (255, 255, 0), (0, 0, 153),
        (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0),
    ],
    dtype=np.uint8,
)
FACE_CLASSES = tuple(int(i) for i in np.flatnonzero(COLORS.any(axis=1)))


def colorize(classes: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colour map in the reference palette."""
    return COLORS[classes]


def face_mask(classes: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose class is a face class (the hard, unfeathered blur mask)."""
    return np.isin(classes, FACE_CLASSES)


def classes_from_colors(segmap_rgb: np.ndarray) -> np.ndarray:
    """Invert :func:`colorize` for a reference ``segmap*/`` PNG; unknown colours (and black) become background.

    Black is ambiguous in the palette (hair, neck, ... all map to it), so only face classes are recovered.
    """
    classes = np.zeros(segmap_rgb.shape[:2], dtype=np.uint8)
    for index in FACE_CLASSES:
        classes[np.all(segmap_rgb == COLORS[index], axis=-1)] = index
    return classes
