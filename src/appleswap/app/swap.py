"""The ``swap`` command and the engine the CLI and the web UI share.

The engine (``SwapEngine``): models loaded once, then photo and video jobs with labels. ``SwapEngine.load`` builds
the identity encoder (antelopev2 + EVA-CLIP + PuLID) and the APPLE pipeline through the weights registry, so a
missing file raises ``MissingWeightError`` naming it. Each job writes one labelled output (provenance metadata,
plus the watermark unless turned off) and returns a small JSON-ready record.

Thread safety (the web UI runs several jobs at once): MediaPipe graphs are not thread-safe, and
``faces.detect`` keeps one detector graph per process, so every detection of an engine goes through one
process-wide lock (``detect_faces_locked``); the loaded models (pipeline, identity encoder) are shared by all
engines made with ``with_config`` and run one job at a time under the engines' common ``lock``. Long jobs report
and stop between frames through ``on_frame`` (raise ``JobCancelled`` from it to stop).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appleswap.app.naming import check_pattern, output_name
from appleswap.app.swapper import FaceSwapper, SwapConfig, check_weights, load_generator, swap_section
from appleswap.app.video import is_video_path, probe_video, process_video
from appleswap.cli_common import HelpFormatter, common_parser, exit_status, late_required, progress_enabled
from appleswap.config import add_config_args, load_config_file, resolve_config
from appleswap.files import is_image_path, load_image, raise_if_environment
from appleswap.parity import apply_parity
from appleswap.provenance import watermark as wm
from appleswap.provenance.credentials import configure_credentials, sign_file_in_place
from appleswap.provenance.labels import provenance_record, save_labelled_image, video_tags
from appleswap.weights import env_override_name

log = logging.getLogger(__name__)

# --- the command: its flags, the (target, output) jobs, the run -------------------------------------------
DESCRIPTION = """``appleswap swap -s SOURCE... -t TARGET -o OUTPUT``: swap a face into any photo, folder or video.

