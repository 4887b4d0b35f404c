"""Lighting difference: low-frequency luminance fields of swap and target on the target's face, compared.

A quadratic surface in image coordinates (1, x, y, x^2, xy, y^2) fitted to L* over the skin captures the
direction and falloff of the light (what spherical harmonics of order <= 2 capture on a frontal face) while
ignoring identity detail. The score is the RMS difference of the two fitted fields over the mask, in L* units.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.color import rgb2lab

VERSION = "lighting-quad-1"
MIN_PIXELS = 30


def _design(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    x = xs / max(mask.shape[1] - 1, 1) * 2 - 1
    y = ys / max(mask.shape[0] - 1, 1) * 2 - 1
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)


def luminance_field(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Fitted L* values at the mask pixels (None when the mask is too small)."""
    if mask.shape != image.shape[:2]:
        mask = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    mask = mask.astype(bool)
    if mask.sum() < MIN_PIXELS:
        return None
    luminance = rgb2lab(image.astype(np.float64) / 255.0)[..., 0][mask]
    design = _design(mask)
    coefficients = np.linalg.lstsq(design, luminance, rcond=None)[0]
    return design @ coefficients


def lighting_difference(swap: np.ndarray, target: np.ndarray, face_mask: np.ndarray) -> float:
    """RMS (L* units) between the low-frequency luminance of swap and target over the target's face mask."""
    field_swap, field_target = luminance_field(swap, face_mask), luminance_field(target, face_mask)
    if field_swap is None or field_target is None:
        return float("nan")
    return float(np.sqrt(np.mean((field_swap - field_target) ** 2)))
