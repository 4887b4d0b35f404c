"""A 3-cut video built from the test photos: the right person in every shot, the summary line true, and a video
without faces failing like a photo without faces.

The swapper is the real ``FaceSwapper`` / ``SwapEngine`` with a deterministic generator (every crop comes back
colour-inverted, so a swapped face is plain to see) and the app tests' tiny ArcFace graph as embedder. A random
ArcFace cannot tell two people apart in different photos, so after each cut the same faces come back from the
first shot's pixels (moved, resized, on another background): re-finding the person is then a matter of the
embedding, while the order rule alone would pick the wrong one. Who is where comes from how the video is built.
"""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np
import pytest

from appleswap.app.swap import SwapEngine
from appleswap.app.swapper import FaceSwapper, SwapConfig
from appleswap.app.video import frame_signature, is_scene_cut, iter_frames, write_video
from appleswap.files import load_image
from tests.fixtures.derived_photos import no_face

WIDTH, HEIGHT = 480, 272
# two_people.jpg at WIDTH x HEIGHT: Obama on the left, Biden on the right (face boxes read off the frame)
HEADS = {"obama": (105, 24, 174, 92), "biden": (335, 34, 409, 108)}


def _invert(identity, crops: np.ndarray, seed: int) -> np.ndarray:
    return 255 - np.asarray(crops)


@pytest.fixture(scope="module")
def invert_engine(engine):
    def make(**changes) -> SwapEngine:
        config = SwapConfig(watermark=False, face_mask="ellipse", **changes)
        return SwapEngine(FaceSwapper(_invert, config, embed=engine.swapper.embed), None, "test-invert")

    return make


def _paste_head(canvas: np.ndarray, frame: np.ndarray, box, centre: tuple[int, int], scale: float):
    """Copy the head around ``box`` (twice its size) of ``frame`` onto ``canvas``, resized, centred at ``centre``;
    returns the face's inner box in ``canvas``."""
    x0, y0, x1, y1 = box
    side = x1 - x0
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    head = frame[max(cy - side, 0):cy + side, max(cx - side, 0):cx + side]
    head = cv2.resize(head, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    top, left = centre[1] - head.shape[0] // 2, centre[0] - head.shape[1] // 2
    canvas[top:top + head.shape[0], left:left + head.shape[1]] = head
    half = round(0.35 * side * scale)
    return (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)


@pytest.fixture(scope="module")
def three_cut_video(faces_dir, tmp_path_factory):
    """Shots: two_people panning (Obama left, Biden right); the two heads swapped round in a room (Biden left,
    Obama right); another room, empty; Biden's head alone, larger, in a third. Returns the path and, per frame,
    an inner box of each person's face."""
    a = cv2.resize(load_image(faces_dir / "two_people.jpg"), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    room = no_face((HEIGHT, WIDTH), seed=3).image
    b = room.copy()
    b_biden = _paste_head(b, a, HEADS["biden"], (130, 130), 1.2)
    b_obama = _paste_head(b, a, HEADS["obama"], (350, 120), 1.0)
    d = no_face((HEIGHT, WIDTH), seed=4).image
    d_biden = _paste_head(d, a, HEADS["biden"], (240, 136), 1.6)
    inner = {name: (x0 + 10, y0 + 12, x1 - 10, y1 - 8) for name, (x0, y0, x1, y1) in HEADS.items()}
    empty = no_face((HEIGHT, WIDTH), seed=5).image  # another room
    frames = [np.roll(a, s, axis=1) for s in (0, 2, 4, 6)] + [b] * 3 + [empty] * 3 + [d] * 3
    people = [inner] * 4 + [{"biden": b_biden, "obama": b_obama}] * 3 + [{}] * 3 + [{"biden": d_biden}] * 3
    path = write_video(tmp_path_factory.mktemp("video") / "cuts.mp4", frames, 12)
    return path, people


def _changed(before: np.ndarray, after: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    return float(np.abs(after[y0:y1, x0:x1].astype(int) - before[y0:y1, x0:x1].astype(int)).mean())


def test_scene_cuts_are_found_and_pans_are_not(three_cut_video):
    path, _ = three_cut_video
    signatures = [frame_signature(frame) for frame in iter_frames(path)]
    cuts = [i for i in range(len(signatures)) if is_scene_cut(signatures[i - 1] if i else None, signatures[i])]
    assert cuts == [0, 4, 7, 10]


def test_the_chosen_person_is_swapped_in_every_shot(invert_engine, three_cut_video, tmp_path):
    """``one`` picks Biden (2nd from the left) in shot 1; after the cut the order rule would give Obama, the
    embedding finds Biden on the left; the empty shot has nobody; the last shot is Biden alone."""
    path, people = three_cut_video
    engine = invert_engine(face_selector="one", face_selector_order="left-right", face_position=1, chunk_size=4,
                           reference_face_distance=0.2)  # tiny ArcFace: same face ~0.02, the other ~0.45
    result = engine.swap_video_file(None, ["me.jpg"], path, tmp_path / "out.mp4", progress=False)
    assert result["summary"] == "swapped 10 faces in 10 of 13 frames (4 shots; the selected person is absent from 1)"
    for index, (before, after, who) in enumerate(zip(iter_frames(path), iter_frames(tmp_path / "out.mp4"), people)):
        if "biden" in who:
            assert _changed(before, after, who["biden"]) > 30, index
        if "obama" in who:
            assert _changed(before, after, who["obama"]) < 3, index
        if not who:
            assert np.abs(after.astype(int) - before.astype(int)).mean() < 3, index


def test_many_swaps_every_face_and_counts_them(invert_engine, three_cut_video, tmp_path):
    path, people = three_cut_video
    engine = invert_engine(face_selector="many", chunk_size=5)
    result = engine.swap_video_file(None, ["me.jpg"], path, tmp_path / "out.mp4", progress=False)
    faces = sum(len(who) for who in people)
    assert result["summary"] == f"swapped {faces} faces in 10 of 13 frames (4 shots)"
    for before, after, who in zip(iter_frames(path), iter_frames(tmp_path / "out.mp4"), people):
        for box in who.values():
            assert _changed(before, after, box) > 30


def test_video_without_faces_fails_like_a_photo(invert_engine, tmp_path):
    from appleswap.app.swap import run_jobs

    blank = no_face((HEIGHT, WIDTH), seed=1).image
    clip = write_video(tmp_path / "empty.mp4", [blank] * 4, Fraction(25))
    (tmp_path / "empty.png").write_bytes(cv2.imencode(".png", blank)[1].tobytes())
    engine = invert_engine()
    jobs = [(clip, tmp_path / "out" / "empty.mp4"), (tmp_path / "empty.png", tmp_path / "out" / "empty_out.png")]
    video, photo = run_jobs(engine, None, ["me.jpg"], jobs, progress=False)
    assert video["status"] == photo["status"] == "error"
    assert video["error"] == f"{clip}: no face found in the target"
    assert photo["error"] == f"{tmp_path / 'empty.png'}: no face found in the target"
    assert not (tmp_path / "out" / "empty.mp4").exists()
    assert not (tmp_path / "out" / "empty.mp4.parts").exists()


def test_a_person_never_selected_is_an_error(invert_engine, three_cut_video, tmp_path):
    path, _ = three_cut_video
    engine = invert_engine(face_selector="one", min_face_size=400)
    with pytest.raises(ValueError, match="none selected .*--min-face-size 400"):
        engine.swap_video_file(None, ["me.jpg"], path, tmp_path / "out.mp4", progress=False)
    assert not (tmp_path / "out.mp4").exists()

