"""The teacher's condition image, drawn exactly as the reference scripts draw it (docs/method.md: Preprocessing).

C = target outside the face mask, an 8x8 Lanczos low-frequency copy of the whole target inside it
("blur", the deblurring condition) or black ("black", the inpainting baseline); white 68-landmark dots,
red iris dots on top, and a 10 % magenta tint on glasses pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw

from appleswap.faces.points import FaceLandmarks
from appleswap.faces.segmap import GLASSES, face_mask

CONDITION_DIRS = {
    "blur": "condition_blended_image_blurdownsample8_segGlass_landmark_iris",
    "black": "condition_blended_image_mask_segGlass_landmark_iris",
}
LANDMARK_COLOR = (0, 255, 0)  # green, as 3DDFA-V3 saves it; readers treat any non-zero pixel as a dot
IRIS_COLOR = (255, 0, 0)
GLASSES_TINT = (255, 0, 255)


def landmark_radius(shape: tuple[int, ...]) -> int:
    """The reference's dot radius: max(int(min(H, W) / 200), 1) (2 px at 512)."""
    return max(int(min(shape[0], shape[1]) / 200), 1)


def draw_landmarks(shape: tuple[int, ...], lm68: np.ndarray) -> np.ndarray:
    """(H, W) uint8 canvas (255 on dots): cv2 circles, radius r, thickness 2r, at integer-truncated points."""
    height, width = shape[:2]
    canvas = np.zeros((height, width), dtype=np.uint8)
    radius = landmark_radius(shape)
    for x, y in np.asarray(lm68, dtype=np.float64):
        if np.isfinite(x) and np.isfinite(y):
            cv2.circle(canvas, (int(x), int(y)), radius, 255, 2 * radius)
    return canvas


def draw_iris(shape: tuple[int, ...], iris: np.ndarray) -> np.ndarray:
    """(H, W) uint8 canvas (255 on dots): PIL filled ellipses with box (x-2, y-2, x+2, y+2) at rounded points."""
    height, width = shape[:2]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for x, y in np.rint(np.asarray(iris, dtype=np.float64)):
        if np.isfinite(x) and np.isfinite(y):
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=255)
    return np.asarray(canvas, dtype=np.uint8).copy()


def canvas_to_rgb(canvas: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """A mono canvas as the coloured RGB drawing the reference saves (``_ldm68.png`` green, ``iris/`` red)."""
    rgb = np.zeros(canvas.shape[:2] + (3,), dtype=np.uint8)
    rgb[canvas > 0] = color
    return rgb


def lowfreq_copy(image: np.ndarray, size: int = 8) -> np.ndarray:
    """The whole image resized to size x size and back with PIL Lanczos (keeps global colour and light only)."""
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((size, size), Image.LANCZOS)
    return np.asarray(small.resize((width, height), Image.LANCZOS), dtype=np.uint8)


def _nonzero(canvas: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if canvas is None:
        return np.zeros(shape[:2], dtype=bool)
    canvas = np.asarray(canvas)
    if canvas.shape[:2] != tuple(shape[:2]):
        raise ValueError(f"canvas shape {canvas.shape[:2]} does not match the image {tuple(shape[:2])}")
    return canvas.reshape(shape[0], shape[1], -1).sum(axis=-1) > 0


def build_condition(
    image: np.ndarray, classes: np.ndarray, landmark_canvas: np.ndarray | None, iris_canvas: np.ndarray | None,
    fill: str = "blur", downsample: int = 8,
) -> np.ndarray:
    """The condition image for target ``image`` given its (intersection) class map and the two drawings."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"build_condition: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if classes.shape != image.shape[:2]:
        raise ValueError(f"build_condition: classes shape {classes.shape} does not match image {image.shape[:2]}")
    if fill == "blur":
        degraded = lowfreq_copy(image, downsample)
    elif fill == "black":
        degraded = np.zeros_like(image)
    else:
        raise ValueError(f"build_condition: fill must be 'blur' or 'black', got {fill!r}")
    mask = face_mask(classes)
    condition = np.where(mask[..., None], degraded, image)
    condition[_nonzero(landmark_canvas, image.shape)] = 255
    condition[_nonzero(iris_canvas, image.shape)] = IRIS_COLOR
    glasses = classes == GLASSES
    if glasses.any():
        tint = np.zeros_like(condition)
        tint[glasses] = GLASSES_TINT
        tinted = cv2.addWeighted(condition, 0.9, tint, 0.1, 0)
        condition[glasses] = tinted[glasses]
    return condition


def intersect_classes(classes: np.ndarray, visible: np.ndarray | None) -> np.ndarray:
    """Class map with every pixel the occlusion model does not see as face set to background (docs/method.md)."""
    if visible is None:
        return classes
    if visible.shape != classes.shape:
        raise ValueError(f"occlusion mask shape {visible.shape} does not match the class map {classes.shape}")
    return np.where(visible, classes, 0).astype(np.uint8)


def landmark_canvases(shape: tuple[int, ...], landmarks: FaceLandmarks) -> tuple[np.ndarray, np.ndarray | None]:
    """The landmark and iris drawings of the condition for ``landmarks`` on an image of ``shape``: the reference's
    own drawings when the landmarks came from them, else drawn here (iris None when there are no iris points)."""
    lm_canvas = landmarks.lm68_canvas
    if lm_canvas is None:
        lm_canvas = canvas_to_rgb(draw_landmarks(shape, landmarks.lm68), LANDMARK_COLOR)
    iris_canvas = landmarks.iris_canvas
    if iris_canvas is None and landmarks.iris is not None:
        iris_canvas = canvas_to_rgb(draw_iris(shape, landmarks.iris), IRIS_COLOR)
    return lm_canvas, iris_canvas


def teacher_condition(image: np.ndarray, classes: np.ndarray, landmarks: FaceLandmarks,
                      fill: str = "blur") -> np.ndarray:
    """The teacher's condition image for ``image``: its (intersection) class map and its own landmarks and iris
    (docs/method.md, "Preprocessing"). The preprocess runner and the teacher swap both build it here."""
    lm_canvas, iris_canvas = landmark_canvases(image.shape, landmarks)
    return build_condition(image, classes, lm_canvas, iris_canvas, fill=fill)
