"""Skin-tone difference: CIEDE2000 between the mean CIELAB colours of swap and target on the target's skin.

Averaging the colour before the difference scores tone (what users see as "wrong skin colour") rather than
texture, pores or identity-driven shading.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab

VERSION = "skin-de2000-1"
MIN_PIXELS = 20


def mean_lab(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(3,) mean L*a*b* of ``image`` (uint8 RGB) over ``mask``; NaN when the mask is nearly empty."""
    if mask.shape != image.shape[:2]:
        mask = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    mask = mask.astype(bool)
    if mask.sum() < MIN_PIXELS:
        return np.full(3, np.nan)
    return rgb2lab(image.astype(np.float64) / 255.0)[mask].mean(axis=0)


def skin_tone_difference(swap: np.ndarray, target: np.ndarray, skin_mask: np.ndarray) -> float:
    """CIEDE2000 of the mean skin colours (0 = identical tone; ~2.3 is a just-noticeable difference)."""
    lab_swap, lab_target = mean_lab(swap, skin_mask), mean_lab(target, skin_mask)
    if not (np.isfinite(lab_swap).all() and np.isfinite(lab_target).all()):
        return float("nan")
    return float(deltaE_ciede2000(lab_swap[None], lab_target[None])[0])
