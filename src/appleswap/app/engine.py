"""The swap engine behind the CLI and the web UI: models loaded once, then photo and video jobs with labels.

``SwapEngine.load`` builds the identity encoder (antelopev2 + EVA-CLIP + PuLID) and the APPLE pipeline through
the weights registry, so a missing file raises ``MissingWeightError`` naming it. Each job writes one labelled
output (provenance metadata, plus the watermark unless turned off) and returns a small JSON-ready record.

Thread safety (the web UI runs several jobs at once): MediaPipe graphs are not thread-safe, and
``faces.detect`` keeps one detector graph per process, so every detection of an engine goes through one
process-wide lock (``detect_faces_locked``); the loaded models (pipeline, identity encoder) are shared by all
engines made with ``with_config`` and run one job at a time under the engines' common ``lock``. Long jobs report
and stop between frames through ``on_frame`` (raise ``JobCancelled`` from it to stop).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appleswap.app.swapper import FaceSwapper, SwapConfig
from appleswap.app.tracking import VideoSwapProcessor
from appleswap.files import load_image
from appleswap.provenance import watermark as wm
from appleswap.provenance.credentials import configure_credentials, sign_file_in_place
from appleswap.provenance.labels import provenance_record, save_labelled_image, video_tags

log = logging.getLogger(__name__)
IDENTITY_SUFFIX = ".safetensors"
_DETECT_LOCK = threading.Lock()
FrameCallback = Callable[[int, int], None]  # (frames done, frames in all) after each video frame


class JobCancelled(Exception):
    """Raised by an ``on_frame`` callback to stop a video job between frames."""


def detect_faces_locked(image: np.ndarray) -> list[Any]:
    """``faces.detect.detect_faces`` under the process-wide lock its shared MediaPipe graphs need."""
    from appleswap.faces.detect import detect_faces

    with _DETECT_LOCK:
        return detect_faces(image)


class SwapEngine:
    """Source identity + ``FaceSwapper`` + labelled writing of photos and videos."""

    def __init__(self, swapper: FaceSwapper, encode: Callable[[list[np.ndarray], list[str]], Any] | None,
                 model_name: str, lock: threading.RLock | None = None) -> None:
        self.swapper = swapper
        self.config = swapper.config
        self.encode = encode
        self.model_name = model_name
        self.lock = lock or threading.RLock()  # the models: one job's model call at a time

    def detect(self, image: np.ndarray) -> list[Any]:
        """Faces of an RGB image, largest first (safe to call from any thread)."""
        return self.swapper.detect(image)

    @classmethod
    def load(cls, config: SwapConfig, weights_dir: str | Path | None = None, device: str | None = None) -> SwapEngine:
        """Load every model through the registry (``MissingWeightError`` names what is missing and where)."""
        import torch

        from appleswap.app.generation import check_weights, load_generator
        from appleswap.identity.align import arcface_crop
        from appleswap.identity.encoder import IdentityEncoder

        config = config.check()
        configure_credentials(config.c2pa_key, config.c2pa_cert)  # fails fast on an unusable key
        check_weights(config.model, weights_dir)
        generator = load_generator(config, weights_dir, device)
        encoder = IdentityEncoder.from_pretrained(weights_dir, device=generator.device,
                                                  dtype=getattr(torch, generator.pipeline.id_dtype))
        generator.pipeline.identity_encoder = encoder  # one encoder for sources, references and the pipeline

        def embed(frame: np.ndarray, keypoints: Sequence[np.ndarray]) -> np.ndarray:
            if not len(keypoints):
                return np.zeros((0, encoder.arcface.dim or 512), np.float32)
            size = encoder.arcface.input_size
            crops = np.stack([arcface_crop(frame, np.asarray(k, np.float32), size) for k in keypoints])
            return encoder.arcface.embed(crops)

        def encode(images: list[np.ndarray], names: list[str]) -> Any:
            return encoder.encode_identity(images, names=names)

        swapper = FaceSwapper(generator, config, image_size=generator.image_size, embed=embed,
                              detect=detect_faces_locked)
        engine = cls(swapper, encode, generator.model_name)
        if config.face_selector == "reference":
            engine.set_reference(config.reference_face)
        return engine

    def with_config(self, config: SwapConfig) -> SwapEngine:
        """The same loaded models under other knobs (the web UI's per-request settings)."""
        old = self.swapper
        if config.model != self.config.model:
            raise ValueError(f"this engine runs the {self.config.model}; load another for --model {config.model}")
        generate = old.generate
        image_size = old.image_size
        if hasattr(generate, "config"):  # PipelineGenerator: same pipeline, new steps / seed / guidance / size
            generate = copy.copy(generate)
            generate.config = config
            generate.image_size = image_size = config.size
        swapper = FaceSwapper(generate, config, image_size=image_size, embed=old.embed, detect=old.detect)
        return SwapEngine(swapper, self.encode, self.model_name, lock=self.lock)

    def set_reference(self, path: str | Path | None) -> None:
        if not path:
            raise ValueError("--face-selector reference needs --reference-face PHOTO")
        image = load_image(path)
        with self.lock:
            self.swapper.set_reference(image, name=str(path))

    def source_identity(self, sources: Sequence[str | Path]) -> Any:
        """A saved identity (``.safetensors``) or the identity averaged over one or more source photos."""
        from appleswap.identity.store import load_identity

        paths = [Path(s) for s in sources]
        if not paths:
            raise ValueError("-s/--source: give at least one source photo or identity file")
        identities = [p for p in paths if p.suffix.lower() == IDENTITY_SUFFIX]
        if identities:
            if len(paths) > 1:
                raise ValueError("-s/--source: an identity .safetensors file cannot be mixed with other sources")
            return load_identity(paths[0])[0]
        if self.encode is None:
            raise ValueError("this engine has no identity encoder; pass a saved identity .safetensors")
        images = [load_image(p) for p in paths]
        with self.lock:
            return self.encode(images, [str(p) for p in paths])

    def record(self, sources: Sequence[str | Path], target: str | Path, **extra: Any) -> dict[str, Any]:
        cfg = self.config
        return provenance_record(
            self.model_name, watermarked=cfg.watermark, source=[Path(s).name for s in sources],
            target=Path(target).name, steps=cfg.steps, seed=cfg.seed, id_guidance_scale=cfg.id_guidance_scale, **extra)

    def _mark(self, image: np.ndarray, strength: float = wm.DEFAULT_STRENGTH) -> np.ndarray:
        if not self.config.watermark:
            return image
        key = self.config.watermark_key if self.config.watermark_key is not None else wm.DEFAULT_KEY
        return wm.embed_watermark(image, key, strength)

    def swap_image(self, identity: Any, target: np.ndarray, name: str = "target"):
        """Swap one decoded photo; ValueError (naming ``name``) when no face qualifies."""
        faces = self.swapper.detect(target)
        if not faces:
            raise ValueError(f"{name}: no face found in the target")
        chosen = self.swapper.choose(target, faces)
        if not chosen:
            raise ValueError(f"{name}: {len(faces)} face(s) found but none selected "
                             f"(--face-selector {self.config.face_selector}, --min-face-size {self.config.min_face_size})")
        with self.lock:
            outcome = self.swapper.swap_frame(target, identity, faces=faces, chosen=chosen)
        outcome.image = self._mark(outcome.image)
        return outcome

    def show_steps(self, on: bool = True) -> None:
        """Per-step bars (tqdm on stderr) in photo swaps, for the CLI (the web page tracks the samplers' bars even
        when they are not drawn)."""
        generate = getattr(self.swapper, "generate", None)
        if hasattr(generate, "progress"):
            generate.progress = on

    def swap_image_file(self, identity: Any, sources: Sequence[str | Path], target: str | Path,
                        output: str | Path) -> dict[str, Any]:
        outcome = self.swap_image(identity, load_image(target), str(target))
        self.save_output(output, outcome.image, sources, target, faces_swapped=len(outcome.swapped))
        boxes = [f.box.round(1).tolist() for f in outcome.swapped]
        return {"target": str(target), "output": str(output), "faces": boxes, "status": "ok"}

    def save_output(self, output: str | Path, image: np.ndarray, sources: Sequence[str | Path], target: str | Path,
                    **extra: Any) -> Path:
        """Write a swapped (already watermarked) photo with its label and signed C2PA credentials, ``target`` as
        the edited parent: the one writer for every front end (CLI, web UI)."""
        record = self.record(sources, target, **extra)
        return save_labelled_image(output, image, record, quality=self.config.output_image_quality, parent=target)

    def swap_video_file(self, identity: Any, sources: Sequence[str | Path], target: str | Path,
                        output: str | Path, progress: bool = True, *, crf: int = 18,
                        on_frame: FrameCallback | None = None) -> dict[str, Any]:
        """Swap every frame of a video (H.264 at ``crf``); ``on_frame`` hears of each frame and may cancel."""
        from appleswap.app.video import probe_video, process_video

        total = probe_video(target).frame_count if on_frame is not None else 0
        processor = VideoSwapProcessor(self.swapper, identity, lambda frame: self._mark(frame, wm.VIDEO_STRENGTH),
                                       name=str(target), lock=self.lock, on_frame=on_frame, total=total)
        cfg = self.config
        settings = {"sources": [str(s) for s in sources], "model": self.model_name, "config": repr(cfg)}
        record = self.record(sources, target)
        info = process_video(target, output, processor, chunk_size=cfg.chunk_size, settings=settings,
                             tags=video_tags(record), keep_audio=cfg.keep_audio, crf=crf, progress=progress)
        sign_file_in_place(output, record, parent=target)
        summary = processor.summary
        log.info("%s: %s", target, summary.line())
        return {"target": str(target), "output": str(output), "frames": info.frame_count,
                "frames_swapped": summary.frames_swapped, "faces_swapped": summary.faces_swapped,
                "summary": summary.line(), "status": "ok"}
