"""Swap faces in any photo or video frame: detect, select, align, generate, paste back, label.

Why paste-back: the APPLE model generates a whole aligned crop; only a feathered face region of that crop goes
back into the frame (through the inverse alignment), so every pixel outside the face mask stays the input's.
The region (``--face-mask mesh``, the default) is the face of the MediaPipe mesh class map (ears left out: the
target keeps its own) of the target crop united with that of the generated crop, dilated a little so the feather
straddles the face edge; when the mesh finds no face in either crop, or with ``--face-mask ellipse``, it is a
fixed FFHQ ellipse.
The watermark (on by default) is the one deliberate exception: it changes luminance by one to two grey levels
everywhere, invisibly, so that ``appleswap verify`` can tell the picture was made here.

The model call (``PipelineGenerator``): aligned 512 crops -> swapped crops, via ``SwapPipeline`` (student or
teacher). Student (default): the clean aligned target is the condition, no preprocessing (docs/method.md). Teacher:
the target crop is turned into its condition image (8x8 low-frequency face + 68 landmarks + iris, drawn from the
MediaPipe mesh, docs/method.md) and the target is inverted attribute-aware before regeneration (docs/method.md).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from appleswap.app.selection import select_faces
from appleswap.config import SPEED_HELP, Dtype, SpeedProfile, option

log = logging.getLogger(__name__)
ALIGN_SIZE = 512  # faces are aligned and pasted at 512; a model of another size resizes the crops itself
FACE_MASKS = ("mesh", "ellipse")
MESH_MASK_MARGIN = 0.01  # the 50% point of the feather lies this fraction of the crop outside the mesh face


@dataclasses.dataclass(frozen=True)
class SwapConfig:
    """Every knob of ``appleswap swap`` (and the web UI); a config file's ``[swap]`` section mirrors it."""

    model: Literal["student", "teacher"] = option(
        "student", "student: clean target in, no preprocessing; teacher: condition image + attribute-aware inversion")
    face_selector: Literal["one", "many", "reference"] = option(
        "one", "which target faces to swap: one (by --face-position in --face-selector-order), many (all), "
        "reference (those like --reference-face)")
    face_selector_order: Literal["large-small", "small-large", "left-right", "right-left", "top-bottom", "bottom-top",
                                 "best-worst", "worst-best"] = option("large-small", "face order for --face-selector one / many")
    face_position: int = option(0, "index of the face to swap in that order (--face-selector one)")
    reference_face: str | None = option(None, "photo of the person to replace (--face-selector reference)")
    reference_face_position: int = option(0, "which face of the reference photo (largest first)")
    reference_face_distance: float = option(0.6, "max ArcFace cosine distance to the reference (0 same .. 2)")
    min_face_size: int = option(32, "skip target faces whose box is smaller than this (pixels)")
    size: int = option(512, "generation size in pixels: the model's resolution (APPLE: 512)")
    steps: int = option(28, "sampling steps (paper: 28)")
    seed: int = option(0, "noise seed (paper: 0)")
    id_guidance_scale: float = option(1.0, "identity strength: >1 more source identity, weaker attributes")
    image_guidance_scale: float = option(1.0, "guidance against a black condition (with ID guidance too: one batched pass)")
    guidance_scale: float = option(1.0, "FLUX distilled guidance value (paper: 1.0)")
    fp8: bool = option(False, "fp8 transformer weights with fast fp8 accumulation (half the GPU memory, "
                       "faster on Hopper, slightly different numerics)")
    compile: bool = option(False, "torch.compile the transformer blocks on a GPU (regional: ~10-20 s once, then "
                           "~1.5x faster passes; worth it for videos and folders; same function)")
    cuda_graphs: bool = option(False, "replay each transformer pass as one CUDA graph (GPU; best with --compile)")
    speed: SpeedProfile | None = option(None, SPEED_HELP)
    offload: Literal["none", "model", "sequential"] = option(
        "none", "GPU memory tier: model (VAE in host memory between uses) or sequential (also the transformer blocks)")
    face_mask: Literal["mesh", "ellipse"] = option(
        "mesh", "paste-back region: mesh (the face from the landmark mesh of the target and generated crops, "
        "ellipse when no face is found) or ellipse (a fixed brow-to-chin ellipse)")
    face_mask_blur: float = option(0.06, "feather width of the paste-back mask, as a fraction of the crop")
    watermark: bool = option(True, "embed the invisible watermark that `appleswap verify` detects")
    watermark_key: int | None = option(None, "private watermark key (default: appleswap's public key)")
    c2pa_key: str | None = option(None, "PEM private key that signs the C2PA content credentials (with --c2pa-cert; "
                                  "default: a local self-signed key in the cache folder)")
    c2pa_cert: str | None = option(None, "PEM certificate chain of --c2pa-key, signer first")
    output_pattern: str = option("{source}-{target}{ext}", "output file name for folder targets")
    output_image_quality: int = option(95, "JPEG/WebP quality of image outputs")
    keep_audio: bool = option(True, "copy the target video's audio track")
    chunk_size: int = option(16, "video frames per resumable chunk")
    landmark_smoothing: float = option(0.6, "video: keypoint smoothing along each face track, 0 = off (< 1)")
    shared_noise: bool = option(True, "video: the same initial noise for every frame (less flicker)")
    dtype: Dtype = option("bf16", "model precision on GPU (CPU: fp32)")
    lora: str | None = option(None, "LoRA file that replaces the model's registry LoRA (apple_student / "
                              "apple_teacher), e.g. a checkpoint of `appleswap train`")
    parity: bool = option(False, "the model as the authors' scripts run it (docs/fidelity.md): bf16 ID encoder, "
                          "sampled black latent, their --second_order inversion for the teacher")

    def check(self) -> SwapConfig:
        """Validate combinations and values (the web UI builds configs without argparse's choices)."""
        from appleswap.app.selection import ORDERS, SELECTOR_MODES

        if self.model not in ("student", "teacher"):
            raise ValueError(f"--model must be student or teacher, got {self.model!r}")
        if self.face_selector not in SELECTOR_MODES:
            raise ValueError(f"--face-selector must be one of {list(SELECTOR_MODES)}, got {self.face_selector!r}")
        if self.face_selector_order not in ORDERS:
            raise ValueError(f"--face-selector-order must be one of {list(ORDERS)}, got {self.face_selector_order!r}")
        if self.size < 16 or self.size % 16:
            raise ValueError(f"--size must be a multiple of 16, got {self.size}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.face_mask not in FACE_MASKS:
            raise ValueError(f"--face-mask must be one of {list(FACE_MASKS)}, got {self.face_mask!r}")
        if not 0 <= self.face_mask_blur < 0.5:
            raise ValueError(f"--face-mask-blur must be in [0, 0.5), got {self.face_mask_blur}")
        if not 1 <= self.output_image_quality <= 100:
            raise ValueError(f"--output-image-quality must be 1..100, got {self.output_image_quality}")
        return self


def swap_section(file_data: dict[str, Any]) -> dict[str, Any]:
    """The ``[swap]`` section of a config file, or the whole file when it is flat."""
    section = file_data.get("swap", file_data)
    if not isinstance(section, dict):
        raise ValueError("config file: [swap] must be a table of swap options")  # noqa: TRY004 - CLI reports it
    return section


@dataclasses.dataclass
class SwappedFace:
    box: np.ndarray
    keypoints: np.ndarray
    index: int  # position in the frame's detections (largest first)


@dataclasses.dataclass
class SwapOutcome:
    image: np.ndarray
    swapped: list[SwappedFace]
    mask: np.ndarray  # (H, W) float32 paste-back alpha, 0 where the frame is untouched
    detections: list[Any]


# generate(identity, aligned 512 crops (N, 512, 512, 3) uint8, seed) -> (N, S, S, 3) uint8 at the model's size S
Generate = Callable[[Any, np.ndarray, int], np.ndarray]
# embed(frame, keypoints list) -> (N, D) ArcFace embeddings
Embed = Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]


