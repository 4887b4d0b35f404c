"""One input file -> its faces' outputs in the reference layout and a manifest record (runs in a worker).

A photo goes: detection -> rough FFHQ crop from the 5 keypoints -> landmarks on that crop -> final FFHQ crop
from the 68 landmarks (the points are mapped, not recomputed) -> mask -> drawings -> condition. Any failure
becomes an error record naming the file; nothing here stops a batch.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from appleswap.faces.align import AlignedFace, align_face, check_alignment, invert_matrix
from appleswap.faces.landmarks import FaceLandmarks, get_landmark_provider
from appleswap.faces.mesh_mask import landmark_classes, mesh_classes
from appleswap.faces.segmap import colorize, face_mask
from appleswap.files import ImageLoadError, atomic_path, load_image, raise_if_environment, save_image
from appleswap.preprocess.condition import build_condition, intersect_classes, landmark_canvases
from appleswap.preprocess.layout import FacePaths, InputItem, face_name

log = logging.getLogger(__name__)
PNG_LEVEL = 1


class FaceWorker:
    """Holds the models of one process and turns an :class:`InputItem` into a manifest record."""

    def __init__(self, config: Any, output_root: str | Path, input_root: str | Path,
                 weights_dir: str | None = None, device: str | None = None) -> None:
        self.config = config
        self.output_root = Path(output_root)
        self.landmarker = get_landmark_provider(
            config.landmarks, weights_dir=weights_dir, device=device, root=config.reference_root or input_root,
        )
        self._iris_fallback = None
        self.parser, self.occlusion, self.scorer = load_segmenters(config, weights_dir, device)

    def process(self, item: InputItem) -> dict[str, Any]:
        record: dict[str, Any] = {"input": item.path.name, "key": item.key, "status": "ok", "faces": []}
        try:
            image = load_image(item.path, min_side=self.config.min_side)
            crops = self._faces(image, item)
        except ImageLoadError as error:
            return {**record, "status": "error", "error": str(error)}
        except ValueError as error:
            return {**record, "status": "error", "error": f"{item.path}: {error}"}
        except Exception as error:
            raise_if_environment(error, item.path)  # disk full, permission...: stop, retried on the next run
            log.exception("unexpected failure on %s", item.path)
            return {**record, "status": "error", "error": f"{item.path}: {type(error).__name__}: {error}"}
        record["image_size"] = [int(image.shape[1]), int(image.shape[0])]
        for index, (aligned, landmarks, detection) in enumerate(crops):
            paths = FacePaths(self.output_root, item.folder, face_name(item.stem, index, len(crops)))
            fit = detection.pop("_fit", None)
            try:
                face = self._write_face(item, aligned, landmarks, paths)
                if fit is not None and face["status"] == "ok":
                    face["tddfa"] = _save_fit(paths, fit)
            except Exception as error:
                raise_if_environment(error, paths.image)
                log.exception("failure on face %d of %s", index, item.path)
                face = {"name": paths.name, "status": "error", "error": f"{item.path}: face {index}: {error}"}
            face.update(detection)
            record["faces"].append(face)
        statuses = {face["status"] for face in record["faces"]}
        if statuses != {"ok"}:
            record["status"] = "ok" if "ok" in statuses else ("filtered" if statuses == {"filtered"} else "error")
            errors = [face["error"] for face in record["faces"] if face.get("error")]
            if errors:
                record["error"] = "; ".join(errors)
        return record

    def _faces(self, image: np.ndarray, item: InputItem) -> list[tuple[AlignedFace, FaceLandmarks, dict]]:
        size = self.config.size
        if self.config.aligned:
            aligned = _as_aligned(image, size)
            landmarks = self.landmarker(aligned.image, key=item.key)
            return [(aligned, self._with_iris(aligned.image, landmarks), {"_fit": self._last_fit()})]
        from appleswap.faces.detect import detect_faces

        detections = detect_faces(image, min_score=self.config.min_face_score, min_size=self.config.min_face_size)
        if not detections:
            raise ValueError("no face detected")
        found = len(detections)
        if self.config.face_selector == "largest":
            detections = detections[:1]
        crops, errors = [], []
        for index, detection in enumerate(detections):
            try:  # with --face-selector all, one unusable face must not lose the others
                rough = align_face(image, detection.keypoints, size)
                in_photo = self.landmarker(rough.image, key=item.key).transformed(invert_matrix(rough.matrix))
                final = align_face(image, in_photo.lm68, size)
                align_error = check_alignment(image, final)  # the crop is the photo seen through the saved matrix
                landmarks = self._with_iris(final.image, in_photo.transformed(final.matrix))
            except ValueError as error:
                errors.append(f"face {index}: {error}")
                continue
            info = {"box": detection.box.round(2).tolist(), "det_score": round(detection.score, 4),
                    "align_error": round(align_error, 3),
                    "n_faces_detected": found, "_fit": self._last_fit()}
            crops.append((final, landmarks, info))
        if not crops:
            raise ValueError("; ".join(errors))
        if errors:
            log.warning("%s: skipped %s", item.path, "; ".join(errors))
        return crops

    def _last_fit(self):
        """The 3DDFA-V3 fit behind the latest landmark call (None for other providers). On photos it belongs to
        the rough crop: identity and expression are the same, the pose is relative to that crop."""
        return getattr(self.landmarker, "last_fit", None)

    def _with_iris(self, aligned: np.ndarray, landmarks: FaceLandmarks) -> FaceLandmarks:
        """Providers without iris (3DDFA-V3) get MediaPipe's iris points on the same crop."""
        if landmarks.iris is not None or landmarks.iris_canvas is not None:
            return landmarks
        landmarks.iris = self._mediapipe()(aligned).iris
        return landmarks

    def _mediapipe(self):
        if self._iris_fallback is None:
            self._iris_fallback = get_landmark_provider("mediapipe")
        return self._iris_fallback

    def _classes(self, image: np.ndarray, landmarks: FaceLandmarks) -> tuple[np.ndarray | None, np.ndarray]:
        """Full class map and its occlusion intersection (the one that feeds the condition). The full map is None
        when only the authors' intersected map is known: it must never be written as their full ``segmap/``."""
        visible = np.asarray(self.occlusion.visible(image), dtype=bool) if self.occlusion is not None else None
        full, intersected = landmarks.segmap, landmarks.segmap_intersection  # the authors' maps (reference)
        if self.parser is None and (full is not None or intersected is not None):
            if visible is None:
                return full, intersected if intersected is not None else full
            return full, intersect_classes(full if full is not None else intersected, visible)
        if self.parser is not None:
            classes = np.asarray(self.parser.parse(image), dtype=np.uint8)
        elif landmarks.mesh is not None:
            classes = mesh_classes(landmarks.mesh, image.shape)
        elif landmarks.lm68 is not None and len(landmarks.lm68) == 68:
            classes = landmark_classes(landmarks.lm68, image.shape)
        else:  # e.g. reference drawings without a segmap: fall back to the MediaPipe mesh of this crop
            classes = mesh_classes(self._mediapipe()(image).mesh, image.shape)
        return classes, intersect_classes(classes, visible)

    def _write_face(self, item: InputItem, aligned: AlignedFace, landmarks: FaceLandmarks,
                    paths: FacePaths) -> dict[str, Any]:
        image = aligned.image
        face: dict[str, Any] = {"name": paths.name, "key": paths.key, "status": "ok",
                                "matrix": aligned.matrix.round(6).tolist(), "padded": aligned.padded,
                                "lm68": _points(landmarks.lm68), "iris": _points(landmarks.iris)}
        if self.scorer is not None:
            face["aes"] = round(float(self.scorer.score([image])[0]), 6)
            if self.config.min_aesthetic is not None and face["aes"] < self.config.min_aesthetic:
                face["status"] = "filtered"
                face["error"] = f"aesthetic score {face['aes']:.3f} < --min-aesthetic {self.config.min_aesthetic}"
                return face
        image = self._write_image(item, image, paths.image)  # the saved (JPEG-decoded) pixels, as training sees
        classes, inter = self._classes(image, landmarks)
        lm_canvas, iris_canvas = landmark_canvases(image.shape, landmarks)
        outputs = {
            paths.lm68: lm_canvas, paths.iris: iris_canvas,
            paths.png("segmap"): None if classes is None else colorize(classes),
            paths.png("mask"): None if classes is None else _mask(classes),
            paths.png("segmap_intersection"): colorize(inter), paths.png("mask_intersection"): _mask(inter),
        }
        for fill in ("blur", "black") if self.config.inpainting else ("blur",):
            outputs[paths.png(fill)] = build_condition(image, inter, lm_canvas, iris_canvas, fill=fill)
        for path, array in outputs.items():
            if array is not None:
                save_png(path, array)
        written = [path for path, array in outputs.items() if array is not None]
        face["outputs"] = [paths.relative(path) for path in [paths.image, *written]]
        face["mask_fraction"] = round(float(face_mask(inter).mean()), 6)
        return face

    def _write_image(self, item: InputItem, image: np.ndarray, target: Path) -> np.ndarray:
        """Save the aligned crop and return its pixels as decoded from the file (an already aligned JPEG of the
        right size is copied byte for byte), so the condition matches the training image outside the mask."""
        source = item.path
        if self.config.aligned and source.suffix.lower() in (".jpg", ".jpeg") and _same_pixels(source, image):
            if source.resolve() != target.resolve():
                with atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
            return image
        save_image(target, image, quality=self.config.jpeg_quality)
        return load_image(target, min_side=1)


