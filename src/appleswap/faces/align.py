"""FFHQ-style face alignment to a square crop, and pasting a (swapped) crop back into the photo.

The crop follows the FFHQ recipe: an oriented square around the eyes and the mouth centre. The result keeps
the 2x3 similarity matrix (original -> aligned pixels) so a swap can be pasted back. Where the square leaves
the photo, the crop is filled FFHQ-style (reflection, blurred and faded to the median colour with distance)
instead of failing.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass
class AlignedFace:
    image: np.ndarray  # (size, size, 3) uint8
    matrix: np.ndarray  # (2, 3) float64, original pixels -> aligned pixels
    size: int
    padded: bool = False  # the crop reached outside the photo and was filled


def _eyes_mouth(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subject's right eye, left eye and mouth centre from 5 keypoints, 68 landmarks or a 478-point mesh."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape == (5, 2):
        return points[0], points[1], (points[3] + points[4]) / 2
    if points.shape == (68, 2):
        return points[36:42].mean(0), points[42:48].mean(0), (points[48] + points[54]) / 2
    if points.shape[0] >= 468 and points.shape[1] == 2:
        from appleswap.faces.landmarks import mesh_to_lm68

        return _eyes_mouth(mesh_to_lm68(points[:478]))
    raise ValueError(f"align_face: keypoints must be (5, 2), (68, 2) or (478, 2), got {points.shape}")


def ffhq_quad(points: np.ndarray) -> np.ndarray:
    """The FFHQ crop square (4, 2): top-left, bottom-left, bottom-right, top-right corners in the photo."""
    right_eye, left_eye, mouth = _eyes_mouth(points)
    eye_avg = (right_eye + left_eye) / 2
    eye_to_eye = left_eye - right_eye
    eye_to_mouth = mouth - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1, 1])
    norm = np.hypot(*x)
    if norm < 1e-6:
        raise ValueError("align_face: degenerate keypoints (eyes and mouth coincide)")
    x = x / norm * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * np.array([-1, 1])
    centre = eye_avg + eye_to_mouth * 0.1
    return np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])


def quad_matrix(quad: np.ndarray, size: int) -> np.ndarray:
    """2x3 similarity taking the quad's corners to the crop's outer pixel edges."""
    src = quad[:3].astype(np.float32)
    dst = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]], dtype=np.float32)
    return cv2.getAffineTransform(src, dst).astype(np.float64)


def invert_matrix(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def align_face(image: np.ndarray, keypoints_or_landmarks: np.ndarray, size: int = 512) -> AlignedFace:
    """Crop ``image`` FFHQ-style to ``size`` x ``size`` using 5 keypoints, 68 landmarks or the 478 mesh."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"align_face: expected an (H, W, 3) image, got {image.shape}")
    if size < 8:
        raise ValueError(f"align_face: size must be >= 8, got {size}")
    quad = ffhq_quad(keypoints_or_landmarks)
    matrix = quad_matrix(quad, size)
    source, pre = _prescale(image, matrix)
    warp = matrix @ np.linalg.inv(np.vstack([pre, [0, 0, 1]]))  # small image -> crop
    crop = cv2.warpAffine(source, warp, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    padded = _outside(quad, image.shape)
    if padded:
        crop = _fill_outside(crop, warp, source.shape, size)
    return AlignedFace(image=crop, matrix=matrix, size=size, padded=padded)


def _prescale(image: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area-downscale large faces before warping (anti-aliasing); returns the image and its 2x3 from the original."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale >= 0.5:
        return image, np.array([[1.0, 0, 0], [0, 1.0, 0]])
    shrink = 1.0 / (2 * scale)  # keep twice the output resolution for the cubic warp
    height, width = image.shape[:2]
    new_w, new_h = max(round(width * shrink), 1), max(round(height * shrink), 1)
    small = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    sx, sy = new_w / width, new_h / height
    return small, np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]])


def _outside(quad: np.ndarray, shape: tuple[int, ...]) -> bool:
    height, width = shape[:2]
    return bool(quad[:, 0].min() < 0 or quad[:, 1].min() < 0 or quad[:, 0].max() > width - 1
                or quad[:, 1].max() > height - 1)


def _fill_outside(crop: np.ndarray, warp: np.ndarray, source_shape: tuple[int, ...], size: int) -> np.ndarray:
    """FFHQ padding: the reflected content is blurred and faded to the median colour away from the photo."""
    height, width = source_shape[:2]
    inverse = invert_matrix(warp)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    outside = np.maximum.reduce([-sx, sx - (width - 1), -sy, sy - (height - 1)])  # < 0 inside, source px
    scale = float(np.sqrt(abs(np.linalg.det(warp[:, :2]))))
    pad = max(float(outside.max()), 3.0 / scale)
    ramp = (outside / pad).astype(np.float32)[..., None]
    sigma = max(size * 0.02, 1.0)  # FFHQ blurs by 2% of the quad size
    data = crop.astype(np.float32)
    blurred = cv2.GaussianBlur(data, (0, 0), sigma)
    data += (blurred - data) * np.clip(ramp * 3.0 + 1.0, 0.0, 1.0)
    median = np.median(data.reshape(-1, 3), axis=0)
    data += (median - data) * np.clip(ramp, 0.0, 1.0)
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def paste_back(
    frame: np.ndarray, face_image: np.ndarray, matrix: np.ndarray, mask: np.ndarray | None = None,
    feather: float = 0.04,
) -> np.ndarray:
    """Warp ``face_image`` (aligned crop) back into a copy of ``frame`` through the inverse of ``matrix``.

    ``mask`` ((size, size), bool or [0, 1]) limits what is pasted (default: the whole crop); its edge is
    feathered by ``feather`` x size pixels inside the mask, so every pixel outside it is exactly ``frame``.
    """
    size = face_image.shape[0]
    if face_image.shape[:2] != (size, size):
        raise ValueError(f"paste_back: face_image must be square, got {face_image.shape}")
    alpha = np.ones((size, size), np.float32) if mask is None else np.asarray(mask, dtype=np.float32)
    if alpha.shape != (size, size):
        raise ValueError(f"paste_back: mask shape {alpha.shape} does not match the face ({size}, {size})")
    radius = max(round(feather * size), 0)
    if radius > 0:
        alpha = alpha.copy()
        alpha[[0, -1], :] = 0
        alpha[:, [0, -1]] = 0
        # erode by radius + 1, then a blur whose kernel reaches radius: alpha stays 0 outside the mask
        alpha = cv2.erode(alpha, np.ones((2 * radius + 3, 2 * radius + 3), np.uint8))
        alpha = cv2.GaussianBlur(alpha, (2 * radius + 1, 2 * radius + 1), radius / 2.0)
    height, width = frame.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(face_image, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    alpha_back = cv2.warpAffine(alpha, matrix, (width, height), flags=flags, borderValue=0)
    alpha_back = np.clip(alpha_back, 0.0, 1.0)[..., None]
    blended = frame.astype(np.float32) * (1 - alpha_back) + warped.astype(np.float32) * alpha_back
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.where(alpha_back > 0, result, frame)