def ellipse_mask(size: int = ALIGN_SIZE) -> np.ndarray:
    """The fallback paste-back region in aligned-crop space: an ellipse from brow to chin, cheek to cheek (FFHQ)."""
    mask = np.zeros((size, size), np.float32)
    centre = (round(0.5 * size), round(0.55 * size))
    axes = (round(0.34 * size), round(0.42 * size))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, thickness=-1)
    return mask


class MeshFaceMask:
    """Hard face masks of aligned crops from the MediaPipe mesh; one landmarker shared by every swapper.

    MediaPipe graphs are not thread-safe and the web UI serves requests on threads, hence the lock.
    """

    _shared: MeshFaceMask | None = None
    _create_lock = threading.Lock()

    def __init__(self) -> None:
        from appleswap.faces.landmarks import MediaPipeLandmarker

        self._landmarker = MediaPipeLandmarker()
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> MeshFaceMask:
        with cls._create_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def crop_mask(self, crop: np.ndarray) -> np.ndarray | None:
        """(S, S) bool face (skin, brows, eyes, nose, mouth, lips; no ears) of one crop; None when no face."""
        from appleswap.faces.mesh_mask import mesh_classes
        from appleswap.faces.segmap import face_mask

        try:
            with self._lock:
                mesh = self._landmarker.mesh(crop)
        except ValueError:
            return None
        return face_mask(mesh_classes(mesh, crop.shape, ears=False))

    def __call__(self, crops: Sequence[np.ndarray], dilate: int) -> np.ndarray | None:
        """Float32 0/1 union of the crops' face masks dilated by ``dilate`` pixels; None when no crop has a face."""
        masks = [m for m in (self.crop_mask(c) for c in crops) if m is not None]
        if not masks:
            return None
        union = np.logical_or.reduce(masks).astype(np.float32)
        if dilate > 0:
            union = cv2.dilate(union, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1)))
        return union


