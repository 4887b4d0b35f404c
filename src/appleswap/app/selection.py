"""Which faces of a target get swapped: FaceFusion's selector modes and orders, on plain detections.

``one`` swaps the face at ``position`` of the chosen order, ``many`` swaps every face, ``reference`` swaps
faces whose ArcFace cosine distance to a reference face is below ``distance`` (FaceFusion's
``--reference-face-distance``, 0 = identical, 2 = opposite). Detections need ``box`` (x0, y0, x1, y1) and
``score``; embeddings are given alongside, one row per detection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SELECTOR_MODES = ("one", "many", "reference")
ORDERS = ("large-small", "small-large", "left-right", "right-left", "top-bottom", "bottom-top", "best-worst",
          "worst-best")


def _area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0) * max(box[3] - box[1], 0))


def order_faces(faces: Sequence[Any], order: str = "large-small") -> list[int]:
    """Indices of ``faces`` in the requested order (stable for ties)."""
    keys = {
        "large-small": lambda f: -_area(f.box),
        "small-large": lambda f: _area(f.box),
        "left-right": lambda f: (f.box[0] + f.box[2]) / 2,
        "right-left": lambda f: -(f.box[0] + f.box[2]) / 2,
        "top-bottom": lambda f: (f.box[1] + f.box[3]) / 2,
        "bottom-top": lambda f: -(f.box[1] + f.box[3]) / 2,
        "best-worst": lambda f: -f.score,
        "worst-best": lambda f: f.score,
    }
    if order not in keys:
        raise ValueError(f"--face-selector-order: {order!r} is not one of {list(ORDERS)}")
    key = keys[order]
    return sorted(range(len(faces)), key=lambda i: key(faces[i]))


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine similarity between rows of ``a`` (N, D) and the vector ``b`` (D,)."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / max(float(np.linalg.norm(b)), 1e-12)
    return 1.0 - a @ b


def select_faces(faces: Sequence[Any], mode: str = "one", *, order: str = "large-small", position: int = 0,
                 embeddings: np.ndarray | None = None, reference: np.ndarray | None = None,
                 distance: float = 0.6) -> list[int]:
    """Indices of the faces to swap, in ``order``; an empty list when none qualifies."""
    if mode not in SELECTOR_MODES:
        raise ValueError(f"--face-selector: {mode!r} is not one of {list(SELECTOR_MODES)}")
    ordered = order_faces(faces, order)
    if not ordered:
        return []
    if mode == "many":
        return ordered
    if mode == "one":
        if not 0 <= position < len(ordered):
            return []
        return [ordered[position]]
    if reference is None or embeddings is None:
        raise ValueError("--face-selector reference needs --reference-face (a photo with the person to replace)")
    if len(embeddings) != len(faces):
        raise ValueError(f"select_faces: {len(embeddings)} embeddings for {len(faces)} faces")
    distances = cosine_distance(embeddings, reference)
    return [i for i in ordered if distances[i] < distance]

