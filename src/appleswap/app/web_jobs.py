"""What the web UI does for a request, without the UI toolkit: checked uploads, face crops, swap jobs.

Every upload is checked before any model sees it (readable, at most ``max_pixels`` per photo or video frame);
a swap job runs in its own folder, reports per-frame progress, stops between frames when cancelled, and its
intermediate files are removed when it ends; old job folders are swept. Errors meant for the user are
``UserError`` with every absolute path cut down to its file name.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
MAX_PIXELS = 40_000_000  # per photo or video frame (a 8K frame is 33 MP)
JOB_MAX_AGE_S = 3600.0  # finished job folders older than this are removed at the next job
_PATH = re.compile(r"(?<![\w.~])(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:]+)+[\\/]([^\s'\"\\/:]+)")
# report(done, total, description); total None = a stage without a count
Report = Callable[[int, int | None, str], None]


class UserError(ValueError):
    """A message for the page (bad upload, no face, cancelled, ...)."""


def scrub_paths(message: str) -> str:
    """``/srv/x/uploads/ab12/photo.jpg: no face`` -> ``photo.jpg: no face``: the page never shows server paths."""
    return _PATH.sub(r"\1", message)


def crop_face(image: np.ndarray, box: Sequence[float], margin: float = 0.35, size: int = 160) -> np.ndarray:
    """A square crop around a face box with some context, resized to ``size`` (the face gallery's tiles)."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    height, width = image.shape[:2]
    left, top = round(cx - side / 2), round(cy - side / 2)
    right, bottom = left + round(side), top + round(side)
    padded = cv2.copyMakeBorder(image, max(0, -top), max(0, bottom - height), max(0, -left), max(0, right - width),
                                cv2.BORDER_CONSTANT, value=(0, 0, 0))
    crop = padded[top + max(0, -top):bottom + max(0, -top), left + max(0, -left):right + max(0, -left)]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def read_frame(path: str | Path, seconds: float = 0.0) -> np.ndarray:
    """The first frame at or after ``seconds`` of a video, RGB uint8."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if seconds > 0 and stream.time_base:
            container.seek(int(seconds / stream.time_base), stream=stream, backward=True)
        last = None
        for frame in container.decode(stream):
            last = frame
            if frame.time is None or frame.time >= seconds - 1e-6:
                break
        if last is None:
            raise UserError(f"{Path(path).name}: the video has no frame at {seconds:g} s")
        return last.to_ndarray(format="rgb24")


def trim_video(source: Path, output: Path, start: float, end: float | None) -> int:
    """Frames [start, end) seconds of ``source`` (and its audio) into a lossless MKV; returns the frame count."""
    import av

    if end is not None and end <= start:
        raise UserError(f"video trim: the end ({end:g} s) must come after the start ({start:g} s)")
    inside = (lambda t: t is not None and t >= start - 1e-6 and (end is None or t < end - 1e-6))
    frames = 0
    with av.open(str(source)) as video_in, av.open(str(output), "w", format="matroska") as out:
        stream_in = video_in.streams.video[0]
        stream = out.add_stream("ffv1", rate=stream_in.average_rate or stream_in.guessed_rate or 25)
        stream.width, stream.height = stream_in.codec_context.width, stream_in.codec_context.height
        stream.pix_fmt = "bgr0"
        audio_out = None
        if video_in.streams.audio:
            audio_in = video_in.streams.audio[0]
            audio_out = out.add_stream("aac", rate=audio_in.codec_context.sample_rate or 48000)
        if start > 0 and stream_in.time_base:
            video_in.seek(int(start / stream_in.time_base), stream=stream_in, backward=True)
        for frame in video_in.decode(stream_in):
            if end is not None and frame.time is not None and frame.time >= end - 1e-6:
                break
            if inside(frame.time):
                image = frame.to_ndarray(format="rgb24")
                out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
                frames += 1
        out.mux(stream.encode(None))
        if audio_out is not None:
            with av.open(str(source)) as audio_file:
                for frame in audio_file.decode(audio=0):
                    if inside(frame.time):
                        frame.pts = None
                        out.mux(audio_out.encode(frame))
            out.mux(audio_out.encode(None))
    if not frames:
        raise UserError(f"video trim: no frame between {start:g} s and {'the end' if end is None else f'{end:g} s'}")
    return frames


@dataclasses.dataclass(frozen=True)
class Target:
    path: Path
    video: bool
    width: int
    height: int
    frames: int = 1
    fps: float = 0.0


@dataclasses.dataclass
class SwapResult:
    output: Path
    video: bool
    before: Path | None  # the photo before the swap (the slider's left side)
    message: str


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    start: float = 0.0  # seconds
    end: float | None = None  # seconds; None = to the end
    quality: int = 18  # H.264 CRF: lower is better and bigger


class WebJobs:
    """Request logic behind the UI: checks uploads, finds faces, runs swaps in job folders under ``work_dir``.

    ``engine_for(config)`` gives a ``SwapEngine`` for a ``SwapConfig`` (models loaded once per model kind).
    """

    def __init__(self, engine_for: Callable[[Any], Any], work_dir: str | Path, defaults: Any, *,
                 max_pixels: int = MAX_PIXELS, job_max_age_s: float = JOB_MAX_AGE_S) -> None:
        self.engine_for = engine_for
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.defaults = defaults
        self.max_pixels = max_pixels
        self.job_max_age_s = job_max_age_s

    # ---- uploads
    def check_target(self, path: str | Path | None) -> Target:
        """The target's kind and size; UserError when it is missing, unreadable or over the pixel limit."""
        from appleswap.app.video import is_video_path, probe_video
        from appleswap.files import is_image_path

        if not path:
            raise UserError("choose a target photo or video (where the face goes)")
        path = Path(path)
        if is_video_path(path):
            try:
                info = probe_video(path)
            except (ValueError, FileNotFoundError) as error:
                raise UserError(scrub_paths(str(error))) from error
            self._check_pixels(path, info.width, info.height)
            return Target(path, True, info.width, info.height, info.frame_count, float(info.fps))
        if not is_image_path(path):
            raise UserError(f"{path.name}: neither a photo nor a video this app reads")
        width, height = self._image_size(path)
        return Target(path, False, width, height)

    def check_sources(self, paths: Sequence[str | Path] | None) -> list[Path]:
        """Source photos (checked like targets) or one saved identity ``.safetensors``."""
        from appleswap.app.swap import IDENTITY_SUFFIX

        paths = [Path(p) for p in paths or []]
        if not paths:
            raise UserError("choose at least one source photo (the face to put in)")
        for path in paths:
            if path.suffix.lower() != IDENTITY_SUFFIX:
                self._image_size(path)
        return paths

    def _image_size(self, path: Path) -> tuple[int, int]:
        from PIL import Image

        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise UserError(f"{path.name}: not a readable photo ({scrub_paths(str(error))})") from error
        self._check_pixels(path, width, height)
        return width, height

    def _check_pixels(self, path: Path, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise UserError(f"{path.name}: {width}x{height} is {width * height / 1e6:.1f} MP, over this app's "
                            f"{self.max_pixels / 1e6:g} MP limit per photo or frame; downscale it first")

    def load(self, target: Target, seconds: float = 0.0) -> np.ndarray:
        """The target photo, or the video's frame at ``seconds`` (where the face gallery looks)."""
        from appleswap.files import ImageLoadError, load_image

        try:
            if target.video:
                return read_frame(target.path, seconds)
            return load_image(target.path, max_pixels=self.max_pixels)
        except (ImageLoadError, ValueError) as error:
            raise UserError(scrub_paths(str(error))) from error

    # ---- faces
    def faces(self, target: Target, order: str, seconds: float = 0.0) -> list[np.ndarray]:
        """Crops of the target's faces in ``order``: gallery tile i is ``--face-position i``."""
        from appleswap.app.selection import order_faces
        from appleswap.app.swap import detect_faces_locked

        image = self.load(target, seconds)
        detections = detect_faces_locked(image)  # no model needed: the gallery shows before the first swap
        return [crop_face(image, detections[i].box) for i in order_faces(detections, order)]

    def face_files(self, target: Target, order: str, seconds: float = 0.0) -> list[Path]:
        """``faces`` written as JPEG files in a fresh folder (served files are never rewritten while read)."""
        from PIL import Image

        folder = self._new_folder()
        paths = []
        for index, crop in enumerate(self.faces(target, order, seconds)):
            paths.append(folder / f"face-{index}.jpg")
            Image.fromarray(crop).save(paths[-1], quality=90)
        return paths

    def _new_folder(self) -> Path:
        self.sweep()
        folder = self.work_dir / uuid.uuid4().hex
        folder.mkdir()
        return folder

    # ---- swapping
    def config(self, **knobs: Any) -> Any:
        """The defaults with the page's knobs; UserError naming a bad one."""
        try:
            return dataclasses.replace(self.defaults, **knobs).check()
        except (TypeError, ValueError) as error:
            raise UserError(str(error)) from error

    def swap(self, sources: Sequence[str | Path], target_path: str | Path, config: Any, *,
             video: VideoOptions | None = None, report: Report | None = None,
             cancelled: threading.Event | None = None) -> SwapResult:
        """One swap job: photo (the result and the photo before) or video (trimmed, re-encoded at ``quality``).

        Raises ``JobCancelled`` (nothing left behind) once ``cancelled`` is set: between stages, or between frames.
        """
        from appleswap.app.naming import output_name
        from appleswap.app.swap import JobCancelled
        from appleswap.files import ImageLoadError

        report = report or (lambda done, total, desc: None)
        cancelled = cancelled or threading.Event()
        self._stop_if(cancelled)  # cancelled while it waited in the queue
        video = video or VideoOptions()
        sources = self.check_sources(sources)
        target = self.check_target(target_path)
        job = self._new_folder()
        name = output_name(config.output_pattern, sources[0].name, target.path.name, video=target.video)
        output = job / name
        try:
            report(0, None, "loading the model")
            engine = self.engine_for(config)
            self._stop_if(cancelled)
            report(0, None, "reading the source face")
            identity = engine.source_identity(sources)
            self._stop_if(cancelled)
            if target.video:
                return self._swap_video(engine, identity, sources, target, output, video, report, cancelled)
            report(0, None, "swapping")
            result = engine.swap_image_file(identity, sources, target.path, output)
            count = len(result["faces"])
            return SwapResult(output, False, target.path,
                              f"done: {output.name}, {count} face(s) swapped (labelled AI-generated)")
        except JobCancelled:
            shutil.rmtree(job, ignore_errors=True)
            raise
        except (ImageLoadError, ValueError, FileNotFoundError) as error:
            shutil.rmtree(job, ignore_errors=True)
            raise UserError(scrub_paths(str(error))) from error
        except BaseException:
            shutil.rmtree(job, ignore_errors=True)
            raise

    def _swap_video(self, engine: Any, identity: Any, sources: list[Path], target: Target, output: Path,
                    options: VideoOptions, report: Report, cancelled: threading.Event) -> SwapResult:
        from appleswap.app.swap import JobCancelled

        clip = target.path
        trimmed = options.start > 0 or options.end is not None
        if trimmed:
            report(0, None, "cutting the clip")
            clip = output.with_name("clip-" + target.path.stem + ".mkv")
            trim_video(target.path, clip, options.start, options.end)

        def on_frame(done: int, total: int) -> None:
            if cancelled.is_set():
                raise JobCancelled
            report(done, total, "frames")

        report(0, target.frames, "frames")

        try:
            result = engine.swap_video_file(identity, sources, clip, output, progress=False, crf=options.quality,
                                            on_frame=on_frame)
        finally:
            if trimmed:
                clip.unlink(missing_ok=True)
        return SwapResult(output, True, None, f"done: {output.name}, {result['frames_swapped']} of "
                                              f"{result['frames']} frame(s) swapped (labelled AI-generated)")

    @staticmethod
    def _stop_if(cancelled: threading.Event) -> None:
        from appleswap.app.swap import JobCancelled

        if cancelled.is_set():
            raise JobCancelled

    def sweep(self) -> None:
        """Remove job folders older than ``job_max_age_s`` (their results were served long ago)."""
        now = time.time()
        for folder in self.work_dir.iterdir():
            try:
                if folder.is_dir() and now - folder.stat().st_mtime > self.job_max_age_s:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                continue


def engine_cache(weights_dir: str | Path | None, device: str | None) -> Callable[[Any], Any]:
    """SwapConfig -> SwapEngine, loading each model kind (student / teacher) once, whichever thread asks first."""
    from appleswap.app.swap import SwapEngine

    engines: dict[str, Any] = {}
    lock = threading.Lock()

    def get(config: Any) -> Any:
        with lock:
            if config.model not in engines:
                engines[config.model] = SwapEngine.load(dataclasses.replace(config, face_selector="one"),
                                                        weights_dir, device)
            engine = engines[config.model]
        return engine.with_config(config)

    return get
