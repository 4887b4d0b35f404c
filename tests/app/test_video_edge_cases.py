"""Videos the camera-phone world produces: no audio track, and a variable frame rate (built with PyAV).
Each frame is a flat grey level that names it, so order and completeness are checked frame by frame."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from appleswap.app.video import iter_frames, probe_video, process_video, write_video

LEVELS = [20 + 18 * i for i in range(12)]


class Negate:
    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, frame: np.ndarray, index: int) -> np.ndarray:
        self.seen += 1
        return 255 - frame

    def state(self) -> dict:
        return {"seen": self.seen}

    def load_state(self, state: dict) -> None:
        self.seen = state["seen"]


def _levels(path) -> list[int]:
    return [round(float(frame.mean())) for frame in iter_frames(path)]


def _duration(path) -> float:
    with av.open(str(path)) as container:
        return container.duration / av.time_base


def test_video_without_audio(tmp_path):
    frames = [np.full((64, 96, 3), level, np.uint8) for level in LEVELS]
    source = write_video(tmp_path / "silent.mp4", frames, 12)
    assert not probe_video(source).has_audio
    out = tmp_path / "out.mp4"
    process_video(source, out, Negate(), chunk_size=5, progress=False)
    info = probe_video(out)
    assert not info.has_audio and (info.frame_count, info.fps, info.width, info.height) == (12, Fraction(12), 96, 64)
    assert np.abs(np.array(_levels(out)) - (255 - np.array(LEVELS))).max() <= 2


def _variable_rate(path, times: list[int], rate: int = 30) -> None:
    """An H.264 MP4 whose frame i is shown at times[i] / rate seconds (uneven gaps)."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, rate)
        for level, when in zip(LEVELS, times, strict=True):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), level, np.uint8), format="rgb24")
            frame.pts, frame.time_base = when, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_variable_frame_rate_keeps_every_frame_in_order_and_the_length(tmp_path):
    times = [0, 1, 2, 5, 6, 7, 15, 16, 17, 18, 30, 31]  # bursts and pauses, 32 / 30 s long
    source = tmp_path / "vfr.mp4"
    _variable_rate(source, times)
    assert np.abs(np.array(_levels(source)) - LEVELS).max() <= 2  # the source really holds the 12 frames
    out = tmp_path / "out.mp4"
    process_video(source, out, Negate(), chunk_size=5, progress=False)
    info = probe_video(out)
    assert info.frame_count == len(LEVELS)
    assert np.abs(np.array(_levels(out)) - (255 - np.array(LEVELS))).max() <= 2  # all frames, in order
    # the output lasts as long as the source, within a frame of its average rate
    assert abs(_duration(out) - _duration(source)) <= 1 / float(info.fps) + 1e-3
