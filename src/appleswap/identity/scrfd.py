"""SCRFD face detector (insightface ``scrfd_10g_bnkps.onnx``) on onnxruntime, with our own output decoding.

The ONNX graph takes a (1, 3, H, W) float blob, RGB, normalised as (x - 127.5) / 128, and returns 9 outputs:
scores, box distances and 5-point distances for strides 8, 16 and 32, two anchors per feature-map cell, each
output (cells * 2, C) (or (1, cells * 2, C) for batched exports). Box and point distances are in stride units.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
INPUT_MEAN = 127.5
INPUT_STD = 128.0


@dataclass(frozen=True)
class Detection:
    """One face: box (x1, y1, x2, y2), 5 keypoints (5, 2) in insightface order, and the detector score."""

    box: np.ndarray
    kps: np.ndarray
    score: float

    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


def anchor_centers(height: int, width: int, stride: int, num_anchors: int = NUM_ANCHORS) -> np.ndarray:
    """(height * width * num_anchors, 2) anchor centres (x, y) in input pixels, row-major, anchors innermost."""
    ys, xs = np.mgrid[:height, :width]
    centers = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    return np.repeat(centers, num_anchors, axis=0)


def decode_outputs(
    outputs: list[np.ndarray], input_hw: tuple[int, int], threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw 9 SCRFD outputs -> (scores (K,), boxes (K, 4), kps (K, 5, 2)) above ``threshold``, in input pixels."""
    if len(outputs) != 3 * len(STRIDES):
        raise ValueError(f"SCRFD: expected 9 outputs (scores, boxes, keypoints x 3 strides), got {len(outputs)}")
    outputs = [out[0] if out.ndim == 3 else out for out in outputs]
    scores_all, boxes_all, kps_all = [], [], []
    for index, stride in enumerate(STRIDES):
        scores = outputs[index].reshape(-1)
        dist = outputs[index + 3].reshape(-1, 4) * stride
        kdist = outputs[index + 6].reshape(-1, 10) * stride
        centers = anchor_centers(input_hw[0] // stride, input_hw[1] // stride, stride)
        if len(centers) != len(scores):
            raise ValueError(f"SCRFD stride {stride}: {len(scores)} scores for {len(centers)} anchors")
        keep = np.flatnonzero(scores >= threshold)
        c = centers[keep]
        d = dist[keep]
        boxes_all.append(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], -1))
        kps_all.append(c[:, None, :] + kdist[keep].reshape(-1, 5, 2))
        scores_all.append(scores[keep])
    return np.concatenate(scores_all), np.concatenate(boxes_all), np.concatenate(kps_all)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; indices of kept boxes, best first."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[order[1:]]) - np.maximum(x1[best], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[order[1:]]) - np.maximum(y1[best], y1[order[1:]]) + 1)
        iou = w * h / (areas[best] + areas[order[1:]] - w * h)
        order = order[1:][iou <= iou_threshold]
    return keep


class SCRFDDetector:
    """Face detector over an SCRFD ONNX file; ``detect(rgb)`` returns faces sorted by score."""

    def __init__(self, path: str | Path, *, providers: list[str] | None = None, input_size: int = 640,
                 score_threshold: float = 0.5, nms_threshold: float = 0.4) -> None:
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SCRFD detector: {path} not found")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 9:
            raise ValueError(f"{path}: not an SCRFD-with-keypoints graph (want 1 input and 9 outputs, "
                             f"got {len(inputs)} and {len(outputs)})")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in outputs]
        shape = inputs[0].shape
        static = isinstance(shape[2], int) and isinstance(shape[3], int)
        self.input_hw = (shape[2], shape[3]) if static else (input_size, input_size)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Resize keeping the aspect ratio into the top-left of a black input canvas (as insightface does)."""
        height, width = self.input_hw
        scale = min(height / image.shape[0], width / image.shape[1])
        new_w, new_h = max(int(image.shape[1] * scale), 1), max(int(image.shape[0] * scale), 1)
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
        return canvas, new_h / image.shape[0]

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 image, best score first, in the image's pixel coordinates."""
        canvas, scale = self._letterbox(image)
        blob = ((canvas.astype(np.float32) - INPUT_MEAN) / INPUT_STD).transpose(2, 0, 1)[None]
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        scores, boxes, kps = decode_outputs(outputs, self.input_hw, self.score_threshold)
        if not len(scores):
            return []
        keep = nms(boxes, scores, self.nms_threshold)
        return [Detection(box=(boxes[i] / scale).astype(np.float32), kps=(kps[i] / scale).astype(np.float32),
                          score=float(scores[i])) for i in keep]
