"""A contact sheet to eyeball a preprocessing run: photo | landmarks | mask | condition, one row per face."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from appleswap.files import load_image, save_image
from appleswap.preprocess.layout import FacePaths

log = logging.getLogger(__name__)


def _tile(path: Path, size: int) -> np.ndarray:
    image = Image.fromarray(load_image(path, min_side=1))
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _landmark_tile(image: np.ndarray, face: dict[str, Any], scale: float) -> np.ndarray:
    canvas = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(canvas)
    for x, y in np.asarray(face.get("lm68") or [], dtype=np.float64) * scale:
        draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=(0, 255, 0))
    for x, y in np.asarray(face.get("iris") or [], dtype=np.float64) * scale:
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(255, 0, 0))
    return np.asarray(canvas)


def _row(root: Path, folder: str, face: dict[str, Any], size: int) -> np.ndarray | None:
    paths = FacePaths(root, folder, face["name"])
    try:
        photo = _tile(paths.image, size)
        mask = _tile(paths.png("mask_intersection"), size)
        condition = _tile(paths.png("blur"), size)
    except (OSError, ValueError) as error:
        log.warning("preview: skipping %s (%s)", paths.key, error)
        return None
    scale = size / float(Image.open(paths.image).size[0])
    overlay = (photo * 0.5 + mask * 0.5).astype(np.uint8)
    return np.concatenate([photo, _landmark_tile(photo, face, scale), overlay, condition], axis=1)


def write_preview(root: str | Path, records: list[dict[str, Any]], path: str | Path, tile: int = 192,
                  max_rows: int = 32) -> Path | None:
    """Write the contact sheet of the first ``max_rows`` finished faces; None when there is none."""
    root = Path(root)
    rows = []
    for record in records:
        folder = record["key"].rsplit("/", 1)[0] if "/" in record["key"] else ""
        for face in record.get("faces", []):
            if face.get("status") == "ok" and len(rows) < max_rows:
                row = _row(root, folder, face, tile)
                if row is not None:
                    rows.append(row)
    if not rows:
        log.warning("preview: no finished face to show")
        return None
    return save_image(path, np.concatenate(rows, axis=0), quality=90)
