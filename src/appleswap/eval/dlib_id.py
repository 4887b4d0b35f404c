"""Embedded identity fallback: dlib's 128-d face descriptor (``face_recognition_models``, CC0 model files).

Used when neither IR-SE50 nor glintr100 is available; the report labels it "dlib (fallback)" because its scale
differs from ArcFace (same-person cosine is high for everyone; use it for retrieval and relative comparisons).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VERSION = "dlib-resnet-v1-1"


def model_files() -> tuple[Path, Path] | None:
    """(5-point shape predictor, descriptor net) inside the installed face_recognition_models, else None.

    The package's own ``__init__`` needs pkg_resources, so its folder is found without importing it.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = (folder / "shape_predictor_5_face_landmarks.dat", folder / "dlib_face_recognition_resnet_model_v1.dat")
    return files if all(f.is_file() for f in files) else None


def available() -> bool:
    return importlib.util.find_spec("dlib") is not None and model_files() is not None


class DlibRecognizer:
    """Face box (from the mesh) -> dlib 5-point shape -> 128-d descriptor, returned unit-normalised."""

    def __init__(self) -> None:
        files = model_files()
        if files is None or importlib.util.find_spec("dlib") is None:
            raise FileNotFoundError("dlib identity fallback needs `pip install dlib-bin face_recognition_models`")
        import dlib

        self._dlib = dlib
        self.shape_predictor = dlib.shape_predictor(str(files[0]))
        self.net = dlib.face_recognition_model_v1(str(files[1]))

    def embed(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """(128,) unit descriptor of the face inside ``box`` = (x0, y0, x1, y1) pixels."""
        x0, y0, x1, y1 = (round(v) for v in box)
        rect = self._dlib.rectangle(x0, y0, x1, y1)
        shape = self.shape_predictor(np.ascontiguousarray(image), rect)
        descriptor = np.asarray(self.net.compute_face_descriptor(np.ascontiguousarray(image), shape), np.float32)
        return descriptor / max(float(np.linalg.norm(descriptor)), 1e-12)


def mesh_box(mesh: np.ndarray) -> tuple[float, float, float, float]:
    """A dlib-detector-like square box around the mesh (dlib's boxes cover brows to chin, ears excluded)."""
    x0, y0 = mesh[:, :2].min(axis=0)
    x1, y1 = mesh[:, :2].max(axis=0)
    return float(x0), float(y0 + 0.15 * (y1 - y0)), float(x1), float(y1)
