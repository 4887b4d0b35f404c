"""Face class maps for the metrics: the BiSeNet parser when its weights are given, else a MediaPipe-mesh map.

Both produce ids from ``appleswap.faces.segmap`` so every metric selects regions the same way. The mesh map
knows only skin (the face oval), eyes and lips; identity masking then keeps the whole oval.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from appleswap.face_metrics.mesh import FACE_OVAL
from appleswap.faces.segmap import CLASS_IDS

log = logging.getLogger(__name__)

# REFace's FFHQ identity mask: skin, brows, eyes, ears, nose, mouth, lips (no glasses, earrings, hair, neck)
ID_CLASSES = tuple(CLASS_IDS[n] for n in ("skin", "r_brow", "l_brow", "r_eye", "l_eye", "l_ear", "r_ear", "nose",
                                         "mouth", "u_lip", "l_lip"))
SKIN_CLASSES = (CLASS_IDS["skin"],)
RIGHT_EYE_RING = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
LEFT_EYE_RING = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)
LIPS_RING = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
NOSE_RING = (168, 193, 245, 188, 174, 198, 209, 49, 64, 98, 97, 2, 326, 327, 294, 279, 429, 420, 399, 412, 465,
             417)


def mesh_classes(mesh: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 class map drawn from the mesh: oval = skin, then nose, eyes and lips on top."""
    classes = np.zeros(shape[:2], dtype=np.uint8)
    if mesh is None:
        return classes
    layers = ((FACE_OVAL, "skin"), (NOSE_RING, "nose"), (RIGHT_EYE_RING, "r_eye"), (LEFT_EYE_RING, "l_eye"),
              (LIPS_RING, "u_lip"))
    for ring, name in layers:
        polygon = np.round(mesh[list(ring), :2]).astype(np.int32)
        cv2.fillPoly(classes, [polygon], CLASS_IDS[name])
    return classes


class FaceMasker:
    """``classes(image, mesh)`` from the parser (``appleswap.faces.parsing.FaceParser``) or from the mesh."""

    def __init__(self, parser_weights: str | Path | None = None, device: str = "cpu") -> None:
        self.parser = None
        self.source = "mesh"
        if parser_weights:
            from appleswap.faces.parsing import FaceParser

            self.parser = FaceParser.from_file(parser_weights, device)
            self.source = "parser"

    @property
    def version(self) -> str:
        return f"classes-{self.source}-1"

    def classes(self, image: np.ndarray, mesh: np.ndarray | None) -> np.ndarray:
        if self.parser is not None:
            result = np.asarray(self.parser.parse(image), dtype=np.uint8)
            if result.shape != image.shape[:2]:
                result = cv2.resize(result, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
            return result
        return mesh_classes(mesh, image.shape[:2])


def select(classes: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
    return np.isin(classes, ids)

