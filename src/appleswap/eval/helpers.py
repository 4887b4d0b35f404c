"""Per-image scorers for other stages (the pseudo-triplet filter, training monitors), uncached.

Each scorer picks the protocol network when its weights are present and the embedded fallback otherwise, exactly
as ``appleswap eval`` does; ``.label`` and ``.fallback`` say which one is in use.

    scorer = PoseScorer(weights_dir)            # HopeNet or MediaPipe + PnP
    yaw_pitch_roll = scorer([img_a, img_b])     # (2, 3) degrees
"""

from __future__ import annotations

import numpy as np

from appleswap.eval.features import Extractor, face_record
from appleswap.eval.masks import FaceMasker
from appleswap.eval.networks import WeightPaths, expression_extractor, identity_extractors, pose_extractor


class _Scorer:
    key = ""

    def __init__(self, extractor: Extractor, parser_weights: str | None = None, device: str = "cpu") -> None:
        self.extractor = extractor
        self.masker = FaceMasker(parser_weights, device)
        self.label = extractor.label
        self.fallback = extractor.fallback

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """One row per image (NaN rows where no face was found)."""
        faces = [face_record(image, self.masker) for image in images]
        rows = self.extractor.compute(images, faces, faces)
        return np.stack([row[self.key] for row in rows]).astype(np.float32)


class PoseScorer(_Scorer):
    """(N, 3) yaw, pitch, roll in degrees."""

    key = "angles"

    def __init__(self, weights_dir: str | None = None, *, hopenet: str | None = None, device: str = "cpu") -> None:
        super().__init__(pose_extractor(WeightPaths(weights_dir, hopenet=hopenet), device), None, device)


class ExpressionScorer(_Scorer):
    """(N, 64) Deep3DFaceRecon expression coefficients, or (N, 7) mesh ratios as the fallback."""

    key = "coefficients"

    def __init__(self, weights_dir: str | None = None, *, deep3d: str | None = None, mode: str = "reface",
                 device: str = "cpu") -> None:
        super().__init__(expression_extractor(WeightPaths(weights_dir, deep3d=deep3d), device, mode), None, device)


class IdentityScorer(_Scorer):
    """(N, D) unit identity embeddings: IR-SE50 (own parser/mesh mask), else glintr100, else dlib."""

    key = "embedding"

    def __init__(self, weights_dir: str | None = None, *, irse50: str | None = None, glint: str | None = None,
                 parser_weights: str | None = None, device: str = "cpu") -> None:
        extractors = identity_extractors(WeightPaths(weights_dir, irse50=irse50, glint=glint), device, "swap")
        if not extractors:
            raise FileNotFoundError("no identity network: give IR-SE50 / glintr100 weights or install dlib-bin")
        super().__init__(extractors[0], parser_weights, device)

    def similarity(self, images_a: list[np.ndarray], images_b: list[np.ndarray]) -> np.ndarray:
        """(N,) cosine similarity of paired images."""
        a, b = self(images_a), self(images_b)
        return (a * b).sum(axis=1)
