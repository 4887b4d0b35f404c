"""Video in and out with PyAV (no system ffmpeg): probe, decode, resumable chunked processing, audio kept.

Why chunks: a diffusion swap takes seconds per frame, so a long video is cut into chunks of N frames; each
finished chunk is a lossless file on disk (``<output>.parts/chunk_00000.mkv`` + the processor's state) and a
re-run of the same command skips them. The final file is encoded once from the chunks, with the source's frame
rate and its audio stream copied (or re-encoded to AAC when MP4 cannot hold it), plus provenance tags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from appleswap.files import atomic_path, save_json

log = logging.getLogger(__name__)
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
_MP4_AUDIO_COPY = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: Fraction
    frame_count: int
    codec: str
    has_audio: bool


class FrameProcessor(Protocol):
    """What ``process_video`` drives: one frame at a time, with a state saved after each chunk (tracks).

    A processor may also have ``finish()``, called after the last frame and before the output is written: a
    ValueError from it (nothing to swap in the whole video, say) leaves no output and no chunks behind.
    """

    def __call__(self, frame: np.ndarray, index: int) -> np.ndarray: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


SIGNATURE_SIDE = 32  # frames are compared as 32 x 32 grey thumbnails
CUT_SEARCH = 4  # thumbnail pixels (1/8 of the frame) of camera motion tried before calling a change a cut
CUT_THRESHOLD = 0.5  # mean absolute difference of the normalised thumbnails: pans, zooms, exposure < 0.25, cuts > 0.8


def frame_signature(frame: np.ndarray) -> np.ndarray:
    """A (32, 32) float32 grey thumbnail of an RGB frame, normalised to mean 0 and unit spread (exposure-free)."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (SIGNATURE_SIDE, SIGNATURE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (small - small.mean()) / max(float(small.std()), 1.0)


def is_scene_cut(previous: np.ndarray | None, current: np.ndarray) -> bool:
    """Whether two consecutive frame signatures lie on either side of a cut (a new shot starts).

    The thumbnails are compared at every shift up to ``CUT_SEARCH`` pixels and the best match counts, so camera
    motion and exposure changes are not cuts; a new scene matches at no shift.
    """
    if previous is None:
        return True
    side, reach = previous.shape[0], CUT_SEARCH
    best = np.inf
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            before = previous[max(dy, 0):side + min(dy, 0), max(dx, 0):side + min(dx, 0)]
            after = current[max(-dy, 0):side + min(-dy, 0), max(-dx, 0):side + min(-dx, 0)]
            best = min(best, float(np.abs(before - after).mean()))
    return best > CUT_THRESHOLD


def _open(path: Path):
    import av

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable video ({error})") from error


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame rate, frame count and audio presence; ValueError naming the file when it cannot be decoded."""
    import av

    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        try:
            codec = stream.codec_context.name
            av.codec.Codec(codec, "r")
        except (av.error.FFmpegError, ValueError) as error:
            raise ValueError(f"{path}: unsupported video codec ({error})") from error
        fps = Fraction(stream.average_rate or stream.guessed_rate or 25)
        count = stream.frames
        if not count:  # containers without a frame count: decode to count
            count = sum(1 for _ in _decode(container, path))
        return VideoInfo(path, stream.codec_context.width, stream.codec_context.height, fps, int(count), codec,
                         bool(container.streams.audio))


def _decode(container, path: Path) -> Iterator[Any]:
    import av

    try:
        yield from container.decode(video=0)
    except av.error.FFmpegError as error:
        raise ValueError(f"{path}: video is corrupt or truncated ({error})") from error


def iter_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Decode every frame as uint8 RGB (H, W, 3)."""
    path = Path(path)
    with _open(path) as container:
        for frame in _decode(container, path):
            yield frame.to_ndarray(format="rgb24")


def _write_chunk(path: Path, frames: list[np.ndarray], fps: Fraction) -> None:
    """Lossless FFV1 chunk, so the final encode is the only lossy step."""
    import av

    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="matroska") as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))


@dataclasses.dataclass
class ChunkPlan:
    """Where the chunks of one output live and which settings they were made with."""

    work_dir: Path
    fingerprint: dict[str, Any]

    def chunk(self, index: int) -> Path:
        return self.work_dir / f"chunk_{index:05d}.mkv"

    def state(self, index: int) -> Path:
        return self.work_dir / f"chunk_{index:05d}.json"

    def prepare(self) -> None:
        """Keep finished chunks only when the source and the settings are the same as last time."""
        manifest = self.work_dir / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()) != self.fingerprint:
            log.info("settings or source changed since the last run: starting %s afresh", self.work_dir)
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        save_json(manifest, self.fingerprint)

    def done(self, index: int) -> bool:
        return self.chunk(index).is_file() and self.state(index).is_file()


