"""Temporal flicker of a swapped video: frame-to-frame luminance change that the target video does not have.

flicker_t = mean over the face mask of | (S_t - S_{t-1}) - (T_t - T_{t-1}) | on L* (0-100). Motion present in the
target cancels out, so what remains is change the swapper added (identity shimmer, texture boiling). Without a
target video the raw temporal change of the swap is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.color import rgb2lab

VERSION = "flicker-1"


def _luminance(frame: np.ndarray) -> np.ndarray:
    return rgb2lab(frame.astype(np.float64) / 255.0)[..., 0]


def flicker_scores(swapped: Sequence[np.ndarray], target: Sequence[np.ndarray] | None = None,
                   masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """(T - 1,) per-transition flicker scores; frames are uint8 RGB of equal size, masks (H, W) bool."""
    if len(swapped) < 2:
        raise ValueError("flicker_scores: need at least 2 swapped frames")
    if target is not None and len(target) != len(swapped):
        raise ValueError(f"flicker_scores: {len(swapped)} swapped frames but {len(target)} target frames")
    scores = []
    previous_s = _luminance(swapped[0])
    previous_t = _luminance(target[0]) if target is not None else None
    for index in range(1, len(swapped)):
        current_s = _luminance(swapped[index])
        change = current_s - previous_s
        if target is not None:
            current_t = _luminance(target[index])
            change = change - (current_t - previous_t)
            previous_t = current_t
        mask = masks[index].astype(bool) if masks is not None else np.ones(change.shape, dtype=bool)
        scores.append(float(np.abs(change[mask]).mean()) if mask.any() else float("nan"))
        previous_s = current_s
    return np.asarray(scores)