Vocabulary from roop / FaceFusion: one or more source photos (their identity is averaged) or a saved identity
``.safetensors``; a target photo, folder or video; an output file or folder (folder outputs are named by
``--output-pattern``). Faces are detected, aligned, generated at the model's size and pasted back with a
feathered mask, so nothing outside the face changes (except the invisible watermark, ``--no-watermark``).
A target that fails (no face, corrupt file) is reported and the rest of the batch is still done.
"""
EPILOG = """examples:
  appleswap swap -s me.jpg -t group.jpg -o out.jpg --face-selector-order left-right --face-position 1
  appleswap swap -s me1.jpg me2.jpg -t photos/ -o swapped/ --output-pattern "{target}_swapped{ext}"
  appleswap swap -s me.safetensors -t clip.mp4 -o clip_swapped.mp4 --face-selector reference --reference-face them.jpg
  appleswap swap -s me.jpg -t target.jpg -o out.png --model teacher --id-guidance-scale 1.5
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("swap", parents=[common_parser()], help="swap a face into photos, folders, videos",
                                   description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    late_required(parser, "-s", "--source", nargs="+", metavar="SOURCE", group=io,
                  help="source photo(s) of one person, or an identity .safetensors (appleswap identity)")
    late_required(parser, "-t", "--target", group=io, help="target photo, video, or folder of them")
    late_required(parser, "-o", "--output", group=io, help="output file, or folder (named by --output-pattern)")
    add_config_args(parser.add_argument_group("swap options (config file section [swap])"), SwapConfig)
    parser.set_defaults(func=run)


def plan_jobs(target: Path, output: Path, sources: list[str], pattern: str) -> list[tuple[Path, Path]]:
    """(target, output) pairs: a folder target maps every photo/video in it to the output folder."""
    check_pattern(pattern)
    if not target.exists():
        raise FileNotFoundError(f"-t/--target {target}: no such file or folder")
    if target.is_dir():
        items = sorted(p for p in target.iterdir() if p.is_file() and (is_image_path(p) or is_video_path(p)))
        if not items:
            raise ValueError(f"-t/--target {target}: no photos or videos in this folder")
        if output.suffix and not output.is_dir():
            raise ValueError(f"-o/--output {output}: a folder target needs an output folder, not a file name")
        return [(item, output / output_name(pattern, sources[0], item, i, video=is_video_path(item)))
                for i, item in enumerate(items)]
    if not (is_image_path(target) or is_video_path(target)):
        raise ValueError(f"-t/--target {target}: unsupported file type {target.suffix!r}")
    if output.is_dir() or not output.suffix:
        return [(target, output / output_name(pattern, sources[0], target, video=is_video_path(target)))]
    if is_video_path(target) and output.suffix.lower() != ".mp4":
        raise ValueError(f"-o/--output {output}: video outputs are written as .mp4")
    return [(target, output)]


def check_sources(sources: list[str]) -> None:
    for source in sources:
        if not Path(source).is_file():
            raise FileNotFoundError(f"-s/--source {source}: no such file")


def run_jobs(engine, identity, sources: list[str], jobs: list[tuple[Path, Path]], progress: bool) -> list[dict]:
    """Run every job; a failing target becomes an error record and the batch goes on."""
    from tqdm import tqdm  # kept out of `appleswap --help`

    results = []
    for target, output in tqdm(jobs, desc="targets", unit="file", disable=not progress or len(jobs) < 2):
        engine.show_steps(progress and not is_video_path(target))  # videos: one bar over their frames
        try:
            if is_video_path(target):
                result = engine.swap_video_file(identity, sources, target, output, progress=progress)
                if result.get("frames_swapped") == 0:  # as a photo without a face: a failed target, no output
                    output.unlink(missing_ok=True)
                    raise ValueError(f"{target}: no face was swapped in any frame")
            else:
                result = engine.swap_image_file(identity, sources, target, output)
        except (ValueError, FileNotFoundError) as error:  # a bad target; faults of the machine stop the batch
            raise_if_environment(error, output)
            log.error("%s", error)
            result = {"target": str(target), "status": "error", "error": str(error)}
        except OSError as error:  # disk full, no permission...: stop the batch with the path and the cause
            raise_if_environment(error, output)
            raise
        results.append(result)
    return results


def use_lora(config) -> None:
    """``--lora PATH``: the file stands in for the model's registry LoRA (its ``APPLESWAP_WEIGHT_*`` override),
    so the weights check before loading looks for it instead of the released one."""
    if config.lora:
        if not Path(config.lora).is_file():
            raise FileNotFoundError(f"--lora {config.lora}: no such file")
        os.environ[env_override_name(f"apple_{config.model}")] = str(Path(config.lora).expanduser())


def run(args: argparse.Namespace) -> int:
    config = apply_parity(resolve_config(SwapConfig, args, swap_section(load_config_file(args.config))), "swap")
    config = config.check()
    if config.face_selector == "reference" and not config.reference_face:
        raise ValueError("--face-selector reference needs --reference-face PHOTO")
    check_sources(args.source)
    jobs = plan_jobs(Path(args.target), Path(args.output), args.source, config.output_pattern)
    use_lora(config)
    engine = SwapEngine.load(config, args.weights_dir, args.device)
    identity = engine.source_identity(args.source)
    results = run_jobs(engine, identity, args.source, jobs, progress=progress_enabled(args))
    done = [r for r in results if r["status"] == "ok"]
    for result in results:
        if result["status"] == "ok":
            print(f"{result['target']} -> {result['output']}" + (f": {result['summary']}" if "summary" in result else ""))
        else:
            print(f"{result['target']}: FAILED: {result['error']}")
    print(f"appleswap swap: {len(done)} of {len(results)} done; outputs are labelled AI-generated"
          + (" and watermarked" if config.watermark else ""))
    return exit_status(len(done), len(results) - len(done))


# --- the engine: models loaded once, labelled photo and video jobs (CLI and web UI) ----------------------
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
        from appleswap.app.tracking import VideoSwapProcessor  # scipy: kept out of `appleswap --help`

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
