"""3DDFA-V3 68-point 3DMM landmarks in plain PyTorch (no renderer), with the fitted 3DMM coefficients kept.

``Tddfa3Landmarker.from_weights(weights_dir, device)`` loads the user's assets through the weights registry
(``registry/tddfa.toml``); ``__call__`` gives ``FaceLandmarks``, ``fit`` / ``fit_batch`` give :class:`Tddfa3Fit`.
"""

from appleswap.faces.tddfa.bfm import Bfm68, convert_face_model, load_face_model, safe_load_npy
from appleswap.faces.tddfa.provider import (
    Tddfa3Fit,
    Tddfa3Landmarker,
    coefficient_distances,
    landmarks_from_coeffs,
    load_fit,
    save_fit,
)

__all__ = [
    "Bfm68",
    "Tddfa3Fit",
    "Tddfa3Landmarker",
    "coefficient_distances",
    "convert_face_model",
    "landmarks_from_coeffs",
    "load_face_model",
    "load_fit",
    "safe_load_npy",
    "save_fit",
]
