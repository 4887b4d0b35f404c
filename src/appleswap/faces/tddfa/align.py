"""The Deep3DFaceRecon-style 5-point alignment to the 224x224 crop, and the way back to image pixels.

Only a scale and a translation are fitted (least squares of the 5 image points against the 5 standard 3D points of
``similarity_Lm3D_all.mat``); the crop is never rotated. ``trans_params`` = (w0, h0, s, tx, ty) as in the reference.
Image y is flipped (``H - 1 - y``) before fitting, exactly like the reference ``face_box``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TARGET_SIZE = 224
RESCALE_FACTOR = 102.0
FIVE_FROM_106 = (74, 83, 54, 84, 90)  # eye, eye, nose tip, mouth corner, mouth corner in the 106-point layout
MAX_SCALED_SIDE = 16384  # refuse alignments that would upscale the photo past this (degenerate landmarks)


def load_lm3d(path: str | Path) -> np.ndarray:
    """The 5 standard 3D points (5, 3) from ``similarity_Lm3D_all.mat`` (68 points under key ``lm``)."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"similarity_Lm3D_all.mat not found: {path}")
    data = loadmat(str(path))
    if "lm" not in data or np.asarray(data["lm"]).shape != (68, 3):
        raise ValueError(f"{path}: expected a (68, 3) array under key 'lm'")
    return five_from_68(np.asarray(data["lm"], dtype=np.float64))


def five_from_68(lm: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners from 68 points, ordered (eye, eye, nose, mouth, mouth)."""
    idx = np.array([31, 37, 40, 43, 46, 49, 55]) - 1
    five = np.stack([lm[idx[0]], lm[idx[[1, 2]]].mean(0), lm[idx[[3, 4]]].mean(0), lm[idx[5]], lm[idx[6]]], axis=0)
    return five[[1, 2, 0, 3, 4]]


def fit_scale_translation(points: np.ndarray, lm3d: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares affine camera from 3D to 2D points; returns (t (2, 1), mean row norm) as the reference POS."""
    npts = points.shape[0]
    design = np.zeros([2 * npts, 8])
    design[0::2, 0:3] = lm3d
    design[0::2, 3] = 1
    design[1::2, 4:7] = lm3d
    design[1::2, 7] = 1
    target = points.reshape(2 * npts, 1)
    k = np.linalg.lstsq(design, target, rcond=None)[0]
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.stack([k[3], k[7]], axis=0), float(scale)


def _crop_box(w0: float, h0: float, s: float, tx: float, ty: float) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, left, up) of the 224 crop in the scaled image (int32 truncation as reference)."""
    w, h = int(np.int32(w0 * s)), int(np.int32(h0 * s))
    left = int(np.int32(w / 2 - TARGET_SIZE / 2 + (tx - w0 / 2) * s))
    up = int(np.int32(h / 2 - TARGET_SIZE / 2 + (h0 / 2 - ty) * s))
    return w, h, left, up


def align_face(image: np.ndarray, five: np.ndarray, lm3d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop the 224x224 face: (crop uint8 RGB, trans_params (5,) float64).

    ``five`` are the 5 points in image pixels with y pointing down (this function flips them like the reference).
    """
    height, width = image.shape[:2]
    flipped = np.asarray(five, dtype=np.float32).copy()
    flipped[:, 1] = height - 1 - flipped[:, 1]
    t, fitted = fit_scale_translation(flipped.astype(np.float64), lm3d)
    if not np.isfinite(fitted) or fitted <= 0:
        raise ValueError("alignment failed: the 5 landmarks are degenerate")
    s = RESCALE_FACTOR / fitted
    if not max(width, height) * s <= MAX_SCALED_SIDE or min(width, height) * s < 1:
        raise ValueError(f"alignment failed: scale {s:.3g} would resize the {width}x{height} photo past "
                         f"{MAX_SCALED_SIDE} px (degenerate landmarks)")
    w, h, left, up = _crop_box(width, height, s, float(t[0][0]), float(t[1][0]))
    resized = Image.fromarray(image).resize((w, h), resample=Image.Resampling.BICUBIC)
    crop = np.asarray(resized.crop((left, up, left + TARGET_SIZE, up + TARGET_SIZE)))
    return crop, np.array([width, height, s, t[0][0], t[1][0]], dtype=np.float64)


def crop_to_image(points: np.ndarray, trans_params: np.ndarray) -> np.ndarray:
    """Map (N, 2) crop pixels (y down) back to the original image (the reference ``back_resize_ldms``)."""
    w0, h0, s, tx, ty = (float(v) for v in trans_params)
    w, h, left, up = _crop_box(w0, h0, s, tx, ty)
    out = np.asarray(points, dtype=np.float64).copy()
    out[:, 0] = (out[:, 0] + left) / w * w0
    out[:, 1] = (out[:, 1] + up) / h * h0
    return out


def image_to_crop(points: np.ndarray, trans_params: np.ndarray) -> np.ndarray:
    """Inverse of :func:`crop_to_image`."""
    w0, h0, s, tx, ty = (float(v) for v in trans_params)
    w, h, left, up = _crop_box(w0, h0, s, tx, ty)
    out = np.asarray(points, dtype=np.float64).copy()
    out[:, 0] = out[:, 0] / w0 * w - left
    out[:, 1] = out[:, 1] / h0 * h - up
    return out
