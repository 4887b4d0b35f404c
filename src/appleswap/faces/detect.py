"""Face detection with MediaPipe's BlazeFace models (inside the mediapipe wheel, no download).

The full-range model (``model_selection=1``) finds small and distant faces; the short-range model is tried
when it finds nothing. Five keypoints come out in insightface order. BlazeFace gives the mouth centre only,
so the two mouth corners are placed on the line through it parallel to the eyes at the ArcFace template's
mouth-width / eye-distance ratio; alignment only needs the mouth centre, and the landmark mesh refines it.
"""

from __future__ import annotations

import dataclasses
import functools

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


def detect_faces(image: np.ndarray, min_score: float = 0.5, min_size: float = 16.0) -> list[FaceDetection]:
    """All faces in an RGB uint8 image, largest first (full-range model, short-range as fallback)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detect_faces: expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    image = np.ascontiguousarray(image)
    faces: list[FaceDetection] = []
    for model_selection in (1, 0):
        result = _detector(model_selection, float(min_score)).process(image)
        faces = [_convert(det, image.shape) for det in (result.detections or [])]
        faces = [face for face in faces if min(face.box[2] - face.box[0], face.box[3] - face.box[1]) >= min_size]
        if faces:
            break
    faces = _suppress_overlaps(faces)
    return sorted(faces, key=lambda face: face.area, reverse=True)


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


def _suppress_overlaps(faces: list[FaceDetection], threshold: float = 0.5) -> list[FaceDetection]:
    kept: list[FaceDetection] = []
    for face in sorted(faces, key=lambda f: f.score, reverse=True):
        if all(_iou(face.box, other.box) < threshold for other in kept):
            kept.append(face)
    return kept