def process_video(source: str | Path, output: str | Path, processor: FrameProcessor, *, chunk_size: int = 32,
                  settings: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                  keep_audio: bool = True, crf: int = 18, progress: bool = True) -> VideoInfo:
    """Run ``processor`` on every frame of ``source`` and write ``output`` (MP4) with the source's fps and audio."""
    from tqdm import tqdm

    info = probe_video(source)
    output = Path(output)
    stat = info.path.stat()
    plan = ChunkPlan(output.with_name(output.name + ".parts"), {
        "source": str(info.path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime,
        "frames": info.frame_count, "chunk_size": chunk_size, "settings": settings or {}})
    plan.prepare()
    n_chunks = max(1, -(-info.frame_count // chunk_size))
    first_todo = next((i for i in range(n_chunks) if not plan.done(i)), n_chunks)
    if first_todo:
        log.info("resuming: %d of %d chunks already done", first_todo, n_chunks)
        processor.load_state(json.loads(plan.state(first_todo - 1).read_text()))
    bar = tqdm(total=info.frame_count, initial=min(first_todo * chunk_size, info.frame_count), unit="frame",
               desc=output.name, disable=not progress)
    buffer: list[np.ndarray] = []
    for index, frame in enumerate(iter_frames(info.path)):
        chunk = index // chunk_size
        if chunk < first_todo:
            continue
        buffer.append(processor(frame, index))
        bar.update(1)
        if len(buffer) == chunk_size:
            _finish_chunk(plan, chunk, buffer, info.fps, processor)
            buffer = []
    if buffer:
        _finish_chunk(plan, (info.frame_count - 1) // chunk_size, buffer, info.fps, processor)
    bar.close()
    finish = getattr(processor, "finish", None)
    if finish is not None:
        try:
            finish()
        except ValueError:
            shutil.rmtree(plan.work_dir)  # nothing worth resuming: the run as a whole has nothing to write
            raise
    chunks = sorted(plan.work_dir.glob("chunk_*.mkv"))
    assemble(chunks, output, info, tags=tags, keep_audio=keep_audio, crf=crf)
    shutil.rmtree(plan.work_dir)
    return info


def _finish_chunk(plan: ChunkPlan, chunk: int, frames: list[np.ndarray], fps: Fraction,
                  processor: FrameProcessor) -> None:
    _write_chunk(plan.chunk(chunk), frames, fps)
    save_json(plan.state(chunk), processor.state())


def _add_audio(out, source: Path):
    """An output audio stream for the source's first audio track: copied when MP4 can hold it, else AAC."""
    import av

    container = av.open(str(source))
    if not container.streams.audio:
        container.close()
        return None, None, None
    audio_in = container.streams.audio[0]
    if audio_in.codec_context.name in _MP4_AUDIO_COPY:
        return container, audio_in, out.add_stream_from_template(audio_in)
    audio_out = out.add_stream("aac", rate=audio_in.codec_context.sample_rate or 48000)
    return container, audio_in, audio_out


def assemble(chunks: list[Path], output: Path, info: VideoInfo, *, tags: dict[str, str] | None = None,
             keep_audio: bool = True, crf: int = 18) -> None:
    """Encode the chunk frames into ``output`` (H.264) and copy the source's audio; written atomically."""
    import av

    options = {"movflags": "use_metadata_tags+faststart"}
    with atomic_path(output) as tmp, av.open(str(tmp), "w", format="mp4", options=options) as out:
        out.metadata.update(tags or {})
        even = info.width % 2 == 0 and info.height % 2 == 0
        stream = out.add_stream("libx264", rate=info.fps, options={"crf": str(crf)})
        stream.width, stream.height = info.width, info.height
        stream.pix_fmt = "yuv420p" if even else "yuv444p"
        audio = _add_audio(out, info.path) if keep_audio else (None, None, None)
        for path in chunks:
            with av.open(str(path)) as chunk:
                for frame in chunk.decode(video=0):
                    image = frame.to_ndarray(format="rgb24")
                    out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
        if audio[0] is not None:
            _mux_audio(out, *audio)


def _mux_audio(out, container, audio_in, audio_out) -> None:
    copy = audio_out.codec_context.name == audio_in.codec_context.name and audio_in.codec_context.name in _MP4_AUDIO_COPY
    with container:
        for packet in container.demux(audio_in):
            if copy:
                if packet.dts is None:
                    continue
                packet.stream = audio_out
                out.mux(packet)
            else:
                for frame in packet.decode():
                    frame.pts = None
                    out.mux(audio_out.encode(frame))
        if not copy:
            out.mux(audio_out.encode(None))


def write_video(path: str | Path, frames: list[np.ndarray], fps: Fraction | int, *, tone_hz: float | None = None,
                sample_rate: int = 44100) -> Path:
    """Encode frames to H.264 MP4, optionally with an AAC sine tone as long as the video (demos and tests)."""
    import av

    path = Path(path)
    fps = Fraction(fps)
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        audio = out.add_stream("aac", rate=sample_rate) if tone_hz else None
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
        if audio is not None:
            samples = int(len(frames) / fps * sample_rate)
            wave = (0.3 * np.sin(2 * np.pi * tone_hz * np.arange(samples) / sample_rate)).astype(np.float32)
            for start in range(0, samples, 1024):
                block = av.AudioFrame.from_ndarray(wave[None, start:start + 1024], format="fltp", layout="mono")
                block.sample_rate = sample_rate
                out.mux(audio.encode(block))
            out.mux(audio.encode(None))
    return path
