"""A short video made from the test photos: frame count, frame rate, audio, tracking, labels, watermark."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import av
import numpy as np

from appleswap.app.verify_cli import verify_file
from appleswap.app.video import iter_frames, probe_video, write_video
from appleswap.files import load_image
from appleswap.provenance.labels import read_video_provenance
from tests.app.conftest import configured


def test_video_swap_keeps_timing_audio_and_person(engine, identity, faces_dir, tmp_path):
    import cv2

    photo = load_image(faces_dir / "two_people.jpg")  # Obama left, Biden right
    small = cv2.resize(photo, (564, 330), interpolation=cv2.INTER_AREA)
    frames = [np.roll(small, shift, axis=1) for shift in (0, 2, 4, 6, 8)]  # a slow pan
    clip = write_video(tmp_path / "clip.mp4", frames, Fraction(24000, 1001), tone_hz=330)
    video_engine = configured(engine, face_selector="one", face_selector_order="left-right", face_position=1,
                              chunk_size=2, watermark=True)
    result = video_engine.swap_video_file(identity, ["obama1.jpg"], clip, tmp_path / "out.mp4", progress=False)
    assert result["frames_swapped"] == 5
    info, src = probe_video(tmp_path / "out.mp4"), probe_video(clip)
    assert (info.frame_count, info.fps, info.has_audio) == (5, Fraction(24000, 1001), True)
    with av.open(str(tmp_path / "out.mp4")) as out, av.open(str(clip)) as original:
        assert abs(float(out.streams.audio[0].duration * out.streams.audio[0].time_base)
                   - float(original.streams.audio[0].duration * original.streams.audio[0].time_base)) < 0.05
    record = read_video_provenance(tmp_path / "out.mp4")
    assert record["ai_generated"] and record["target"] == "clip.mp4"
    assert verify_file(tmp_path / "out.mp4").watermark_detected
    # the tracked person (Biden, right) changed in every frame; Obama (left) did not
    for before, after in zip(iter_frames(clip), iter_frames(tmp_path / "out.mp4")):
        diff = np.abs(after.astype(int) - before.astype(int)).mean(axis=2)
        assert diff[40:130, 400:480].mean() > 3 * diff[30:120, 120:210].mean()
    assert dataclasses.asdict(src)["frame_count"] == 5
