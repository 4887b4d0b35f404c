"""Per-image feature extractors behind one cached, batched loop.

Each extractor turns an image (plus, for some, the face record of the image whose mask it uses) into a small
dict of arrays. :func:`extract_all` looks every job up in the :class:`FeatureCache` first and computes only the
misses, in batches, with a progress bar: re-scoring a new swap folder recomputes only the swaps.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from appleswap.eval.cache import FeatureCache
from appleswap.eval.masks import ID_CLASSES, FaceMasker, select
from appleswap.face_metrics.mesh import NUM_POINTS, face_mesh_points, five_points
from appleswap.files import ImageLoadError, load_image

log = logging.getLogger(__name__)

CLASSES_SIZE = 256
THUMB_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to featurise; ``mask_from`` names the image whose face record supplies the mask."""

    image: Path
    mask_from: Path | None = None

    def key_paths(self) -> list[Path]:
        return [self.image] + ([self.mask_from] if self.mask_from and self.mask_from != self.image else [])


@dataclasses.dataclass
class Extractor:
    """``compute(images, faces_of_images, mask_faces)`` -> list of feature dicts, one per image."""

    name: str
    version: str
    label: str
    compute: Callable[[list[np.ndarray], list[dict], list[dict]], list[dict[str, np.ndarray]]]
    fallback: bool = False
    uses_mask: bool = False


def face_record(image: np.ndarray, masker: FaceMasker) -> dict[str, np.ndarray]:
    """Mesh (zeros + ``found`` = 0 when no face), 256 px class map and 128 px thumbnail of one image."""
    mesh = face_mesh_points(image)
    classes = masker.classes(image, mesh)
    return {
        "found": np.array([mesh is not None], dtype=np.uint8),
        "mesh": mesh if mesh is not None else np.zeros((NUM_POINTS, 3), dtype=np.float32),
        "classes": cv2.resize(classes, (CLASSES_SIZE, CLASSES_SIZE), interpolation=cv2.INTER_NEAREST),
        "thumb": cv2.resize(image, (THUMB_SIZE, THUMB_SIZE), interpolation=cv2.INTER_AREA),
        "shape": np.array(image.shape[:2], dtype=np.int64),
    }


def mesh_or_none(face: dict) -> np.ndarray | None:
    return face["mesh"] if int(face["found"][0]) else None


def id_mask(face: dict) -> np.ndarray:
    """Bool identity mask (REFace's kept classes) at the class-map size."""
    return select(face["classes"], ID_CLASSES)


def extract_all(extractor: Extractor, jobs: list[Job], cache: FeatureCache, faces: dict[Path, dict],
                batch_size: int = 16, unreadable: dict[Path, str] | None = None) -> dict[Job, dict[str, np.ndarray]]:
    """Features of every job (deduplicated), from the cache where possible, computing the rest in batches.

    With ``unreadable`` given, an image that cannot be used (corrupt, too small) is left out and its reason stored
    there (path -> reason) instead of stopping the run."""
    results: dict[Job, dict[str, np.ndarray]] = {}
    todo: list[tuple[Job, str]] = []
    for job in dict.fromkeys(jobs):
        key = FeatureCache.key(extractor.name, extractor.version, job.key_paths())
        hit = cache.get(extractor.name, key)
        if hit is not None:
            results[job] = hit
        else:
            todo.append((job, key))
    if not todo:
        return results
    bar = tqdm(total=len(todo), desc=f"{extractor.name}", unit="img", leave=False)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        count, images = len(chunk), []
        for job, key in list(chunk):
            try:
                images.append(load_image(job.image))
            except ImageLoadError as error:
                if unreadable is None:
                    raise
                unreadable[job.image] = str(error)
                chunk.remove((job, key))
        if not chunk:
            bar.update(count)
            continue
        own = [faces.get(job.image, {}) for job, _ in chunk]
        masks = [faces.get(job.mask_from or job.image, {}) for job, _ in chunk]
        for (job, key), features in zip(chunk, extractor.compute(images, own, masks)):
            cache.put(extractor.name, key, features)
            results[job] = features
        bar.update(count)
    bar.close()
    return results


def compute_faces(paths: list[Path], masker: FaceMasker, cache: FeatureCache,
                  unreadable: dict[Path, str] | None = None) -> dict[Path, dict]:
    """The face record (mesh, classes, thumbnail) of every image; the base of most other features. Images that
    cannot be used go to ``unreadable`` (path -> reason) when it is given."""
    extractor = Extractor("face", f"face-1-{masker.version}", "MediaPipe mesh + " + masker.source + " classes",
                          lambda images, _own, _masks: [face_record(im, masker) for im in images])
    found = extract_all(extractor, [Job(p) for p in paths], cache, {}, batch_size=8, unreadable=unreadable)
    return {job.image: record for job, record in found.items()}


def points5_or_none(face: dict) -> np.ndarray | None:
    mesh = mesh_or_none(face)
    return five_points(mesh) if mesh is not None else None


def nan_features(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Feature dict of NaNs (a face was not found); metrics then count the pair as missing."""
    return {name: np.full(shape, np.nan, dtype=np.float32) for name, shape in shapes.items()}
