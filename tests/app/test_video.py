"""Video I/O: frame count, frame rate and audio kept; chunks resume; corrupt files give clear errors."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from appleswap.app.video import iter_frames, probe_video, process_video, write_video
from appleswap.files import load_image


class Negate:
    """A real (if trivial) frame processor with state, counting frames it saw."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.seen = 0
        self.fail_at = fail_at

    def __call__(self, frame: np.ndarray, index: int) -> np.ndarray:
        if index == self.fail_at:
            raise RuntimeError("stop")
        self.seen += 1
        return 255 - frame

    def state(self) -> dict:
        return {"seen": self.seen}

    def load_state(self, state: dict) -> None:
        self.seen = state["seen"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, faces_dir):
    from PIL import Image

    photos = [np.asarray(Image.fromarray(load_image(faces_dir / n)).resize((128, 96))) for n in ("obama.jpg", "biden2.jpg")]
    frames = [photos[i % 2] for i in range(11)]
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", frames, Fraction(15), tone_hz=440)


def _audio_seconds(path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return float(stream.duration * stream.time_base)


def test_keeps_frames_fps_audio_and_tags(tmp_path, clip):
    out = tmp_path / "out.mp4"
    process_video(clip, out, Negate(), chunk_size=4, tags={"comment": "AI-generated"}, progress=False)
    info, src = probe_video(out), probe_video(clip)
    assert (info.frame_count, info.fps, info.width, info.height) == (11, Fraction(15), 128, 96)
    assert info.has_audio and _audio_seconds(out) == pytest.approx(_audio_seconds(clip), abs=0.05)
    first = next(iter_frames(out)).astype(int)
    original = next(iter_frames(clip)).astype(int)
    assert np.abs(first - (255 - original)).mean() < 6
    with av.open(str(out)) as container:
        assert container.metadata["comment"] == "AI-generated"
    assert not (tmp_path / "out.mp4.parts").exists()
    assert src.frame_count == 11


def test_resume_skips_finished_chunks(tmp_path, clip):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        process_video(clip, out, Negate(fail_at=9), chunk_size=4, progress=False)
    parts = sorted(p.name for p in (tmp_path / "out.mp4.parts").glob("chunk_*.mkv"))
    assert parts == ["chunk_00000.mkv", "chunk_00001.mkv"] and not out.exists()
    second = Negate()
    process_video(clip, out, second, chunk_size=4, progress=False)
    assert second.seen == 8 + 3  # restored state (8 frames) plus the last chunk only
    assert probe_video(out).frame_count == 11


def test_changed_settings_start_afresh(tmp_path, clip):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        process_video(clip, out, Negate(fail_at=5), chunk_size=4, settings={"seed": 1}, progress=False)
    fresh = Negate()
    process_video(clip, out, fresh, chunk_size=4, settings={"seed": 2}, progress=False)
    assert fresh.seen == 11


def test_corrupt_and_missing_videos(tmp_path, clip):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(ValueError, match="bad.mp4"):
        probe_video(bad)
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(clip.read_bytes()[: len(clip.read_bytes()) // 3])
    with pytest.raises(ValueError, match="cut.mp4"):
        probe_video(truncated)
        list(iter_frames(truncated))
    with pytest.raises(FileNotFoundError, match="nothing.mp4"):
        probe_video(tmp_path / "nothing.mp4")
