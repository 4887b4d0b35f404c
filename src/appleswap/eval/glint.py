"""Second recogniser of the evaluation: insightface antelopev2 ``glintr100.onnx``.

Scoring identity with a network the model was not trained against (APPLE's ID loss / PuLID use ArcFace-family
features) guards against a swapper that merely fools one recogniser. It runs through the identity encoder's own
ONNX runner and ArcFace crop (:mod:`appleswap.identity.arcface`, :func:`appleswap.identity.align.arcface_crop`), so
the project has one face-recognition runner and one crop template; here the embeddings are made unit length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appleswap.identity.arcface import ArcFaceONNX

VERSION = "glintr100-2"  # 2: the identity encoder's runner and least-squares ArcFace crop


class GlintRecognizer:
    """glintr100 (or any insightface ArcFace ONNX with a (N, 3, 112, 112) input) -> (N, 512) unit embeddings."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.model = ArcFaceONNX(path, providers=providers)
        self.size = self.model.input_size

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """Unit embeddings of aligned uint8 RGB crops from :func:`~appleswap.identity.align.arcface_crop`."""
        if not crops:
            return np.zeros((0, 512), dtype=np.float32)
        features = self.model.embed(np.stack(crops)).reshape(len(crops), -1)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
