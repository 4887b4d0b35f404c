"""Face parsing for the identity branch: PuLID's "grey face on white" CLIP input and face masks for masked IDs.

PuLID parses the aligned 512 crop with facexlib's BiSeNet, paints {background, cloth, hat, ears, earring, neck,
necklace} white and turns everything else grey. We use the project's BiSeNet ``FaceParser`` when a parsing
checkpoint is available (``source='bisenet'``); without one the class map comes from the MediaPipe mesh
(``'mediapipe-mesh'``), and if the mesh finds no face, from an ellipse fitted to the 5-point template
(``'template-ellipse'``). The source is recorded in identity metadata so mixed caches can be told apart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from appleswap.faces.segmap import CLASS_IDS, face_mask

log = logging.getLogger(__name__)

# PuLID's bg_label set (facexlib ids equal ours): background, l_ear, r_ear, earring, neck, neck_l, cloth, hat
PULID_WHITE_CLASSES = (0, 7, 8, 9, 14, 15, 16, 18)


class FaceRegion:
    """``classes(crop) -> ((H, W) uint8 class ids, source)`` on an aligned face crop."""

    def __init__(self, parser_path: str | Path | None = None, device: str = "cpu") -> None:
        self.parser = None
        self._mesh = None
        if parser_path is not None:
            from appleswap.faces.parsing import FaceParser

            self.parser = FaceParser.from_file(parser_path, device)
        self.source = "bisenet" if self.parser is not None else "mediapipe-mesh"

    def classes(self, crop: np.ndarray) -> tuple[np.ndarray, str]:
        if self.parser is not None:
            return self.parser.parse(crop), "bisenet"
        try:
            return self._mesh_classes(crop), "mediapipe-mesh"
        except (ImportError, ValueError) as error:
            log.debug("mesh mask unavailable (%s); using the template ellipse", error)
            return template_ellipse_classes(crop.shape[:2]), "template-ellipse"

    def _mesh_classes(self, crop: np.ndarray) -> np.ndarray:
        from appleswap.faces.landmarks import MediaPipeLandmarker
        from appleswap.faces.mesh_mask import mesh_classes

        if self._mesh is None:
            self._mesh = MediaPipeLandmarker()
        return mesh_classes(self._mesh.mesh(crop), crop.shape)


def template_ellipse_classes(shape: tuple[int, int]) -> np.ndarray:
    """A skin ellipse where the 5-point template puts the face in an aligned crop (last-resort mask)."""
    height, width = shape
    classes = np.zeros((height, width), dtype=np.uint8)
    center = (round(width * 0.5), round(height * 0.56))
    axes = (round(width * 0.28), round(height * 0.36))
    cv2.ellipse(classes, center, axes, 0, 0, 360, int(CLASS_IDS["skin"]), -1)
    return classes


def gray_face_image(crop: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """PuLID's CLIP input: float32 (H, W, 3) in [0, 1], white on the non-face classes, luma grey elsewhere."""
    rgb = crop.astype(np.float32) / 255.0
    gray = rgb[..., 0:1] * 0.299 + rgb[..., 1:2] * 0.587 + rgb[..., 2:3] * 0.114
    white = np.isin(classes, PULID_WHITE_CLASSES)[..., None]
    return np.where(white, np.float32(1.0), np.repeat(gray, 3, axis=2)).astype(np.float32)


def crop_mask_to_image(mask: np.ndarray, matrix: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Warp a (S, S) bool crop mask back into the (H, W) image through the inverse of the 2x3 crop matrix."""
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    height, width = image_shape[:2]
    back = cv2.warpAffine(mask.astype(np.uint8) * 255, inverse, (width, height), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return back > 127


def face_classes_mask(classes: np.ndarray) -> np.ndarray:
    """The reference's face region (skin, brows, eyes, glasses, ears, nose, mouth, lips) as (H, W) bool."""
    return face_mask(classes)


def apply_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image * mask``: the reference blacks out hair, background and occluders before masked ID extraction."""
    if mask.shape[:2] != image.shape[:2]:
        raise ValueError(f"mask {mask.shape[:2]} does not match image {image.shape[:2]}")
    if mask.dtype == np.bool_:
        return image * mask[..., None].astype(np.uint8)
    weight = mask.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32) * weight[..., None] + 0.5, 0, 255).astype(np.uint8)


def load_mask(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """A dataset ``mask_intersection/*.png`` (0/255, grey or RGB) as uint8 (H, W) resized to ``shape``."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as handle:
            mask = np.asarray(handle.convert("L"))
    except OSError as error:
        raise ValueError(f"{path}: not a readable mask image ({error})") from error
    if mask.shape != tuple(shape[:2]):
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask
