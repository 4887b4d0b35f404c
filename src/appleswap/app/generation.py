"""The model call of a swap: aligned 512 crops -> swapped crops, via ``SwapPipeline`` (student or teacher).

Student (default): the clean aligned target is the condition, no preprocessing (docs/method.md). Teacher: the target
crop is turned into its condition image (8x8 low-frequency face + 68 landmarks + iris, drawn from the MediaPipe
mesh, docs/method.md) and the target is inverted attribute-aware before regeneration (docs/method.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from appleswap.app.swapper import SwapConfig

log = logging.getLogger(__name__)


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
                                            parity=config.parity)
    return PipelineGenerator(pipeline, config, size=config.size)
