"""5-point face alignment for the identity branch: the ArcFace 112 crop and the facexlib-style 512 crop.

Keypoints are insightface order (right eye, left eye, nose, right mouth corner, left mouth corner), in pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

# insightface's ArcFace template for a 112x112 crop
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# facexlib FaceRestoreHelper template for a 512x512 crop (crop_ratio 1), as PuLID aligns before parsing / CLIP
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float32,
)
# facexlib pads with this grey (BGR 135,133,132), given here in RGB
PAD_RGB = (132, 133, 135)


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, no reflection) mapping ``src`` points onto ``dst``; a 2x3 matrix.

    This is the estimate insightface's ``norm_crop`` uses (skimage SimilarityTransform), so ArcFace sees the
    crop it was trained on.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2:
        raise ValueError(f"similarity_lstsq: want two (N, 2) point arrays, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1
    rotation = u @ np.diag(d) @ vt
    var = (src_c ** 2).sum() / len(src)
    scale = (s * d).sum() / var if var > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def arcface_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The ArcFace input crop (size x size RGB) for 5 keypoints, as insightface ``norm_crop``."""
    template = ARCFACE_TEMPLATE_112 * (size / 112.0)
    matrix = similarity_lstsq(kps, template)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def face_crop_512(image: np.ndarray, kps: np.ndarray, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The facexlib-style aligned crop (size x size RGB, grey padding) and its 2x3 image->crop matrix."""
    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(kps, np.float32), template, method=cv2.LMEDS)
    if matrix is None:  # degenerate keypoints: fall back to the least-squares fit
        matrix = similarity_lstsq(kps, template)
    crop = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=PAD_RGB)
    return crop, matrix
