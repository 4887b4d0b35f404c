"""The landmark record every landmark provider returns (MediaPipe, reference drawings, 3DDFA-V3), below all of
them, so a provider never imports the registry that picks it
(:func:`appleswap.faces.landmarks.get_landmark_provider`)."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass
class FaceLandmarks:
    """Landmarks of one face in the pixel coordinates of the image they were found on.

    ``lm68_canvas`` / ``iris_canvas`` carry the reference drawings verbatim when points came from files.
    """

    lm68: np.ndarray  # (68, 2) float32; (N, 2) when recovered from a reference drawing
    iris: np.ndarray | None = None  # (10, 2) float32
    mesh: np.ndarray | None = None  # (478, 2) float32
    segmap: np.ndarray | None = None  # (H, W) uint8 class ids
    segmap_intersection: np.ndarray | None = None  # the same, occluded pixels removed (the authors' files)
    lm68_canvas: np.ndarray | None = None
    iris_canvas: np.ndarray | None = None

    def transformed(self, matrix: np.ndarray) -> FaceLandmarks:
        """The same points mapped through a 2x3 affine ``matrix`` (canvases and segmap are dropped)."""

        def apply(points: np.ndarray | None) -> np.ndarray | None:
            if points is None:
                return None
            pts = np.asarray(points, dtype=np.float64)
            return (pts @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)

        return FaceLandmarks(lm68=apply(self.lm68), iris=apply(self.iris), mesh=apply(self.mesh))


class LandmarkProvider(Protocol):
    def __call__(self, aligned_image: np.ndarray, key: str | None = None) -> FaceLandmarks: ...
