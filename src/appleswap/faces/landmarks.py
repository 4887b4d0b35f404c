"""68 iBUG landmarks + 10 iris points per aligned face, from pluggable providers.

The default provider runs MediaPipe's face mesh (478 points with iris refinement, models inside the mediapipe
wheel) on an aligned crop and maps the mesh to the iBUG-68 layout. "reference" reads the drawings the authors'
scripts left in a dataset (``3dmm/<name>/<name>_ldm68.png``, ``iris/<name>.png``), so such datasets work
unchanged. "3ddfa-v3" loads the 3DMM landmarker (``appleswap.faces.tddfa``) from local weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from appleswap.faces.points import FaceLandmarks, LandmarkProvider

log = logging.getLogger(__name__)

# iBUG-68 index -> MediaPipe mesh vertex. Jaw 0-16 (subject's right to left), brows 17-26, nose 27-35,
# eyes 36-47 (from the outer corner of the subject's right eye, clockwise in the image), mouth 48-67.
MESH_TO_IBUG68 = np.array(
    [
        234, 93, 132, 58, 172, 136, 150, 176, 152, 400, 379, 365, 397, 288, 361, 323, 454,  # jaw
        70, 63, 105, 66, 107, 336, 296, 334, 293, 300,  # brows
        168, 197, 5, 4, 98, 97, 2, 326, 327,  # nose bridge + base
        33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # eyes
        61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,  # outer lips
        78, 81, 13, 311, 308, 402, 14, 178,  # inner lips
    ],
    dtype=np.int64,
)
IRIS_MESH = np.arange(468, 478)  # subject's right iris (centre 468, ring 469-472), then left (473, 474-477)
# eye contours in the 68 layout, for checks and the eye masks
RIGHT_EYE_68 = np.arange(36, 42)
LEFT_EYE_68 = np.arange(42, 48)


def mesh_to_lm68(mesh: np.ndarray) -> np.ndarray:
    """(478, 2) MediaPipe mesh -> (68, 2) iBUG-68 points."""
    return np.asarray(mesh, dtype=np.float32)[MESH_TO_IBUG68]


class MediaPipeLandmarker:
    """MediaPipe face mesh with iris refinement on one face crop (``max_num_faces=1``).

    Run it on a crop around one face: on a whole frame the mesh finds false faces (logos, posters).
    """

    def __init__(self, min_confidence: float = 0.3) -> None:
        from appleswap.native_logs import QuietGraph, import_mediapipe

        face_mesh = import_mediapipe().solutions.face_mesh
        self._mesh = QuietGraph(lambda: face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=min_confidence
        ))

    def mesh(self, image: np.ndarray) -> np.ndarray:
        """(478, 2) float32 pixel coordinates; ValueError when no face is found."""
        image = np.ascontiguousarray(image)
        result = self._mesh.process(image)
        if not result.multi_face_landmarks:
            raise ValueError("no face found by the MediaPipe face mesh")
        height, width = image.shape[:2]
        points = result.multi_face_landmarks[0].landmark
        return np.array([(p.x * width, p.y * height) for p in points], dtype=np.float32)

    def __call__(self, aligned_image: np.ndarray, key: str | None = None) -> FaceLandmarks:
        mesh = self.mesh(aligned_image)
        return FaceLandmarks(lm68=mesh_to_lm68(mesh), iris=mesh[IRIS_MESH].copy(), mesh=mesh)

    def close(self) -> None:
        self._mesh.close()


def blob_centroids(canvas: np.ndarray) -> np.ndarray:
    """Centres of the separate dots of a landmark drawing, (N, 2) float32, sorted top-left first."""
    import cv2

    binary = (canvas.reshape(canvas.shape[0], canvas.shape[1], -1).sum(axis=-1) > 0).astype(np.uint8)
    count, _, _, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8)
    points = centroids[1:count].astype(np.float32)
    order = np.lexsort((points[:, 0], points[:, 1])) if len(points) else np.zeros(0, dtype=np.int64)
    return points[order]


class ReferenceLandmarks:
    """Reads the authors' drawings from a dataset laid out as the reference scripts write it.

    ``key`` is ``"<identity>/<name>"`` (or ``"<name>"`` for a flat folder) relative to ``root``. The drawings are
    kept verbatim (``lm68_canvas``, ``iris_canvas``) so conditions built from them match the reference's;
    the points are the dot centres (fewer than 68 where dots merge), for the manifest. The full
    ``segmap/<name>.png`` and the occlusion-intersected ``segmap_intersection/<name>.png`` found there become
    ``segmap`` and ``segmap_intersection`` (face classes recovered from their colours).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"reference landmark root {self.root} is not a folder")

    def paths(self, key: str) -> tuple[Path, Path, Path, Path]:
        """The landmark drawing, the iris drawing, the full and the intersected segmap of ``key``."""
        folder, name = _split_key(key)
        base = self.root / folder
        return (base / "3dmm" / name / f"{name}_ldm68.png", base / "iris" / f"{name}.png",
                base / "segmap" / f"{name}.png", base / "segmap_intersection" / f"{name}.png")

    def __call__(self, aligned_image: np.ndarray | None = None, key: str | None = None) -> FaceLandmarks:
        from appleswap.files import load_image

        if key is None:
            raise ValueError("the reference landmark provider needs key='<identity>/<name>'")
        from appleswap.faces.segmap import classes_from_colors

        lm_path, iris_path, segmap_path, intersection_path = self.paths(key)
        if not lm_path.is_file():
            raise ValueError(f"no face: reference landmark file {lm_path} is missing (3DDFA found no face there)")
        lm_canvas = load_image(lm_path, min_side=1)
        iris_canvas = load_image(iris_path, min_side=1) if iris_path.is_file() else None
        if iris_canvas is None:
            log.warning("%s: no reference iris drawing at %s", key, iris_path)
        iris = blob_centroids(iris_canvas) if iris_canvas is not None else None
        segmap, intersection = (classes_from_colors(load_image(path, min_side=1)) if path.is_file() else None
                                for path in (segmap_path, intersection_path))
        return FaceLandmarks(lm68=blob_centroids(lm_canvas), iris=iris, segmap=segmap,
                             segmap_intersection=intersection, lm68_canvas=lm_canvas, iris_canvas=iris_canvas)


def _split_key(key: str) -> tuple[str, str]:
    parts = Path(key).parts
    return (str(Path(*parts[:-1])) if len(parts) > 1 else "."), parts[-1]


PROVIDERS = ("mediapipe", "reference", "3ddfa-v3")


def get_landmark_provider(
    name: str = "mediapipe", weights_dir: str | Path | None = None, device: str | None = None,
    root: str | Path | None = None,
) -> LandmarkProvider:
    """The provider called ``name``; ``root`` is the dataset folder the "reference" provider reads."""
    if name == "mediapipe":
        return MediaPipeLandmarker()
    if name == "reference":
        if root is None:
            raise ValueError("landmark provider 'reference' needs root=<dataset folder with 3dmm/ and iris/>")
        return ReferenceLandmarks(root)
    if name == "3ddfa-v3":
        from appleswap.faces.tddfa import Tddfa3Landmarker

        return Tddfa3Landmarker.from_weights(weights_dir, device)
    raise ValueError(f"unknown landmark provider {name!r}; choose one of {PROVIDERS}")
