"""Face detection with MediaPipe's BlazeFace models (inside the mediapipe wheel, no download).

The full-range model (``model_selection=1``) finds small and distant faces, the short-range model faces that
fill the frame (tried when the other finds nothing); on overlapping tiles the full-range model also finds the small
faces of group photos. Five keypoints come out in insightface order. BlazeFace gives the mouth centre only,
so the two mouth corners are placed on the line through it parallel to the eyes at the ArcFace template's
mouth-width / eye-distance ratio; alignment only needs the mouth centre, and the landmark mesh refines it.
"""

from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

MOUTH_HALF_WIDTH = 0.415  # ArcFace template: mouth width 29.2 px / eye distance 35.2 px, halved


@dataclasses.dataclass
class FaceDetection:
    box: np.ndarray  # (4,) float x0, y0, x1, y1 in pixels
    score: float
    keypoints: np.ndarray  # (5, 2) right eye (image left), left eye, nose, right mouth corner, left mouth corner

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


@functools.lru_cache(maxsize=4)
def _detector(model_selection: int, min_score: float):
    from appleswap.native_logs import QuietGraph, import_mediapipe

    detection = import_mediapipe().solutions.face_detection
    return QuietGraph(lambda: detection.FaceDetection(model_selection=model_selection,
                                                      min_detection_confidence=min_score))


def detect_faces(image: np.ndarray, min_score: float = 0.5, min_size: float = 16.0,
                 tiles: bool = True) -> list[FaceDetection]:
    """All faces in an RGB uint8 image, largest first.

    BlazeFace sees the photo at 192 px, so faces under ~1/20 of the photo's side are lost on the whole photo
    (a group photo). With ``tiles`` the full-range model also runs on overlapping tiles of a half and a
    quarter of the photo's side; a face found only on a tile must be found again on a crop centred on it
    (fewer false faces) and only adds faces that overlap none found on the whole photo. The short-range model
    covers faces that fill the frame.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detect_faces: expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    image = np.ascontiguousarray(image)
    whole = _run(image, 1, min_score)
    found: list[FaceDetection] = []
    if tiles:
        work, scale = _working_copy(image)
        found = [face for face in _tiled(work, min_score) if _confirmed(work, face, min_score)]
        for face in found:
            face.box /= scale
            face.keypoints /= scale
    if not whole and not found:  # a face filling the frame: the short-range model (false faces in busy scenes)
        whole = _run(image, 0, min_score)
    big = [[face for face in faces if min(face.box[2] - face.box[0], face.box[3] - face.box[1]) >= min_size]
           for faces in (whole, found)]
    faces = _suppress_overlaps(big[0], kept=[])
    faces = _suppress_overlaps(big[1], kept=faces)  # tiles only add faces the whole photo did not show
    return sorted(faces, key=lambda face: face.area, reverse=True)


def _working_copy(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The photo area-shrunk so its longer side is at most ``4 * MIN_TILE`` (the model sees 192 px anyway), and
    the scale from the photo to it."""
    longest = max(image.shape[:2])
    if longest <= 4 * MIN_TILE:
        return image, 1.0
    scale = 4 * MIN_TILE / longest
    size = (max(round(image.shape[1] * scale), 1), max(round(image.shape[0] * scale), 1))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), size[0] / image.shape[1]


MIN_TILE = 384  # px: tiles never get smaller than this (faces of ~40 px and up are seen at ~20 px by the model)


def _run(image: np.ndarray, model_selection: int, min_score: float) -> list[FaceDetection]:
    result = _detector(model_selection, float(min_score)).process(np.ascontiguousarray(image))
    return [_convert(det, image.shape) for det in (result.detections or [])]


def tile_grid(height: int, width: int) -> list[tuple[int, int, int]]:
    """(x0, y0, side) of the overlapping square tiles: sides of 1/2 and 1/4 of the longer side (``MIN_TILE`` at
    least, one level when the two come within 1.5x), stride half a tile, so any face smaller than half a tile
    lies wholly in one of them."""
    longest = max(height, width)
    coarse, fine = longest // 2, max(longest // 4, MIN_TILE)
    sides = [side for side in (coarse, fine) if MIN_TILE <= side < longest]
    if len(sides) == 2 and coarse < 1.5 * fine:
        sides = [fine]
    tiles = []
    for side in sides:
        stride = side // 2
        ys = list(range(0, max(height - side, 0) + 1, stride))
        xs = list(range(0, max(width - side, 0) + 1, stride))
        if ys[-1] + side < height:
            ys.append(height - side)
        if xs[-1] + side < width:
            xs.append(width - side)
        tiles += [(x, y, side) for y in ys for x in xs]
    return tiles