class FaceSwapper:
    """Photos and frames in, swapped frames out; model calls go through ``generate`` (a ``PipelineGenerator``)."""

    def __init__(self, generate: Generate, config: SwapConfig, *, image_size: int = ALIGN_SIZE,
                 embed: Embed | None = None, detect: Callable[[np.ndarray], list[Any]] | None = None) -> None:
        from appleswap.faces.detect import detect_faces

        self.generate = generate
        self.config = config.check()
        self.image_size = image_size
        self.embed = embed
        self.detect = detect or detect_faces
        self.mask = ellipse_mask(ALIGN_SIZE)  # the --face-mask ellipse region and the mesh mode's fallback
        self.reference: np.ndarray | None = None

    def set_reference(self, image: np.ndarray, name: str = "--reference-face") -> None:
        """Remember the ArcFace embedding of the person to replace."""
        if self.embed is None:
            raise ValueError("reference face selection needs the ArcFace model (antelopev2)")
        faces = self.detect(image)
        position = self.config.reference_face_position
        if not faces:
            raise ValueError(f"{name}: no face found in the reference photo")
        if position >= len(faces):
            raise ValueError(f"{name}: --reference-face-position {position} but only {len(faces)} face(s) found")
        self.reference = self.embed(image, [faces[position].keypoints])[0]

    def choose(self, frame: np.ndarray, faces: list[Any]) -> list[int]:
        """Indices of ``faces`` to swap under the configured selector (small faces are never chosen)."""
        big = [i for i, f in enumerate(faces) if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= self.config.min_face_size]
        if len(big) < len(faces):
            log.warning("%d face(s) smaller than --min-face-size %d px skipped", len(faces) - len(big),
                        self.config.min_face_size)
        candidates = [faces[i] for i in big]
        embeddings = None
        if self.config.face_selector == "reference":
            if self.reference is None:
                raise ValueError("--face-selector reference: call set_reference first (--reference-face)")
            embeddings = self.embed(frame, [f.keypoints for f in candidates]) if candidates else np.zeros((0, 1))
        chosen = select_faces(candidates, self.config.face_selector, order=self.config.face_selector_order,
                              position=self.config.face_position, embeddings=embeddings, reference=self.reference,
                              distance=self.config.reference_face_distance)
        return [big[i] for i in chosen]

    def swap_frame(self, frame: np.ndarray, identity: Any, *, faces: list[Any] | None = None,
                   chosen: list[int] | None = None, keypoints: list[np.ndarray] | None = None,
                   seed: int | None = None) -> SwapOutcome:
        """Swap the chosen faces of ``frame``; ``keypoints`` override the detections' (smoothed video tracks)."""
        from appleswap.faces.align import align_face, paste_back

        faces = self.detect(frame) if faces is None else faces
        chosen = self.choose(frame, faces) if chosen is None else chosen
        points = keypoints if keypoints is not None else [faces[i].keypoints for i in chosen]
        aligned = [align_face(frame, kps, ALIGN_SIZE) for kps in points]
        result, alpha = frame, np.zeros(frame.shape[:2], np.float32)
        if aligned:
            crops = np.stack([a.image for a in aligned])
            generated = self.generate(identity, crops, self.config.seed if seed is None else seed)
            for crop, face in zip(generated, aligned):
                crop = self._from_model(crop)
                mask = self.paste_mask(face.image, crop)
                result = paste_back(result, crop, face.matrix, mask=mask, feather=self.config.face_mask_blur)
                alpha = np.maximum(alpha, self._alpha(mask, face.matrix, frame.shape))
        swapped = [SwappedFace(faces[i].box, p, i) for i, p in zip(chosen, points)]
        return SwapOutcome(result, swapped, alpha, faces)

    def _from_model(self, crop: np.ndarray) -> np.ndarray:
        crop = np.asarray(crop, dtype=np.uint8)
        if crop.shape[0] == ALIGN_SIZE:
            return crop
        return cv2.resize(crop, (ALIGN_SIZE, ALIGN_SIZE), interpolation=cv2.INTER_CUBIC)

    def paste_mask(self, target_crop: np.ndarray, generated_crop: np.ndarray) -> np.ndarray:
        """(512, 512) float32 0/1 paste-back region of one face (before paste_back feathers it inward).

        Mesh mode dilates the face by the feather radius plus a margin, so the feather's midpoint lies just
        outside the face edge: the generated jaw and forehead are pasted whole, the target's do not show through.
        """
        if self.config.face_mask == "ellipse":
            return self.mask
        radius = max(round(self.config.face_mask_blur * ALIGN_SIZE), 0)
        dilate = radius + 1 + round(MESH_MASK_MARGIN * ALIGN_SIZE)
        mask = MeshFaceMask.shared()([target_crop, generated_crop], dilate)
        if mask is None:
            log.debug("face mesh found no face in the target or generated crop; pasting the ellipse")
            return self.mask
        return mask

    def _alpha(self, mask: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Where paste-back may have written (the mask warped back, before feathering shrinks it)."""
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        return cv2.warpAffine(mask, matrix, (shape[1], shape[0]), flags=flags, borderValue=0)


# --- the model call: crops -> SwapPipeline -> swapped crops, and loading it --------------------------------
def teacher_condition(crop: np.ndarray, landmarker: Any) -> np.ndarray:
    """The teacher's condition image for an aligned crop (face classes from its MediaPipe mesh); ValueError when the
    mesh finds no face in it."""
    from appleswap.faces.mesh_mask import landmark_classes, mesh_classes
    from appleswap.preprocess.condition import teacher_condition as condition_image

    landmarks = landmarker(crop)
    shape = crop.shape
    classes = mesh_classes(landmarks.mesh, shape) if landmarks.mesh is not None else landmark_classes(
        landmarks.lm68, shape)
    return condition_image(crop, classes, landmarks)


class PipelineGenerator:
    """``generate(identity, crops, seed)`` for :class:`FaceSwapper`, resizing crops to the model's size."""

    def __init__(self, pipeline: Any, config: SwapConfig, size: int = 512, model_name: str | None = None) -> None:
        self.pipeline = pipeline
        self.config = config
        self.image_size = size
        self.model_name = model_name or f"APPLE {config.model} (FLUX.1 + PuLID)"
        self._landmarker = None
        self.progress = False  # per-step bars on stderr (the CLI turns them on)

    @property
    def device(self) -> str:
        return str(self.pipeline.device)

    def _resize(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1] == self.image_size:
            return images
        return np.stack([cv2.resize(i, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
                         for i in images])

    def __call__(self, identity: Any, crops: np.ndarray, seed: int) -> np.ndarray:
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if cfg.model == "teacher":
            if self._landmarker is None:
                from appleswap.faces.landmarks import get_landmark_provider

                self._landmarker = get_landmark_provider("mediapipe")
            conditions = np.stack([teacher_condition(c, self._landmarker) for c in crops])
            kwargs = {"condition": self._resize(conditions), "invert": True}
        return self.pipeline(source=identity, target=self._resize(crops), num_steps=cfg.steps, seed=seed,
                             guidance_scale=cfg.guidance_scale, image_guidance_scale=cfg.image_guidance_scale,
                             id_guidance_scale=cfg.id_guidance_scale, progress=self.progress, **kwargs)


def check_weights(model: str, weights_dir: str | Path | None = None, lora: str | Path | None = None) -> None:
    """Name every missing file at once (a new user should not discover them one run at a time)."""
    from appleswap.weights import MissingWeightError, locate

    missing = []
    for name in ("flux", "pulid_flux", f"apple_{model}", "antelopev2", "eva02_clip_l_336"):
        if name == f"apple_{model}" and lora:
            continue
        try:
            locate(name, weights_dir)
        except MissingWeightError as error:
            missing.append(str(error))
    if missing:
        raise MissingWeightError(f"{len(missing)} weight(s) missing for --model {model} "
                                 "(`appleswap weights check` lists them all):\n" + "\n".join(missing))


def load_generator(config: SwapConfig, weights_dir: str | Path | None = None,
                   device: str | None = None) -> PipelineGenerator:
    """Build the pipeline through the weights registry (``MissingWeightError`` names any missing file)."""
    import torch

    from appleswap.config import torch_dtype
    from appleswap.devices import pick_device
    from appleswap.pipeline import SwapPipeline

    device = pick_device(device)
    dtype = torch_dtype(config.dtype) if device != "cpu" else torch.float32
    pipeline = SwapPipeline.from_pretrained(weights_dir, mode=config.model, device=device, dtype=dtype,
                                            lora_path=getattr(config, "lora", None),
                                            fp8=config.fp8, offload=config.offload,
                                            compile=config.compile, cuda_graphs=config.cuda_graphs,
                                            parity=config.parity, speed=getattr(config, "speed", None))
    return PipelineGenerator(pipeline, config, size=config.size)
