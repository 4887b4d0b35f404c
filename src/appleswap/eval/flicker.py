"""Temporal flicker of a swapped video: frame-to-frame luminance change that the target video does not have.

flicker_t = mean over the face mask of | (S_t - S_{t-1}) - (T_t - T_{t-1}) | on L* (0-100). Motion present in the
target cancels out, so what remains is change the swapper added (identity shimmer, texture boiling). Without a
target video the raw temporal change of the swap is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.color import rgb2lab
from tqdm import tqdm

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


def read_frames(path: str | Path, limit: int = 0) -> list[np.ndarray]:
    """Decoded RGB frames of a video file (``limit`` > 0 keeps the first ``limit``)."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    frames = []
    for frame in iio.imiter(path):
        frames.append(np.ascontiguousarray(frame[..., :3]))
        if limit and len(frames) >= limit:
            break
    return frames


def video_flicker(swapped: str | Path, target: str | Path | None = None, limit: int = 0) -> np.ndarray:
    """Per-transition flicker of a swapped video, on the face (mesh of each target frame, else swap frame)."""
    from appleswap.face_metrics.mesh import face_mesh_points, mesh_face_mask

    frames = read_frames(swapped, limit)
    reference = read_frames(target, len(frames)) if target else None
    if reference is not None and len(reference) != len(frames):
        raise ValueError(f"{swapped} has {len(frames)} frames but {target} has {len(reference)}")
    masks = []
    for frame in tqdm(reference if reference is not None else frames, desc="face masks", unit="frame", leave=False):
        mesh = face_mesh_points(frame)
        masks.append(mesh_face_mask(mesh, frame.shape[:2]) if mesh is not None else np.ones(frame.shape[:2], bool))
    return flicker_scores(frames, reference, masks)