def _tiled(image: np.ndarray, min_score: float) -> list[FaceDetection]:
    """Full-range detections on every tile, mapped to the photo; faces cut by a tile's inner edge are dropped
    (another tile or the whole photo holds them whole)."""
    height, width = image.shape[:2]
    faces = []
    for x0, y0, side in tile_grid(height, width):
        tile = image[y0:y0 + side, x0:x0 + side]
        x1, y1 = x0 + tile.shape[1], y0 + tile.shape[0]
        for face in _run(tile, 1, min_score):
            face.box += [x0, y0, x0, y0]
            face.keypoints += np.array([x0, y0], np.float32)
            bx0, by0, bx1, by1 = face.box
            if (x0 > 0 and bx0 < x0 + 1) or (y0 > 0 and by0 < y0 + 1) or (x1 < width and bx1 > x1 - 1) \
                    or (y1 < height and by1 > y1 - 1):
                continue
            faces.append(face)
    return faces


CONFIRM_CONTEXTS = (3.0, 2.0, 5.0)  # crop sides, in face widths, tried in turn to find a tile's face again


def _confirmed(image: np.ndarray, face: FaceDetection, min_score: float) -> bool:
    """Whether the detector finds this face again on a square crop around it, two to five face widths wide
    (centred on it, shifted inward at the photo's border). One crop size alone proved brittle: BlazeFace found a
    portrait at the top edge of a contact sheet on a 5-width crop only, and another face on every size but 3
    widths; the false faces the tiles produce (texture, a jacket) were found again on none."""
    height, width = image.shape[:2]
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    size = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
    for context in CONFIRM_CONTEXTS:
        side = min(context * size, width, height)
        x0 = round(min(max(cx - side / 2, 0), width - side))
        y0 = round(min(max(cy - side / 2, 0), height - side))
        x1, y1 = min(x0 + round(side), width), min(y0 + round(side), height)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return False
        shifted = face.box - np.array([x0, y0, x0, y0])
        if any(_iou(shifted, other.box) >= 0.3 for other in _run(image[y0:y1, x0:x1], 1, min_score)):
            return True
    return False


def _convert(detection, shape: tuple[int, ...]) -> FaceDetection:
    height, width = shape[:2]
    rel = detection.location_data.relative_bounding_box
    x0, y0 = rel.xmin * width, rel.ymin * height
    box = np.array([x0, y0, x0 + rel.width * width, y0 + rel.height * height], dtype=np.float64)
    raw = np.array([(k.x * width, k.y * height) for k in detection.location_data.relative_keypoints])
    right_eye, left_eye, nose, mouth = raw[0], raw[1], raw[2], raw[3]
    half = (left_eye - right_eye) * MOUTH_HALF_WIDTH
    keypoints = np.stack([right_eye, left_eye, nose, mouth - half, mouth + half]).astype(np.float32)
    return FaceDetection(box=box, score=float(detection.score[0]), keypoints=keypoints)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _overlap_of_smaller(a: np.ndarray, b: np.ndarray) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter_w * inter_h / smaller if smaller > 0 else 0.0


def _suppress_overlaps(faces: list[FaceDetection], kept: list[FaceDetection], threshold: float = 0.3,
                       containment: float = 0.6) -> list[FaceDetection]:
    """``kept`` plus the ``faces`` that overlap none of them nor each other (greedy NMS by score); a box mostly
    inside another (the same face seen at another scale) counts as an overlap."""
    kept = list(kept)
    for face in sorted(faces, key=lambda f: f.score, reverse=True):
        if all(_iou(face.box, other.box) < threshold and _overlap_of_smaller(face.box, other.box) < containment
               for other in kept):
            kept.append(face)
    return kept