def _save_fit(paths: FacePaths, fit: Any) -> dict[str, Any]:
    """Write the fitted 3DMM coefficients next to the 68-point drawing; the record names the file."""
    from appleswap.faces.tddfa.provider import save_fit

    target = paths.lm68.parent / f"{paths.name}_coeffs.safetensors"
    save_fit(target, fit)
    return {"coeffs": paths.relative(target), **fit.to_record()}


def save_png(path: Path, array: np.ndarray, level: int = PNG_LEVEL) -> Path:
    """Atomic PNG with a fast zlib level: photo-like PNGs (conditions) encode ~5x faster than at PIL's default 6
    for ~7 % more bytes; the mostly black drawings and masks stay tiny either way."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", compress_level=level)
    return path


def _same_pixels(path: Path, image: np.ndarray) -> bool:
    from PIL import Image

    with Image.open(path) as probe:
        return probe.size == (image.shape[1], image.shape[0]) and probe.mode == "RGB" and not probe.getexif().get(274)


def _as_aligned(image: np.ndarray, size: int) -> AlignedFace:
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return AlignedFace(image=image, matrix=np.array([[1.0, 0, 0], [0, 1.0, 0]]), size=size)
    sx, sy = size / width, size / height
    interp = cv2.INTER_AREA if min(sx, sy) < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (size, size), interpolation=interp)
    return AlignedFace(image=resized, matrix=np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]]), size=size)


def _points(points: np.ndarray | None) -> list | None:
    return None if points is None else np.asarray(points, dtype=np.float64).round(3).tolist()


def _mask(classes: np.ndarray) -> np.ndarray:
    """White-on-black RGB, as the authors write ``mask/`` and ``mask_intersection/`` (their blur.py reads RGB)."""
    return np.repeat(face_mask(classes).astype(np.uint8)[..., None] * 255, 3, axis=2)


def load_segmenters(config: Any, weights_dir: str | None = None, device: str | None = None) -> tuple[Any, Any, Any]:
    """The optional parser, occlusion model and aesthetic scorer named in ``config`` (None when not asked)."""
    from appleswap.weights import get_spec, locate

    def resolve(value: str | None, registry_name: str) -> Path | None:
        if not value:
            return None
        if Path(value).exists():
            return Path(value)
        name = registry_name if value in ("auto", "registry") else value
        try:
            get_spec(name)
        except KeyError:
            raise FileNotFoundError(f"{value!r} is neither an existing file nor a weights registry name") from None
        return locate(name, weights_dir)

    parser = occlusion = scorer = None
    if (path := resolve(config.parser, "face_parser")) is not None:
        from appleswap.faces.parsing import FaceParser

        parser = FaceParser.from_file(path, device=device, parity_double_norm=config.parser_double_norm)
    if (path := resolve(config.occlusion, "occlusion_deeplabv3")) is not None:
        from appleswap.faces.occlusion import OcclusionSegmenter

        occlusion = OcclusionSegmenter.from_file(path, device=device, flip=config.occlusion_flip)
    if config.aesthetic or config.min_aesthetic is not None:
        from appleswap.preprocess.aesthetic import AestheticScorer

        clip_dir = resolve(config.clip_dir or "auto", "clip_vit_l14")
        head = resolve(config.aesthetic_head or "auto", "laion_aesthetic_head")
        scorer = AestheticScorer.from_files(clip_dir, head, device=device)
    return parser, occlusion, scorer
