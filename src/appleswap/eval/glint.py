"""Second recogniser: insightface antelopev2 ``glintr100.onnx`` through onnxruntime.

Scoring identity with a network the model was not trained against (APPLE's ID loss / PuLID use ArcFace-family
features) guards against a swapper that merely fools one recogniser. Standard insightface preprocessing: a
similarity warp of the 5 keypoints onto the ArcFace 112x112 template, RGB, (x - 127.5) / 127.5, NCHW.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

VERSION = "glintr100-1"
# the ArcFace 112x112 destination of the 5 keypoints (insightface order)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float32)


def arcface_crop(image: np.ndarray, points: np.ndarray, size: int = 112) -> np.ndarray:
    """(size, size, 3) uint8 crop with the 5 keypoints warped onto the ArcFace template."""
    if points.shape != (5, 2):
        raise ValueError(f"arcface_crop: points must be (5, 2), got {points.shape}")
    matrix, _ = cv2.estimateAffinePartial2D(points.astype(np.float32), ARCFACE_TEMPLATE * (size / 112.0),
                                            method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("arcface_crop: could not fit a similarity transform to the keypoints")
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


class GlintRecognizer:
    """glintr100 (or any insightface ArcFace ONNX with a (N, 3, 112, 112) input) -> (N, 512) unit embeddings."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recogniser ONNX not found: {path}")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input = self.session.get_inputs()[0]
        shape = self.input.shape
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{path}: expected an NCHW image input, got shape {shape}")
        self.size = int(shape[2]) if isinstance(shape[2], int) else 112
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """Unit embeddings of aligned uint8 RGB crops from :func:`arcface_crop`."""
        if not crops:
            return np.zeros((0, 512), dtype=np.float32)
        blob = (np.stack(crops).astype(np.float32) - 127.5) / 127.5
        blob = blob.transpose(0, 3, 1, 2)
        if self.fixed_batch == 1:
            outputs = [self.session.run(None, {self.input.name: blob[i:i + 1]})[0] for i in range(len(blob))]
            features = np.concatenate(outputs, axis=0)
        else:
            features = self.session.run(None, {self.input.name: blob})[0]
        features = features.reshape(len(crops), -1).astype(np.float32)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
