"""Gaze error from MediaPipe iris points: eye-in-head gaze direction per eye, angle between swap and target.

Per eye the iris centre's offset from the eye centre (corners horizontally, lids vertically), measured in the
eye's own frame, is turned into yaw/pitch on an eyeball whose radius is 0.43 x the eye width (an adult eyeball is
~12 mm for a ~28 mm palpebral fissure). Head pose is scored separately; this measures where the eyes look.
"""

from __future__ import annotations

import numpy as np

from appleswap.face_metrics.mesh import LEFT_EYE, RIGHT_EYE

VERSION = "iris-gaze-1"
EYEBALL_RADIUS_PER_WIDTH = 0.43


def _eye_direction(mesh: np.ndarray, eye: tuple[int, int, int, int, int]) -> np.ndarray:
    outer, inner, upper, lower, iris = (mesh[i, :2].astype(np.float64) for i in eye)
    axis_x = inner - outer
    width = max(np.linalg.norm(axis_x), 1e-6)
    axis_x /= width
    if axis_x[0] < 0:  # keep +x pointing to the image right for both eyes
        axis_x = -axis_x
    axis_y = np.array([-axis_x[1], axis_x[0]])
    radius = EYEBALL_RADIUS_PER_WIDTH * width
    dx = float((iris - (outer + inner) / 2.0) @ axis_x) / radius
    dy = float((iris - (upper + lower) / 2.0) @ axis_y) / radius
    yaw, pitch = np.arcsin(np.clip(dx, -1, 1)), np.arcsin(np.clip(dy, -1, 1))
    return np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])


def gaze_vector(mesh: np.ndarray | None) -> np.ndarray:
    """(3,) unit gaze direction (x right, y down, z away from the camera), the mean of both eyes; NaN if no face."""
    if mesh is None:
        return np.full(3, np.nan, dtype=np.float32)
    vector = _eye_direction(mesh, RIGHT_EYE) + _eye_direction(mesh, LEFT_EYE)
    return (vector / max(np.linalg.norm(vector), 1e-12)).astype(np.float32)


def gaze_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between gaze vectors, row-wise."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    cross = np.linalg.norm(np.cross(a, b), axis=1)  # atan2 stays exact near 0 where arccos loses precision
    return np.degrees(np.arctan2(cross, (a * b).sum(axis=1)))
